"""The dMoE layer: Eq. 2-5 of Oh et al. 2025, checked against a plain reference."""

from __future__ import annotations

import pytest
import torch

from training.networks import UNKNOWN_ATTRIBUTE, DMoE
from training.networks.blocks import expert_dispatch, experts

from ._reference import reference_dmoe


def _layer(C=16, E=8, k=2, A=3, seed=0, **kw) -> DMoE:
    torch.manual_seed(seed)
    layer = DMoE(C, num_experts=E, top_k=k, num_attributes=A, **kw)
    for p in layer.router.parameters():  # zero init would route every token alike
        torch.nn.init.normal_(p, std=0.5)
    return layer


@pytest.fixture(autouse=True)
def fused_by_default(monkeypatch):
    """The inputs here are small, which ``path="auto"`` would run padded: test the fused
    path unless a test asks for another (``hidden_mode`` "padded", or ``path=`` given)."""
    monkeypatch.setattr(experts, "PADDED_MAX_UNITS", -1)


@pytest.fixture(params=["keep-hidden", "recompute-hidden", "padded"])
def hidden_mode(request, monkeypatch):
    """The fused path with stored hidden activations (small inputs) and with recomputation
    (large), and the padded path (few tokens)."""
    if request.param == "recompute-hidden":
        monkeypatch.setattr(expert_dispatch, "KEEP_HIDDEN_BYTES", 0)
    if request.param == "padded":
        monkeypatch.setattr(experts, "PADDED_MAX_UNITS", 2**62)
    return request.param


@pytest.mark.parametrize("unknown_router", [True, False])
@pytest.mark.parametrize("chunk_rows", [5, 4096])
def test_matches_reference_forward_and_gradients(unknown_router, chunk_rows, hidden_mode):
    layer = _layer(unknown_router=unknown_router, chunk_rows=chunk_rows).double().eval()
    x = torch.randn(3, 40, 16, dtype=torch.double, requires_grad=True)
    attr = torch.tensor([0, 2, UNKNOWN_ATTRIBUTE])
    y = layer(x, attr).output
    ref = reference_dmoe(layer, x, attr)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    weight = torch.randn_like(y)
    params = [x, layer.router.w_gate, *layer.experts.parameters()]
    got = torch.autograd.grad((y * weight).sum(), params)
    want = torch.autograd.grad((ref * weight).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_output_shape_and_namedtuple():
    layer = _layer().eval()
    out = layer(torch.randn(2, 7, 16), torch.tensor([1, 0]))
    assert out.output.shape == (2, 7, 16)
    assert out.routing is None
    assert out.aux_loss.shape == ()
    assert out.aux_loss.item() == 0.0


def test_routing_is_sparse_top_k_and_normalised():
    layer = _layer(E=8, k=2).eval()
    out = layer(torch.randn(2, 30, 16), torch.tensor([0, 1]), return_routing=True)
    idx, gates = out.routing
    assert idx.shape == gates.shape == (2, 30, 2)
    assert ((idx >= 0) & (idx < 8)).all()
    assert (idx[..., 0] != idx[..., 1]).all()  # two distinct experts per token
    torch.testing.assert_close(gates.sum(-1), torch.ones(2, 30))
    assert (gates[..., 0] >= gates[..., 1]).all()  # best first


def test_only_routed_experts_receive_gradient():
    layer = _layer(E=8, k=1, A=1).eval()
    with torch.no_grad():
        layer.router.w_gate.zero_()
        layer.router.w_gate[0, :, 3] = 10.0  # positive inputs all go to expert 3
    x = torch.rand(1, 20, 16) + 0.1
    layer(x).output.sum().backward()
    grads = layer.experts.w1.grad.abs().sum(dim=(1, 2))
    assert grads[3] > 0
    assert torch.count_nonzero(grads) == 1


def test_routers_differ_per_attribute_after_a_training_step():
    layer = DMoE(16, num_attributes=3, dropout=0.0)
    torch.manual_seed(1)
    x = torch.randn(4, 25, 16)
    attr = torch.tensor([0, 1, 2, 0])
    before = [layer.eval()(x[:1], torch.tensor([a])).output for a in range(3)]
    torch.testing.assert_close(before[0], before[1])  # zero-initialised routers agree
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    target = torch.randn(4, 25, 16)
    for _ in range(3):
        loss = ((layer(x, attr).output - target * (attr[:, None, None] + 1)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    after = [layer(x[:1], torch.tensor([a])).output for a in range(3)]
    assert not torch.allclose(after[0], after[1])
    assert not torch.allclose(after[1], after[2])


def test_attribute_blind_moe_ignores_attribute():
    layer = _layer(A=1).eval()
    x = torch.randn(2, 9, 16)
    a = layer(x, torch.tensor([0, 0])).output
    b = layer(x, torch.tensor([0, 0]) - 1).output
    c = layer(x, None).output
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_unknown_attribute_uses_its_own_router():
    layer = _layer(A=3).eval()
    x = torch.randn(1, 12, 16)
    unknown = layer(x, torch.tensor([-1])).output
    assert torch.isfinite(unknown).all()
    torch.testing.assert_close(unknown, layer(x, None).output)
    assert not torch.allclose(unknown, layer(x, torch.tensor([0])).output)
    assert layer.router.num_routers == 4


def test_unknown_without_router_averages_attribute_routers():
    layer = _layer(A=3, unknown_router=False).eval()
    x = torch.randn(1, 12, 16, dtype=torch.double)
    layer = layer.double()
    torch.testing.assert_close(layer(x, torch.tensor([-1])).output,
                               reference_dmoe(layer, x, torch.tensor([-1])))


def test_eval_is_deterministic_and_training_is_noisy():
    layer = _layer()
    x = torch.randn(2, 50, 16)
    attr = torch.tensor([0, 1])
    layer.eval()
    torch.testing.assert_close(layer(x, attr).output, layer(x, attr).output, rtol=0, atol=0)
    layer.train()
    r1 = layer(x, attr, return_routing=True).routing.indices
    r2 = layer(x, attr, return_routing=True).routing.indices
    assert not torch.equal(r1, r2)  # router noise (and dropout) act only while training


def test_dropout_mask_is_replayed_in_backward(hidden_mode):
    """Training-mode gradients equal a finite-difference estimate of the same random draw."""
    layer = _layer(C=6, E=4, dropout=0.5).double().train()
    x = torch.randn(1, 10, 6, dtype=torch.double, requires_grad=True)
    attr = torch.tensor([1])
    noise_state = torch.random.get_rng_state()

    def f(inp):
        torch.random.set_rng_state(noise_state)
        return layer(inp, attr).output

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)


def test_aux_loss_is_returned_when_enabled():
    layer = _layer(importance_weight=0.01, load_weight=0.01).train()
    out = layer(torch.randn(2, 64, 16), torch.tensor([0, 1]))
    assert out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert layer.router.w_gate.grad is not None
    assert layer.router.w_noise.grad is not None  # load loss flows through the noise scale


@pytest.mark.parametrize(
    "kwargs",
    [dict(embed_dim=0), dict(num_experts=0), dict(top_k=3, num_experts=2), dict(num_attributes=0),
     dict(dropout=1.0), dict(chunk_rows=0), dict(importance_weight=-1.0)],
)
def test_bad_arguments_raise(kwargs):
    args = dict(embed_dim=8) | kwargs
    with pytest.raises(ValueError):
        DMoE(**args)


def test_bad_attribute_raises():
    layer = _layer(A=3).eval()
    with pytest.raises(ValueError, match="attribute indices"):
        layer(torch.randn(1, 4, 16), torch.tensor([3]))
    with pytest.raises(ValueError, match="attr"):
        layer(torch.randn(2, 4, 16), torch.tensor([0]))


def test_bfloat16_autocast_runs():
    layer = _layer().eval()
    x = torch.randn(2, 10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, torch.tensor([0, 1])).output
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
