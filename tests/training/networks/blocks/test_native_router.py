"""The C selection and backward pass of noisy top-k routing equal the torch code."""

from __future__ import annotations

import pytest
import torch

from training.networks.blocks import noisy_top_k as ntk
from training.networks.blocks.native_router import native_router_applies, select_top_k
from training.networks.blocks.noisy_top_k import noisy_top_k, top_k_experts

needs_kernel = pytest.mark.skipif(
    not native_router_applies(torch.zeros(1, 1, 8), torch.zeros(1, 8, 16), 2),
    reason="no C compiler here: the native kernel is not built")


def _route(x, w, b, k, noise, native, monkeypatch):
    """Indices, gates and the gradients of a weighted sum of the gates."""
    with monkeypatch.context() as m:
        if not native:
            m.setattr(ntk, "native_router_applies", lambda *args: False)
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        b = b.clone().requires_grad_() if b is not None else None
        indices, gates = noisy_top_k(x, w, b, k, noise)
        weight = torch.linspace(-1, 1, gates.numel()).view_as(gates)
        params = [t for t in (x, w, b) if t is not None]
        grads = torch.autograd.grad((gates * weight).sum(), params)
    return indices, gates, grads


# N = 1000, 77: vector blocks and a token-by-token tail; k = 3, 5: token-by-token selection
@needs_kernel
@pytest.mark.parametrize("B,N,C,E,k", [(4, 1000, 8, 8, 2), (2, 77, 16, 8, 1),
                                       (3, 50, 12, 6, 3), (2, 64, 32, 8, 2),
                                       (1, 40, 8, 8, 5)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["feature-map", "token-major"])
def test_native_routing_equals_torch(B, N, C, E, k, bias, layout, monkeypatch):
    """Same experts, gates and gradients, for a feature map's tokens (a transposed view:
    the vector backward pass) and token-major ones (token by token)."""
    g = torch.Generator().manual_seed(B * N + C + k)
    if layout == "feature-map":
        x = torch.randn(B, C, N, generator=g).transpose(1, 2)
    else:
        x = torch.randn(B, N, C, generator=g)
    w = torch.randn(B, C, 2 * E, generator=g) * 0.5
    b = torch.randn(B, 2 * E, generator=g) if bias else None
    noise = torch.randn(B, N, E, generator=g)
    got = _route(x, w, b, k, noise, True, monkeypatch)
    want = _route(x, w, b, k, noise, False, monkeypatch)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-7)
    for a, c in zip(got[2], want[2]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 3])
def test_selection_breaks_ties_to_the_lower_expert_and_ranks_nan_first(k):
    """The order the torch path's top_k_experts gives for many tokens: equal values go to
    the lower expert; NaN ranks above every number (as torch.topk)."""
    B, E, N = 2, 8, 40  # 32 tokens in vector blocks (or 40 with 8 lanes), the rest one by one
    logits = torch.randint(0, 3, (B, E, N)).float()  # many ties
    logits[0, 5, 3] = float("nan")
    logits[1, 2, 37] = float("nan")
    logits[1, 6, 37] = float("-inf")
    noise, both = torch.randn(B, E, N), torch.randn(B, 2 * E, N)
    indices, top, noise_sel, nl_sel = select_top_k(logits, noise, both, k)
    ordered, order = logits.sort(dim=1, descending=True, stable=True)  # NaN first
    want_top, want_idx = ordered[:, :k], order[:, :k]
    if k <= 2:  # the torch path's own selection, on enough tokens to take its fast code
        many = logits.repeat(1, 1, 64)
        assert torch.equal(top_k_experts(many, k)[1][..., :N], want_idx)
    assert torch.equal(indices, want_idx.transpose(1, 2))
    torch.testing.assert_close(top, want_top.transpose(1, 2), equal_nan=True)
    assert indices[0, 3, 0] == 5 and indices[1, 37, 0] == 2
    torch.testing.assert_close(noise_sel, noise.gather(1, want_idx).transpose(1, 2))
    torch.testing.assert_close(nl_sel, both[:, E:].gather(1, want_idx).transpose(1, 2))


@needs_kernel
def test_applies_to_narrow_float32_cpu_tokens_only():
    w = torch.zeros(1, 8, 16)
    assert native_router_applies(torch.zeros(1, 4, 8), w, 2)
    assert not native_router_applies(torch.zeros(1, 4, 8, dtype=torch.float64), w.double(), 2)
    assert not native_router_applies(torch.zeros(1, 4, 768), torch.zeros(1, 768, 16), 2)
    assert not native_router_applies(torch.zeros(1, 4, 8), w, 9)  # k > E


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_autocast_takes_the_torch_code(dtype, monkeypatch):
    """Under CPU autocast the logits are half precision: the C code (float32 only) must not
    see them (it once read them as float32 and corrupted memory)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 300, generator=g).transpose(1, 2)
    w, noise = torch.randn(2, 8, 16, generator=g), torch.randn(2, 300, 8, generator=g)
    with torch.autocast("cpu", dtype=dtype):
        got = _route(x, w, None, 2, noise, True, monkeypatch)
        want = _route(x, w, None, 2, noise, False, monkeypatch)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for a, c in zip(got[2], want[2]):
        assert torch.equal(a, c)


@needs_kernel
def test_the_kernels_refuse_other_dtypes():
    from training.networks.blocks.native_experts import native_experts

    half = torch.zeros(2, 8, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="logits must be float32"):
        select_top_k(half, half.float(), torch.zeros(2, 16, 16), 2)
    w = torch.zeros(8, 8, 32)
    with pytest.raises(ValueError, match="x must be float32"):
        native_experts(torch.zeros(4, 8, dtype=torch.float16), torch.zeros(4, 1, dtype=torch.long),
                       torch.ones(4, 1), w, torch.zeros(8, 32), w.transpose(1, 2),
                       torch.zeros(8, 8), 0.0, "hidden", None)
