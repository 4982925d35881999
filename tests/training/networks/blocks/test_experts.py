"""The expert bank: fused dispatch with dropout equals a per-expert reference."""

from __future__ import annotations

import pytest
import torch

from training.networks.blocks import expert_dispatch, experts
from training.networks.blocks.experts import PADDED_MAX_UNITS, ExpertBank
from training.networks.blocks.routing import AttributeRouterBank

from ._reference import reference_experts


@pytest.fixture(autouse=True)
def fused_by_default(monkeypatch):
    """The inputs here are small and narrow, which ``path="auto"`` would run padded or
    native: test the fused path unless a test asks for another (``hidden_mode`` "padded",
    or ``path=`` given). The native path has its own tests (test_native_experts)."""
    monkeypatch.setattr(experts, "PADDED_MAX_UNITS", -1)
    monkeypatch.setattr(experts, "NATIVE_MAX_WIDTH", -1)
    monkeypatch.setattr(experts, "NATIVE_FEW_MAX_WIDTH", -1)


@pytest.fixture(params=["keep-hidden", "recompute-hidden", "padded"])
def hidden_mode(request, monkeypatch):
    """The fused path with stored hidden activations (small inputs) and with recomputation
    (large), and the padded path (few tokens)."""
    if request.param == "recompute-hidden":
        monkeypatch.setattr(expert_dispatch, "KEEP_HIDDEN_BYTES", 0)
    if request.param == "padded":
        monkeypatch.setattr(experts, "PADDED_MAX_UNITS", 2**62)
    return request.param


def _noisy_routing(T=60, C=16, E=6, k=2, seed=0):
    """Tokens and noisy top-k routing (training mode: router noise on) that carries grad."""
    torch.manual_seed(seed)
    router = AttributeRouterBank(C, num_experts=E, top_k=k, num_attributes=2).double().train()
    for p in router.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, T // 2, C, dtype=torch.double, requires_grad=True)
    route = router(x, torch.tensor([0, 1]))
    return router, x, route.indices.reshape(T, k), route.gates.reshape(T, k)


@pytest.mark.parametrize("position", ["hidden", "output"])
@pytest.mark.parametrize("chunk_rows", [7, 4096])
def test_fused_matches_reference_with_the_same_mask_and_noise(position, chunk_rows, hidden_mode):
    router, x, indices, gates = _noisy_routing()
    torch.manual_seed(1)
    bank = ExpertBank(16, num_experts=6, dropout=0.3, dropout_position=position).double().train()
    keep = torch.rand(*indices.shape, bank.dropout_width) >= 0.3
    tokens = x.reshape(-1, 16)
    y = bank(tokens, indices, gates, chunk_rows=chunk_rows, dropout_mask=keep)
    ref = reference_experts(bank, tokens, indices, gates, keep)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    weight = torch.randn_like(y)
    params = [x, router.w_gate, router.w_noise, *bank.parameters()]
    got = torch.autograd.grad((y * weight).sum(), params, retain_graph=True)
    want = torch.autograd.grad((ref * weight).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("position", ["hidden", "output"])
def test_float32_fast_products_match_reference(position, hidden_mode):
    """float32 takes the oneDNN products where torch has them (float64 takes torch.mm)."""
    router, x, indices, gates = _noisy_routing()
    x, gates = x.detach().float().requires_grad_(), gates.detach().float().requires_grad_()
    torch.manual_seed(1)
    bank = ExpertBank(16, num_experts=6, dropout=0.3, dropout_position=position).train()
    keep = torch.rand(*indices.shape, bank.dropout_width) >= 0.3
    tokens = x.reshape(-1, 16)
    y = bank(tokens, indices, gates, chunk_rows=7, dropout_mask=keep)
    ref = reference_experts(bank, tokens, indices, gates, keep)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    weight = torch.randn_like(y)
    params = [x, gates, *bank.parameters()]
    got = torch.autograd.grad((y * weight).sum(), params)
    want = torch.autograd.grad((ref * weight).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_eval_matches_reference_without_dropout(hidden_mode):
    _, x, indices, gates = _noisy_routing()
    bank = ExpertBank(16, num_experts=6, dropout=0.3).double().eval()
    tokens = x.reshape(-1, 16)
    torch.testing.assert_close(bank(tokens, indices, gates),
                               reference_experts(bank, tokens, indices, gates), rtol=0, atol=1e-12)


def _identity_bank(C, p, position):
    """Experts that compute ``relu(x)`` (identity weights, zero biases)."""
    bank = ExpertBank(C, num_experts=2, mlp_ratio=1.0, dropout=p, dropout_position=position)
    with torch.no_grad():
        bank.w1.copy_(torch.eye(C).expand(2, C, C))
        bank.w2.copy_(torch.eye(C).expand(2, C, C))
        bank.b1.zero_()
        bank.b2.zero_()
    return bank.train()


@pytest.fixture(params=["at-once", "per-chunk"])
def draw_mode(request, monkeypatch):
    """Fresh dropout drawn for the whole layer in one piece, and chunk by chunk (large)."""
    if request.param == "per-chunk":
        monkeypatch.setattr(expert_dispatch, "DRAW_AT_ONCE_UNITS", 0)
    return request.param


@pytest.mark.parametrize("path", ["fused", "padded"])
@pytest.mark.parametrize("position", ["hidden", "output"])
def test_drawn_mask_drops_p_and_scales_the_rest(position, draw_mode, path):
    torch.manual_seed(0)
    p, T, C = 0.1, 4000, 64
    bank = _identity_bank(C, p, position)
    x = torch.rand(T, C) + 0.5
    indices = torch.randint(0, 2, (T, 1))
    y = bank(x, indices, torch.ones(T, 1), path=path)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.005  # 256,000 units: the standard error is 0.0006
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    y2 = bank(x, indices, torch.ones(T, 1), path=path)
    assert not torch.equal(y == 0, y2 == 0)  # a fresh mask every call


@pytest.mark.parametrize("position", ["hidden", "output"])
def test_backward_reuses_the_forward_mask(position, hidden_mode, draw_mode):
    """Gradients equal a finite-difference estimate of the same random draw."""
    bank = ExpertBank(6, num_experts=3, dropout=0.5, dropout_position=position).double().train()
    torch.manual_seed(3)
    x = torch.randn(12, 6, dtype=torch.double, requires_grad=True)
    gates = torch.rand(12, 2, dtype=torch.double, requires_grad=True)
    indices = torch.stack([torch.arange(12) % 3, (torch.arange(12) + 1) % 3], 1)
    state = torch.random.get_rng_state()

    def f(inp, g):
        torch.random.set_rng_state(state)
        return bank(inp, indices, g, chunk_rows=5)

    assert torch.autograd.gradcheck(f, (x, gates), eps=1e-6, atol=1e-5)


def test_unused_expert_gets_zero_gradient():
    bank = ExpertBank(8, num_experts=4).train()
    x = torch.randn(10, 8)
    indices = torch.zeros(10, 1, dtype=torch.long)  # everything to expert 0
    bank(x, indices, torch.ones(10, 1)).sum().backward()
    assert bank.w1.grad[0].abs().sum() > 0
    assert torch.count_nonzero(bank.w1.grad[1:]) == 0
    assert torch.count_nonzero(bank.b2.grad[1:]) == 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="dropout_position"):
        ExpertBank(8, dropout_position="input")
    bank = ExpertBank(8, num_experts=2)
    x, idx, g = torch.randn(4, 8), torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1)
    with pytest.raises(ValueError, match="dropout_mask must have shape"):
        bank.train()(x, idx, g, dropout_mask=torch.ones(4, 1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout is off"):
        bank.eval()(x, idx, g, dropout_mask=torch.ones(4, 1, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="path"):
        bank.select_path(x, "magic")


def test_cpu_selects_padded_for_few_tokens_and_fused_for_many(monkeypatch):
    monkeypatch.setattr(experts, "PADDED_MAX_UNITS", PADDED_MAX_UNITS)  # the real threshold
    bank = ExpertBank(8)  # 8 experts of hidden width 32
    assert bank.select_path(torch.randn(2, 8)) == "padded"
    assert bank.select_path(torch.randn(PADDED_MAX_UNITS // 256, 8)) == "padded"
    assert bank.select_path(torch.randn(PADDED_MAX_UNITS // 256 + 1, 8)) == "fused"


@pytest.mark.parametrize("position", ["hidden", "output"])
def test_padded_path_equals_fused_path(position):
    torch.manual_seed(0)
    T, C, E, k = 64, 16, 8, 2
    bank = ExpertBank(C, num_experts=E, dropout=0.2, dropout_position=position).train()
    x = torch.randn(T, C, requires_grad=True)
    indices = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    gates = torch.softmax(torch.randn(T, k), -1).requires_grad_()
    keep = torch.rand(T, k, bank.dropout_width) >= 0.2
    results = []
    for path in ("fused", "padded"):
        y = bank(x, indices, gates, dropout_mask=keep, path=path)
        params = [x, gates, bank.w1, bank.b1, bank.w2, bank.b2]
        results.append([y, *torch.autograd.grad(y.square().sum(), params)])
    for padded, fused in zip(results[1], results[0]):
        torch.testing.assert_close(padded, fused, rtol=1e-5, atol=1e-5)
    unused = sorted(set(range(E)) - set(indices.flatten().tolist()))
    for e in unused:  # experts no token chose get exactly zero gradient
        assert torch.count_nonzero(results[1][3][e]) == 0


def test_padded_path_applies_dropout_only_while_training():
    torch.manual_seed(0)
    bank = ExpertBank(16, dropout=0.25).train()
    x = torch.randn(32, 16)
    idx = torch.zeros(32, 1, dtype=torch.long)
    g = torch.ones(32, 1)
    y = bank(x, idx, g, path="padded")
    bank.eval()
    y_eval = bank(x, idx, g, path="padded")
    assert not torch.allclose(y, y_eval)  # dropout acted while training
    torch.testing.assert_close(y_eval, bank(x, idx, g, path="fused"))


def _compare_paths(device, position):
    torch.manual_seed(0)
    T, C, E, k = 96, 32, 4, 2
    bank = ExpertBank(C, num_experts=E, dropout=0.2, dropout_position=position).to(device)
    bank.train()
    x = torch.randn(T, C, device=device, requires_grad=True)
    indices = torch.stack([torch.arange(T) % E, (torch.arange(T) + 1) % E], 1).to(device)
    gates = torch.softmax(torch.randn(T, k, device=device), -1).requires_grad_()
    keep = torch.rand(T, k, bank.dropout_width, device=device) >= 0.2
    outs, grads = [], []
    for path in ("fused", "grouped"):
        y = bank(x, indices, gates, dropout_mask=keep, path=path)
        outs.append(y)
        grads.append(torch.autograd.grad(y.square().sum(), [x, gates, bank.w1, bank.b2]))
    for a, b in zip([outs[1], *grads[1]], [outs[0], *grads[0]]):  # bf16 vs fp32: 5 % in norm
        assert a.shape == b.shape
        assert ((a - b).norm() / b.norm()).item() < 0.05  # a wrong row order gives ~100 %


@pytest.mark.skipif(not torch.cuda.is_available(), reason="grouped GEMM path needs a GPU")
@pytest.mark.parametrize("position", ["hidden", "output"])
def test_grouped_gemm_path_matches_fused_on_gpu(position):
    assert ExpertBank(32).select_path(torch.randn(2, 32, device="cuda")) in ("grouped", "fused")
    _compare_paths("cuda", position)


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"),
                    reason="torch without grouped_mm")
def test_grouped_path_runs_forced_on_cpu():
    """torch's CPU fallback of grouped_mm lets the grouped path's bookkeeping be checked."""
    a, b = torch.randn(8, 16, dtype=torch.bfloat16), torch.randn(2, 16, 8, dtype=torch.bfloat16)
    try:
        torch.nn.functional.grouped_mm(a, b, offs=torch.tensor([3, 8], dtype=torch.int32))
    except (RuntimeError, NotImplementedError) as err:  # no CPU kernel in this torch build
        pytest.skip(f"grouped_mm has no CPU kernel here: {err}")
    for position in ("hidden", "output"):
        _compare_paths("cpu", position)


@pytest.mark.parametrize("p", [0.0, 0.05, 0.1, 0.3])
def test_draw_keep_is_a_bernoulli_process(p):
    """The geometric-gap draw (large CPU masks): the drop rate is p, and a unit's decision
    does not depend on its neighbour's."""
    torch.manual_seed(0)
    keep = expert_dispatch.draw_keep(torch.empty(50_000, 32, dtype=torch.bool), p)
    dropped = ~keep.view(-1)
    n = dropped.numel()
    rate = dropped.float().mean().item()
    assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-12
    if p > 0:
        after_drop = dropped[1:][dropped[:-1]].float().mean().item()
        assert abs(after_drop - p) < 5 * (p * (1 - p) / (n * p)) ** 0.5
        assert not dropped[-5000:].all() and dropped[-5000:].any()  # the tail is decided too


def test_draw_keep_small_masks_use_random_bits():
    torch.manual_seed(0)
    keep = expert_dispatch.draw_keep(torch.empty(30, 100, dtype=torch.bool), 0.25)
    assert abs((~keep).float().mean().item() - 0.25) < 0.05


@pytest.mark.parametrize("n", [1, 37, 200_000])
def test_draw_dropped_gives_increasing_positions_and_matches_draw_keep(n):
    """The fused path's dropped positions: sorted, unique, in range, rate p; from the same
    seed, the units ``draw_keep`` drops."""
    torch.manual_seed(3)
    dropped = expert_dispatch.draw_dropped(n, 0.1)
    assert dropped.dtype == torch.int64
    if dropped.numel():
        assert int(dropped[0]) >= 0 and int(dropped[-1]) < n
        assert bool((dropped[1:] > dropped[:-1]).all())
    if n == 200_000:
        assert abs(dropped.numel() / n - 0.1) < 5 * (0.1 * 0.9 / n) ** 0.5
        torch.manual_seed(3)
        keep = expert_dispatch.draw_keep(torch.empty(n // 100, 100, dtype=torch.bool), 0.1)
        torch.testing.assert_close((~keep).view(-1).nonzero().view(-1), dropped)
    assert expert_dispatch.draw_dropped(n, 0.0).numel() == 0


def test_plan_draws_one_piece_and_cuts_it_at_the_chunks():
    indices = torch.randint(0, 4, (500, 2), generator=torch.Generator().manual_seed(0))
    plan = expert_dispatch.Plan(indices, torch.rand(500, 2), 4, chunk_rows=60)
    torch.manual_seed(5)
    pieces = plan.draw_dropped(10, 0.2, torch.device("cpu"))
    torch.manual_seed(5)
    whole = expert_dispatch.draw_dropped(1000 * 10, 0.2)
    assert len(pieces) == len(plan.chunks) > 8
    for piece, (_, lo, hi) in zip(pieces, plan.chunks):
        assert piece.numel() == 0 or (int(piece.min()) >= 0 and int(piece.max()) < (hi - lo) * 10)
    torch.testing.assert_close(torch.cat([piece + lo * 10 for piece, (_, lo, _) in
                                          zip(pieces, plan.chunks)]), whole)


@pytest.mark.parametrize("tokens", [5, 2048, 2100, 16384, 40000])
def test_sort_by_expert_is_the_stable_sort(tokens):
    """Every key size and sort path (small, uint8 padded to a radix sort, uint8 radix)."""
    indices = torch.randint(0, 8, (tokens, 2), generator=torch.Generator().manual_seed(tokens))
    order, counts = expert_dispatch.sort_by_expert(indices, 8)
    assert torch.equal(order, torch.argsort(indices.reshape(-1), stable=True))
    assert torch.equal(counts, torch.bincount(indices.reshape(-1), minlength=8))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_token_of_is_the_floor_division(k):
    """A shift for k a power of two, a division otherwise: both give ``assignment // k``."""
    assignment = torch.randperm(5000, generator=torch.Generator().manual_seed(k))
    assert torch.equal(expert_dispatch.token_of(assignment, k), assignment // k)
