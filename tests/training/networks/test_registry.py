"""Behaviour every registered network shares: shapes, routing, attributes, round trips."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from training.networks import (
    DMoE,
    LayerRouting,
    SegmentationOutput,
    create_model,
    list_models,
    list_presets,
)

# (name, spatial_dims, input shape): tiny presets, small inputs.
CASES = [
    ("transunet", 2, (2, 1, 64, 64)),
    ("resunet", 2, (2, 1, 64, 64)),
    ("resunet", 3, (2, 1, 64, 32, 32)),
]
MOES = ("none", "moe", "dmoe")
IDS = [f"{n}-{d}d" for n, d, _ in CASES]


def _build(name, spatial_dims, moe="dmoe", **kw):
    torch.manual_seed(0)
    kw.setdefault("num_attributes", 3)
    return create_model(
        name, preset="tiny", spatial_dims=spatial_dims, moe=moe, out_channels=3, **kw
    )


def test_every_registered_model_is_covered():
    assert list_models() == ["resunet", "separate", "transunet"]
    # "separate" (one plain backbone per group, no routing) has its own tests:
    # tests/training/test_separate.py
    assert {n for n, _, _ in CASES} == set(list_models()) - {"separate"}
    for name in list_models():
        assert set(list_presets(name)) == {"paper", "small", "tiny"}


@pytest.mark.parametrize("moe", MOES)
@pytest.mark.parametrize(("name", "dims", "shape"), CASES, ids=IDS)
def test_forward_backward_smoke(name, dims, shape, moe):
    model = _build(name, dims, moe)
    model.train()
    x = torch.randn(shape)
    target = torch.randint(0, 3, (shape[0], *shape[2:]))
    out = model(x, torch.tensor([0, -1]), return_aux=True)
    assert isinstance(out, SegmentationOutput)
    assert out.logits.shape == (shape[0], 3, *shape[2:])
    assert out.routing is None and out.aux_loss.ndim == 0
    loss = F.cross_entropy(out.logits, target) + out.aux_loss
    loss.backward()
    assert torch.isfinite(loss)
    head = [p for n, p in model.named_parameters() if n.startswith("head")]
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)
    moes = [m for m in model.modules() if isinstance(m, DMoE)]
    assert (len(moes) == 0) == (moe == "none")
    for layer in moes:
        assert layer.experts.w1.grad is not None and layer.experts.w1.grad.abs().sum() > 0
        assert layer.num_attributes == (3 if moe == "dmoe" else 1)


@pytest.mark.parametrize(("name", "dims", "shape"), CASES, ids=IDS)
def test_plain_call_returns_logits_tensor(name, dims, shape):
    logits = _build(name, dims).eval()(torch.randn(shape))
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (shape[0], 3, *shape[2:])


@pytest.mark.parametrize(("name", "dims", "shape"), CASES, ids=IDS)
def test_routing_entries_are_valid_grids(name, dims, shape):
    model = _build(name, dims).eval()
    with torch.no_grad():
        out = model(torch.randn(shape), torch.tensor([1, 2]), return_routing=True)
    assert out.routing and all(isinstance(r, LayerRouting) for r in out.routing)
    for r in out.routing:
        grid = tuple(s // st for s, st in zip(shape[2:], r.grid_stride, strict=True))
        assert r.indices.shape == (shape[0], *grid, 2) == r.gates.shape
        assert r.indices.dtype == torch.long
        assert int(r.indices.min()) >= 0 and int(r.indices.max()) < 8
        assert (r.indices[..., 0] != r.indices[..., 1]).all()
        assert float(r.gates.min()) >= 0 and float(r.gates.max()) <= 1
        torch.testing.assert_close(r.gates.sum(-1), torch.ones(shape[0], *grid))


def _train_one_step(model, shape, attr):
    torch.manual_seed(1)
    x = torch.randn(shape)
    target = torch.randint(0, 3, (shape[0], *shape[2:]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    F.cross_entropy(model(x, attr), target).backward()
    opt.step()
    return x


@pytest.mark.parametrize("moe", MOES)
@pytest.mark.parametrize(("name", "dims", "shape"), CASES, ids=IDS)
def test_attribute_changes_output_only_for_dmoe(name, dims, shape, moe):
    model = _build(name, dims, moe, attribute_dropout=0.0)
    x = _train_one_step(model, shape, torch.tensor([0, 1]))
    model.eval()
    with torch.no_grad():
        out0 = model(x, torch.tensor([0, 0]))
        out1 = model(x, torch.tensor([1, 1]))
    if moe == "dmoe":
        assert (out0 - out1).abs().max() > 1e-5
    else:
        assert torch.equal(out0, out1)


@pytest.mark.parametrize(("name", "dims", "shape"), CASES, ids=IDS)
def test_unknown_attribute_paths(name, dims, shape):
    model = _build(name, dims)
    x = _train_one_step(model, shape, torch.tensor([0, -1]))
    model.eval()
    with torch.no_grad():
        none = model(x, None)
        unknown = model(x, torch.tensor([-1, -1]))
        known = model(x, torch.tensor([2, 2]))
    assert torch.isfinite(none).all()
    assert torch.equal(none, unknown)
    assert not torch.equal(none, known)
    with pytest.raises(ValueError, match="attribute"):
        model(x, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match=r"attr must have shape \(B,\)"):
        model(x, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize(("name", "dims", "shape"), CASES, ids=IDS)
def test_eval_is_deterministic(name, dims, shape):
    model = _build(name, dims).eval()
    x, attr = torch.randn(shape), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(model(x, attr), model(x, attr))


def test_attribute_dropout_same_decision_for_every_layer():
    model = _build("resunet", 2, attribute_dropout=0.5)
    seen: list[torch.Tensor] = []
    for layer in model.encoder_moe:
        layer.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    attr = torch.arange(16) % 3
    x = torch.randn(16, 1, 64, 64)
    model.train()
    with torch.no_grad():
        model(x, attr)
    assert len(seen) == 5 and all(torch.equal(s, seen[0]) for s in seen)
    dropped = seen[0] == -1
    assert 0 < int(dropped.sum()) < 16  # P(all or none of 16 dropped) ~ 3e-5
    assert torch.equal(seen[0][~dropped], attr[~dropped])
    seen.clear()
    model.eval()
    with torch.no_grad():
        model(x, attr)
    assert all(torch.equal(s, attr) for s in seen)
    with pytest.raises(ValueError, match="attribute_dropout"):
        _build("resunet", 2, attribute_dropout=1.5)


@pytest.mark.parametrize("moe", MOES)
@pytest.mark.parametrize(("name", "dims", "shape"), CASES, ids=IDS)
def test_model_kwargs_round_trip(name, dims, shape, moe):
    model = _build(name, dims, moe, num_experts=4, top_k=1).eval()
    kwargs = json.loads(json.dumps(model.model_kwargs))
    assert kwargs == model.model_kwargs
    assert kwargs["preset"] == "tiny" and kwargs["moe"] == moe and kwargs["spatial_dims"] == dims
    assert kwargs["moe_spec"]["num_experts"] == 4 and kwargs["moe_spec"]["top_k"] == 1
    assert kwargs["out_channels"] == 3 and "num_experts" not in kwargs
    rebuilt = create_model(model.model_name, **kwargs).eval()
    assert rebuilt.model_name == name and rebuilt.model_kwargs == model.model_kwargs
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x, attr = torch.randn(shape), torch.tensor([1, -1])
    with torch.no_grad():
        assert torch.equal(model(x, attr), rebuilt(x, attr))


def test_preset_values_are_overridable_and_recorded():
    model = create_model("transunet", preset="tiny", embed_dim=64, depth=2, num_heads=2)
    assert model.model_kwargs["embed_dim"] == 64 and model.model_kwargs["depth"] == 2
    assert len(model.encoder.blocks) == 2 and model.encoder.embed_dim == 64
    assert model.model_kwargs["img_size"] == 128  # untouched preset value


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(name="unet"), r"unknown model 'unet'.*resunet.*transunet"),
        (dict(name="resunet", preset="huge"), r"unknown preset 'huge'.*paper.*small.*tiny"),
        (dict(name="resunet", moe="sparse"), r"moe must be one of.*none.*moe.*dmoe"),
        (dict(name="resunet", channel=(1, 2)), r"does not take \['channel'\].*channels"),
        (dict(name="resunet", spatial_dims=4), r"spatial_dims must be one of \[2, 3\], got 4"),
        (dict(name="resunet", num_attributes=0), r"num_attributes.*0"),
        (dict(name="resunet", top_k=9), r"top_k"),
        (dict(name="transunet", spatial_dims=3), r"transunet is 2D only.*resunet"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model(**kwargs)
