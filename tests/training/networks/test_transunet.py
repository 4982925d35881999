"""TransUNet: dMoE sharing and placement, position embedding, pretrained weights."""

from __future__ import annotations

import time

import pytest
import torch

from training.networks import DMoE, TransUNet, create_model


def _tiny(**kw):
    torch.manual_seed(0)
    kw.setdefault("num_attributes", 3)
    return create_model("transunet", preset="tiny", **kw)


def _n_moe(model):
    return len({id(m) for m in model.modules() if isinstance(m, DMoE)})


def test_paper_preset_is_vit_b16():
    kw = TransUNet.presets["paper"]
    assert (kw["embed_dim"], kw["depth"], kw["num_heads"], kw["img_size"]) == (768, 12, 12, 224)
    assert kw["embed_dim"] * kw["mlp_ratio"] == 3072
    assert tuple(kw["decoder_channels"]) == (256, 128, 64, 16)


@pytest.mark.parametrize(
    ("sharing", "placement", "names", "n_layers"),
    [
        ("shared", "encoder", [f"encoder.block{i}" for i in range(4)], 1),
        ("layerwise", "encoder", [f"encoder.block{i}" for i in range(4)], 4),
        ("shared", "decoder", [f"decoder.stage{j}" for j in range(4)], 4),
        ("shared", "both", [f"encoder.block{i}" for i in range(4)]
         + [f"decoder.stage{j}" for j in range(4)], 5),
    ],
)
def test_moe_sharing_and_placement(sharing, placement, names, n_layers):
    model = _tiny(moe_sharing=sharing, moe_placement=placement).eval()
    assert _n_moe(model) == n_layers
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64), torch.tensor([0, 1]), return_routing=True)
    assert out.logits.shape == (2, 2, 64, 64)
    assert [r.name for r in out.routing] == names
    for r in out.routing:
        if r.name.startswith("encoder"):
            assert r.grid_stride == (16, 16) and r.indices.shape == (2, 4, 4, 2)
        else:
            stride = 8 >> int(r.name[-1])
            assert r.grid_stride == (stride, stride)
            assert r.indices.shape == (2, 64 // stride, 64 // stride, 2)


def test_shared_layer_is_one_module_applied_after_every_block():
    shared, layerwise = _tiny(), _tiny(moe_sharing="layerwise")
    per_layer = sum(p.numel() for p in shared.encoder_moe.parameters())
    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(layerwise) - count(shared) == 3 * per_layer
    calls = []
    shared.encoder_moe[0].register_forward_hook(lambda *a: calls.append(1))
    shared(torch.randn(1, 1, 32, 32))
    assert len(calls) == 4


def test_aux_loss_sums_every_application():
    model = _tiny(importance_weight=1.0, load_weight=1.0).train()
    out = model(torch.randn(2, 1, 32, 32), torch.tensor([0, 1]), return_aux=True)
    assert out.aux_loss.ndim == 0 and out.aux_loss.requires_grad
    assert float(out.aux_loss.detach()) > 0
    assert out.routing is None
    plain = _tiny(moe="none")(torch.randn(1, 1, 32, 32), return_aux=True)
    assert float(plain.aux_loss) == 0.0


@pytest.mark.parametrize("size", [32, 48, 128, 160])
def test_other_input_sizes_interpolate_position_embedding(size):
    model = _tiny(moe="none").eval()
    assert model.encoder.pos_embed.shape == (1, 64, 96)  # tiny: img_size 128
    with torch.no_grad():
        out = model(torch.randn(1, 1, size, size))
    assert out.shape == (1, 2, size, size)


def test_bad_inputs_and_arguments():
    model = _tiny()
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        model(torch.randn(1, 1, 40, 40))
    with pytest.raises(ValueError, match=r"expected images \(B, 1, H, W\)"):
        model(torch.randn(1, 3, 64, 64))
    for kw, match in [
        (dict(moe_sharing="per-block"), "moe_sharing must be one of"),
        (dict(moe_placement="skip"), "moe_placement must be one of"),
        (dict(decoder_channels=(8, 8)), "decoder_channels must be 4"),
        (dict(norm="group"), "norm must be one of"),
        (dict(embed_dim=90), "divisible by num_heads"),
    ]:
        with pytest.raises(ValueError, match=match):
            _tiny(**kw)


def test_pretrained_fails_fast_when_offline(monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # no cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def silent_firewall(*args, **kwargs):  # a connection that never answers
        time.sleep(60)

    monkeypatch.setattr(socket, "create_connection", silent_firewall)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"could not fetch.*pretrained=False.*pretrained_path"):
        _tiny(pretrained=True)
    assert time.monotonic() - start < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set.*pretrained=False"):
        _tiny(pretrained=True)


def test_pretrained_path_loads_timm_weights(tmp_path):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=96, depth=4, num_heads=4,
                            num_classes=0)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    model = _tiny(pretrained_path=str(path))
    enc = model.encoder
    assert torch.equal(enc.blocks[3].attn.qkv.weight, vit.blocks[3].attn.qkv.weight)
    assert torch.equal(enc.norm.weight, vit.norm.weight)
    # RGB filters summed for a 1-channel input (timm's adapt_input_conv).
    rgb = vit.patch_embed.proj.weight
    torch.testing.assert_close(enc.patch_embed.proj.weight, rgb.sum(1, keepdim=True))
    assert enc.pos_embed.shape == (1, 64, 96)  # 14x14 (+cls) resampled to 8x8
    assert model.model_kwargs["pretrained"] is False
    assert model.model_kwargs["pretrained_path"] is None
    with pytest.raises(ValueError, match=r"do not fit.*embed_dim=64.*pretrained=False"):
        _tiny(embed_dim=64, pretrained_path=str(path))
    with pytest.raises(ValueError, match="not found"):
        _tiny(pretrained_path=str(tmp_path / "missing.safetensors"))


def _save_big_vision_npz(vit, path):
    """Write a timm ViT in the big_vision/JAX ``.npz`` layout timm's loader reads."""
    import numpy as np

    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    D = sd["norm.weight"].shape[0]
    H = vit.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    for i in range(len(vit.blocks)):
        p, b = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        for jax, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{p}{jax}/scale"] = sd[f"{b}{ours}.weight"]
            w[f"{p}{jax}/bias"] = sd[f"{b}{ours}.bias"]
        qkv_w = sd[b + "attn.qkv.weight"].reshape(3, D, D)
        qkv_b = sd[b + "attn.qkv.bias"].reshape(3, D)
        attn = p + "MultiHeadDotProductAttention_1/"
        for j, n in enumerate(("query", "key", "value")):
            w[f"{attn}{n}/kernel"] = qkv_w[j].T.reshape(D, H, D // H)
            w[f"{attn}{n}/bias"] = qkv_b[j].reshape(H, D // H)
        w[attn + "out/kernel"] = sd[b + "attn.proj.weight"].T.reshape(H, D // H, D)
        w[attn + "out/bias"] = sd[b + "attn.proj.bias"]
        for j, n in ((0, "fc1"), (1, "fc2")):
            w[f"{p}MlpBlock_3/Dense_{j}/kernel"] = sd[f"{b}mlp.{n}.weight"].T
            w[f"{p}MlpBlock_3/Dense_{j}/bias"] = sd[f"{b}mlp.{n}.bias"]
    np.savez(path, **w)


def test_pretrained_path_reads_big_vision_npz(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(4)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=4,
                            num_classes=0)
    path = tmp_path / "vit.npz"
    _save_big_vision_npz(vit, path)
    model = _tiny(embed_dim=64, depth=2, pretrained_path=str(path))
    enc = model.encoder
    torch.testing.assert_close(enc.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    torch.testing.assert_close(enc.blocks[0].mlp.fc2.bias, vit.blocks[0].mlp.fc2.bias)
    with pytest.raises(ValueError, match="unsupported weights file"):
        (tmp_path / "vit.pth").write_bytes(b"\x80\x04")
        _tiny(pretrained_path=str(tmp_path / "vit.pth"))
