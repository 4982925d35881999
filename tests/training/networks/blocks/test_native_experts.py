"""The C expert kernel (``path="native"``) equals the per-expert reference, with a given
dropout mask and with its own counter-based one."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from training.networks.blocks import experts, native_build, native_experts
from training.networks.blocks.experts import ExpertBank
from training.networks.blocks.native_experts import (
    forget_kernel,
    hashed_keep,
    native_available,
    native_lanes,
)

from ._reference import reference_experts

needs_kernel = pytest.mark.skipif(not native_available(),
                                  reason="no C compiler here: the native kernel is not built")


def test_kernel_builds_where_there_is_a_compiler():
    """A compiler on PATH means the kernel must build: a broken source must not hide behind
    the pure-torch fallback."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler on PATH")
    assert native_available()


def _routing(T, C, E, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, C, generator=g, requires_grad=True)
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    gates = torch.softmax(torch.randn(T, k, generator=g), -1).requires_grad_()
    return x, indices, gates


def _outputs_and_grads(y, params, weight):
    return [y, *torch.autograd.grad((y * weight).sum(), params)]


def _compare_with_reference(C, k, position):
    E, T = 8, 150
    torch.manual_seed(C * 10 + k)
    bank = ExpertBank(C, num_experts=E, dropout=0.25, dropout_position=position).train()
    x, indices, gates = _routing(T, C, E, k, seed=C + k)
    keep = torch.rand(T, k, bank.dropout_width) >= 0.25
    params = [x, gates, *bank.parameters()]
    weight = torch.randn(T, C)
    got = _outputs_and_grads(bank(x, indices, gates, dropout_mask=keep, path="native"),
                             params, weight)
    want = _outputs_and_grads(reference_experts(bank, x, indices, gates, keep), params, weight)
    for name, g, w in zip(["out", "dx", "dgates", "dw1", "db1", "dw2", "db2"], got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-5, msg=name)


# C = 8, 16, 32, 48, 64: constant-width vector code; 24: run-time widths; 12, 20: scalar code
@needs_kernel
@pytest.mark.parametrize("C", [8, 12, 16, 20, 24, 32, 48, 64])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("position", ["hidden", "output"])
def test_native_matches_reference_with_the_same_mask(C, k, position):
    _compare_with_reference(C, k, position)


@pytest.fixture
def eight_lane_kernel(monkeypatch, tmp_path):
    """The kernel built without AVX-512 (its 8-lane hidden-width code, what CPUs without
    AVX-512 run), in a cache of its own; the default kernel again afterwards."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not native_available():
        pytest.skip("needs the kernel on x86-64")
    monkeypatch.setenv(native_build.FLAGS_VARIABLE, "-mno-avx512f")
    monkeypatch.setenv("NAPARI_DMOE_CACHE", str(tmp_path))
    forget_kernel()
    yield
    forget_kernel()


@pytest.mark.parametrize("C", [8, 12, 24])
def test_eight_lane_build_matches_reference(eight_lane_kernel, C):
    assert native_lanes() == 8
    for position in ("hidden", "output"):
        _compare_with_reference(C, 2, position)
        _compare_counter_based(C, position)


def _seed_of_next_call(seed: int) -> int:
    """The counter-based seed a native call draws right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return int(torch.randint(1, 2**63 - 1, (), dtype=torch.int64))


@needs_kernel
@pytest.mark.parametrize("C", [8, 12, 32])
@pytest.mark.parametrize("position", ["hidden", "output"])
def test_counter_based_mask_is_the_one_backward_uses(C, position):
    """The fresh mask is a hash of (seed, unit): the reference run with that mask gives the
    same outputs and gradients, so the backward pass regenerated the forward's mask."""
    _compare_counter_based(C, position)


def _compare_counter_based(C, position):
    E, k, T = 8, 2, 400
    bank = ExpertBank(C, num_experts=E, dropout=0.1, dropout_position=position).train()
    x, indices, gates = _routing(T, C, E, k)
    params = [x, gates, *bank.parameters()]
    weight = torch.randn(T, C)
    torch.manual_seed(7)
    got = _outputs_and_grads(bank(x, indices, gates, path="native"), params, weight)
    keep = hashed_keep(_seed_of_next_call(7), 0.1, T * k, bank.dropout_width).view(T, k, -1)
    want = _outputs_and_grads(reference_experts(bank, x, indices, gates, keep), params, weight)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=2e-5)


@needs_kernel
@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_counter_based_mask_is_a_bernoulli_process(p):
    """Rate p overall and per unit position, independent of the neighbouring unit and of
    the same unit in the next slot, and different for another seed."""
    slots, width = 20_000, 32
    keep = hashed_keep(_seed_of_next_call(0), p, slots, width)
    dropped = ~keep
    n = dropped.numel()
    tolerance = 5 * (p * (1 - p) / n) ** 0.5
    assert abs(dropped.float().mean().item() - p) < tolerance
    per_unit = dropped.float().mean(0)  # each of the 32 positions alone: rate p
    assert (per_unit - p).abs().max().item() < 5 * (p * (1 - p) / slots) ** 0.5
    flat = dropped.view(-1)
    for neighbour in (flat[1:][flat[:-1]], dropped[1:][dropped[:-1]]):  # next unit, next slot
        rate = neighbour.float().mean().item()
        assert abs(rate - p) < 5 * (p * (1 - p) / neighbour.numel()) ** 0.5
    other = ~hashed_keep(_seed_of_next_call(1), p, slots, width)
    assert abs((dropped & other).float().mean().item() - p * p) < 5 * (p * p / n) ** 0.5


@needs_kernel
@pytest.mark.parametrize("position", ["hidden", "output"])
def test_fresh_mask_drops_p_scales_the_rest_and_changes_every_call(position):
    torch.manual_seed(0)
    p, T, C = 0.1, 4000, 64
    bank = ExpertBank(C, num_experts=2, mlp_ratio=1.0, dropout=p, dropout_position=position)
    with torch.no_grad():  # experts that compute relu(x)
        bank.w1.copy_(torch.eye(C).expand(2, C, C))
        bank.w2.copy_(torch.eye(C).expand(2, C, C))
        bank.b1.zero_()
        bank.b2.zero_()
    bank.train()
    x = torch.rand(T, C) + 0.5
    indices = torch.randint(0, 2, (T, 1))
    y = bank(x, indices, torch.ones(T, 1), path="native")
    assert abs((y == 0).float().mean().item() - p) < 0.005  # 256,000 units
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    assert not torch.equal(y == 0, bank(x, indices, torch.ones(T, 1), path="native") == 0)
    torch.manual_seed(4)
    first = bank(x, indices, torch.ones(T, 1), path="native")
    torch.manual_seed(4)
    torch.testing.assert_close(bank(x, indices, torch.ones(T, 1), path="native"), first,
                               rtol=0, atol=0)  # torch.manual_seed reproduces the mask


@needs_kernel
def test_thread_count_changes_nothing_but_summation_order():
    torch.manual_seed(0)
    bank = ExpertBank(16, dropout=0.1).train()
    x, indices, gates = _routing(3001, 16, 8, 2)
    params = [x, gates, *bank.parameters()]
    weight = torch.randn(3001, 16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            torch.manual_seed(9)
            results.append(_outputs_and_grads(bank(x, indices, gates, path="native"), params,
                                              weight))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for i, (a, b) in enumerate(zip(results[0], other)):
            if i < 3:  # per-token results: the same operations in the same order
                assert torch.equal(a, b)
            else:  # weight gradients: summed per thread, then across threads
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernel
def test_eval_and_no_grad_match_reference():
    bank = ExpertBank(8, dropout=0.1).eval()
    x, indices, gates = _routing(500, 8, 8, 2)
    want = reference_experts(bank, x, indices, gates)
    torch.testing.assert_close(bank(x, indices, gates, path="native"), want)
    with torch.no_grad():
        torch.testing.assert_close(bank(x, indices, gates, path="native"), want)


@needs_kernel
def test_unused_expert_gets_zero_gradient_and_no_tokens_work():
    bank = ExpertBank(8, num_experts=4).train()
    x = torch.randn(10, 8, requires_grad=True)
    bank(x, torch.zeros(10, 1, dtype=torch.long), torch.ones(10, 1), path="native").sum().backward()
    assert bank.w1.grad[0].abs().sum() > 0
    assert torch.count_nonzero(bank.w1.grad[1:]) == 0
    assert torch.count_nonzero(bank.b2.grad[1:]) == 0
    empty = bank(torch.randn(0, 8), torch.zeros(0, 2, dtype=torch.long), torch.ones(0, 2),
                 path="native")
    assert empty.shape == (0, 8)


@needs_kernel
def test_auto_selects_native_for_narrow_float32_experts_on_cpu():
    few, many = torch.randn(100, 8), torch.randn(200_000, 8)
    assert ExpertBank(8).select_path(few) == "native"
    assert ExpertBank(8).select_path(many) == "native"
    assert ExpertBank(32).select_path(torch.randn(50_000, 32)) == "native"
    assert ExpertBank(48).select_path(torch.randn(100, 48)) == "native"  # few tokens
    assert ExpertBank(48).select_path(torch.randn(50_000, 48)) == "fused"
    assert ExpertBank(96).select_path(torch.randn(16, 96)) == "padded"
    assert ExpertBank(8).double().select_path(few.double()) == "padded"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ExpertBank(8).select_path(few) == "padded"


def test_without_the_kernel_auto_falls_back_and_native_refuses(monkeypatch):
    monkeypatch.setattr(experts, "native_available", lambda: False)
    bank = ExpertBank(8)
    assert bank.select_path(torch.randn(100, 8)) == "padded"
    assert bank.select_path(torch.randn(200_000, 8)) == "fused"
    x, idx, g = torch.randn(4, 8), torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1)
    with pytest.raises(RuntimeError, match="could not be built"):
        bank(x, idx, g, path="native")


@needs_kernel
def test_native_refuses_other_dtypes():
    bank = ExpertBank(8).double()
    x, idx = torch.randn(4, 8, dtype=torch.double), torch.zeros(4, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="float32 CPU"):
        bank(x, idx, torch.ones(4, 1, dtype=torch.double), path="native")


@needs_kernel
def test_dropped_positions_out_of_range_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        native_experts.dropped_bits(torch.tensor([3, 16]), 16)
