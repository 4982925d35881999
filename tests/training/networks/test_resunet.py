"""ResUNet: 2D/3D stages, layer-wise dMoE per stage, input size rules."""

from __future__ import annotations

import pytest
import torch

from training.networks import DMoE, ResUNet, create_model

SHAPES = {2: (2, 1, 64, 64), 3: (1, 1, 64, 32, 32)}


def _tiny(spatial_dims, **kw):
    torch.manual_seed(0)
    kw.setdefault("num_attributes", 4)
    return create_model("resunet", preset="tiny", spatial_dims=spatial_dims, **kw)


def test_paper_preset_channels_match_table5():
    assert tuple(ResUNet.presets["paper"]["channels"]) == (48, 48, 96, 192, 384)


@pytest.mark.parametrize("dims", [2, 3])
def test_layerwise_moe_after_each_stage(dims):
    shape = SHAPES[dims]
    model = _tiny(dims, in_channels=1, out_channels=4).eval()
    layers = [m for m in model.modules() if isinstance(m, DMoE)]
    assert [m.embed_dim for m in layers] == [8, 16, 32, 48, 64]  # one per stage, own width
    assert all(m.num_attributes == 4 for m in layers)
    with torch.no_grad():
        out = model(torch.randn(shape), torch.tensor([3] * shape[0]), return_routing=True)
    assert out.logits.shape == (shape[0], 4, *shape[2:])
    assert [r.name for r in out.routing] == [f"encoder.stage{i}" for i in range(5)]
    for i, r in enumerate(out.routing):
        stride = 2 ** (i + 1)
        assert r.grid_stride == (stride,) * dims
        assert r.indices.shape == (shape[0], *(s // stride for s in shape[2:]), 2)


@pytest.mark.parametrize("dims", [2, 3])
def test_moe_layer_changes_the_feature_map(dims):
    model = _tiny(dims).eval()
    x = torch.randn(SHAPES[dims])
    with torch.no_grad():
        with_moe = model(x)
        for layer in model.encoder_moe:  # silence the experts: y = x + 0
            layer.experts.w2.zero_()
            layer.experts.b2.zero_()
        silent = model(x)
        plain = _tiny(dims, moe="none")
        plain.load_state_dict(
            {k: v for k, v in model.state_dict().items() if not k.startswith("encoder_moe")}
        )
        assert torch.allclose(silent, plain.eval()(x), atol=1e-5)
    assert not torch.allclose(with_moe, silent, atol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_multichannel_input_and_batch_norm(dims):
    shape = (2, 3, *SHAPES[dims][2:])
    model = _tiny(dims, in_channels=3, out_channels=2, norm="batch").train()
    out = model(torch.randn(shape), torch.tensor([0, 1]))
    assert out.shape == (2, 2, *shape[2:])


def test_sizes_must_be_multiples_of_32():
    model = _tiny(2)
    with pytest.raises(ValueError, match="multiple of 32.*DivisiblePad"):
        model(torch.randn(1, 1, 64, 48))
    with pytest.raises(ValueError, match="multiple of 32"):
        _tiny(3)(torch.randn(1, 1, 64, 64, 40))
    # A 1-voxel bottleneck cannot be instance-normalised: clear error, batch norm works.
    with pytest.raises(ValueError, match="single voxel.*norm='batch'"):
        model(torch.randn(1, 1, 32, 32))
    assert _tiny(2, norm="batch").eval()(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_bad_inputs_and_arguments():
    with pytest.raises(ValueError, match=r"expected images \(B, 1, H, W, D\)"):
        _tiny(3)(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"expected images \(B, 1, H, W\)"):
        _tiny(2)(torch.randn(1, 2, 64, 64))
    for kw, match in [
        (dict(channels=(8, 16, 32, 64)), "channels must be 5 positive ints"),
        (dict(channels=(8, 16, 32, 64, 0)), "channels must be 5 positive ints"),
        (dict(norm="layer"), "norm must be one of"),
        (dict(num_res_units=0), "num_res_units must be >= 1"),
        (dict(out_channels=0), "out_channels"),
    ]:
        with pytest.raises(ValueError, match=match):
            _tiny(2, **kw)


def test_grad_checkpoint_gives_the_same_gradients():
    """Recomputing stage activations must not change the loss or any gradient."""
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = create_model("resunet", preset="tiny", spatial_dims=3, moe="dmoe",
                             num_attributes=2, grad_checkpoint=checkpointed).train()
        assert model.model_kwargs["grad_checkpoint"] is False  # never stored as on
        torch.manual_seed(1)
        x = torch.randn(2, 1, 64, 32, 32)
        loss = model(x, torch.tensor([0, 1])).square().mean()
        loss.backward()
        grads.append([loss.detach()] + [p.grad.clone() for p in model.parameters()
                                        if p.grad is not None])
    assert len(grads[0]) == len(grads[1])
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
