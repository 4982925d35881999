"""The fused noisy top-k gating against plain autograd with the same noise."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.networks import DMoE
from training.networks.blocks import noisy_top_k as noisy_top_k_module
from training.networks.blocks.noisy_top_k import noisy_top_k, top_k_experts


@pytest.fixture(autouse=True)
def elementwise_top_k(monkeypatch):
    """The inputs here are small: test the elementwise top-k that large inputs take."""
    monkeypatch.setattr(noisy_top_k_module, "ELEMENTWISE_MIN_TOKENS", 0)


def _reference(x, weight, bias, k, noise):
    """Eq. 3-5 of Oh et al. / Shazeer et al. with stock torch ops: indices and gates."""
    E = weight.shape[-1] // 2
    both = torch.bmm(x, weight) + (0 if bias is None else bias[:, None])
    clean, noise_logits = both.split(E, dim=-1)
    top, indices = (clean + noise * F.softplus(noise_logits)).topk(k, dim=-1)
    return indices, torch.softmax(top, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_plain_autograd_with_the_same_noise(dtype, k, with_bias):
    torch.manual_seed(k)
    B, N, C, E = 3, 50, 16, 8
    x = torch.randn(B, N, C, dtype=dtype, requires_grad=True)
    weight = (0.5 * torch.randn(B, C, 2 * E, dtype=dtype)).requires_grad_()
    bias = torch.randn(B, 2 * E, dtype=dtype, requires_grad=True) if with_bias else None
    noise = torch.randn(B, N, E, dtype=dtype)
    indices, gates = noisy_top_k(x, weight, bias, k, noise)
    want_indices, want_gates = _reference(x, weight, bias, k, noise)
    assert indices.dtype == torch.long and indices.shape == (B, N, k)
    assert torch.equal(indices, want_indices)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(gates, want_gates, **tol)
    upstream = torch.randn_like(gates)
    inputs = [t for t in (x, weight, bias) if t is not None]
    got = torch.autograd.grad((gates * upstream).sum(), inputs)
    want = torch.autograd.grad((want_gates * upstream).sum(), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def test_draws_fresh_noise_from_the_default_generator():
    x, weight = torch.randn(2, 300, 8), torch.randn(2, 8, 16)
    torch.manual_seed(5)
    first = noisy_top_k(x, weight, None, 2)
    torch.manual_seed(5)
    again = noisy_top_k(x, weight, None, 2)
    other = noisy_top_k(x, weight, None, 2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_experts_equals_topk_on_distinct_values(k, monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(4, 8, 5000)
    logits[0, :, :10] = -logits[0, :, :10].abs()  # all negative: the sign flip of the keys
    want_values, want_indices = logits.topk(k, dim=1)
    for min_tokens in (0, 10**9):  # elementwise, and torch.topk
        monkeypatch.setattr(noisy_top_k_module, "ELEMENTWISE_MIN_TOKENS", min_tokens)
        values, indices = top_k_experts(logits, k)
        assert torch.equal(indices, want_indices)
        assert torch.equal(values, want_values)


def test_top_k_experts_breaks_ties_by_the_lower_index():
    logits = torch.zeros(1, 8, 3)
    logits[0, 5] = 1.0
    logits[0, 2] = 1.0
    logits[0, 6, 2] = 2.0
    _, indices = top_k_experts(logits, 2)
    assert indices[0, :, 0].tolist() == [2, 5]
    assert indices[0, :, 2].tolist() == [6, 2]
    _, indices = top_k_experts(torch.zeros(1, 8, 4), 2)  # untrained routers: all equal
    assert indices[0, :, 0].tolist() == [0, 1]


@pytest.mark.parametrize("num_experts", [2, 3, 5, 8, 9, 16])
@pytest.mark.parametrize("k", [1, 2])
def test_top_k_experts_orders_ties_by_index_for_any_number_of_experts(num_experts, k):
    """Keys carry the expert in their low bits (a shift and a mask, any E): the result is
    the stable descending sort, ties to the lower index, negative values included."""
    torch.manual_seed(num_experts)
    logits = torch.randint(-3, 4, (2, num_experts, 3000)).float() / 2  # many exact ties
    values, indices = top_k_experts(logits, k)
    want_values, want_indices = torch.sort(logits, dim=1, descending=True, stable=True)
    assert torch.equal(indices, want_indices[:, :k])
    assert torch.equal(values, want_values[:, :k])


def test_top_k_experts_compares_bfloat16_exactly():
    torch.manual_seed(1)
    logits = torch.randn(2, 8, 1000).bfloat16()
    values, indices = top_k_experts(logits, 2)
    assert values.dtype == torch.bfloat16
    # bfloat16 values have many exact ties: the chosen values must still be the two largest
    want_values, _ = logits.float().topk(2, dim=1)
    assert torch.equal(values.float(), want_values)
    assert (indices[:, 0] != indices[:, 1]).all()


@pytest.mark.parametrize("router_bias", [False, True])
def test_router_training_path_equals_its_plain_autograd_path(router_bias):
    """The fused function (aux losses off) and the plain path (aux losses on, weight ~0)
    give the same routing and router gradients for the same noise."""
    torch.manual_seed(2)
    fused = DMoE(16, num_attributes=3, router_bias=router_bias).train()
    plain = DMoE(16, num_attributes=3, router_bias=router_bias, importance_weight=1e-30).train()
    for p in fused.router.parameters():
        torch.nn.init.normal_(p, std=0.5)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(3, 40, 16)
    attr = torch.tensor([0, 2, -1])
    noise = torch.randn(3, 40, 8)
    upstream = torch.randn(3, 40, 2)
    grads = []
    for layer in (fused, plain):
        xi = x.clone().requires_grad_()
        out = layer.router(xi, attr, noise=noise)
        (out.gates * upstream).sum().backward()
        router_grads = [p.grad for p in layer.router.parameters()]
        grads.append((out.indices, out.gates, xi.grad, *router_grads))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1:], grads[1][1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_router_rejects_noise_of_the_wrong_shape():
    layer = DMoE(8, num_attributes=2).train()
    with pytest.raises(ValueError, match="noise must have shape"):
        layer.router(torch.randn(2, 5, 8), torch.tensor([0, 1]), noise=torch.randn(2, 5, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_equals_torch_softplus_over_the_whole_range(dtype):
    """The noise scale: within a few rounding units of ``log(1 + exp(x))`` (absolute, as
    ``1 + tiny`` rounds to 1), also at the extremes and at infinity; gradient ``sigmoid``.
    (``F.softplus`` itself returns ``x`` above 20, so the reference is exact arithmetic.)"""
    x = torch.cat([torch.linspace(-120, 120, 20001, dtype=dtype),
                   torch.tensor([float("-inf"), float("inf"), 0.0], dtype=dtype)])
    x.requires_grad_()
    y = noisy_top_k_module.softplus(x)
    exact = x.detach().double()
    want = (exact.clamp_min(0) + torch.log1p(torch.exp(-exact.abs()))).to(dtype)
    torch.testing.assert_close(y.detach(), want, rtol=4 * torch.finfo(dtype).eps,
                               atol=4 * torch.finfo(dtype).eps)
    assert y[-3].item() == 0.0 and y[-2].item() == float("inf")
    (grad,) = torch.autograd.grad(y[:-3].sum(), x)
    torch.testing.assert_close(grad[:-3], torch.sigmoid(x.detach()[:-3]))
