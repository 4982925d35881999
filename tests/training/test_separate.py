"""--arch separate: one backbone per group, routed by the attribute, one checkpoint file."""

from __future__ import annotations

import pytest
import torch

from training.checkpoint import load_checkpoint, save_checkpoint
from training.networks import create_model
from training.profile import profile_model

SMALL = {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}


def _model(groups=3, dropout=0.0):
    torch.manual_seed(0)
    return create_model("separate", preset="tiny", in_channels=1, out_channels=3, moe="none",
                        num_attributes=groups, backbone_kwargs=SMALL,
                        attribute_dropout=dropout)


def test_known_attribute_uses_its_group_model_unknown_the_mean():
    model = _model().eval()
    x = torch.randn(5, 1, 32, 32)
    attr = torch.tensor([0, 2, -1, 1, 2])
    with torch.no_grad():
        out = model(x, attr)
        each = [net(x) for net in model.backbones]
    assert out.shape == (5, 3, 32, 32)
    for i, a in enumerate(attr.tolist()):
        expected = torch.stack(each).mean(0)[i] if a < 0 else each[a][i]
        assert torch.allclose(out[i], expected, atol=1e-5), (i, a)
    with torch.no_grad():  # attr None = every sample unknown
        assert torch.allclose(model(x), torch.stack(each).mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="attribute indices"):
        model(x, torch.tensor([0, 1, 3, 0, 0]))


def test_training_reaches_only_the_groups_backbones():
    model = _model().train()
    x = torch.randn(4, 1, 32, 32)
    model(x, torch.tensor([0, 0, 2, 2])).square().mean().backward()
    grads = [sum(p.grad.abs().sum().item() for p in net.parameters() if p.grad is not None)
             for net in model.backbones]
    assert grads[0] > 0 and grads[2] > 0 and grads[1] == 0


def test_one_checkpoint_file_round_trip(tmp_path):
    model = _model().eval()
    path = save_checkpoint(model, tmp_path / "sep.safetensors", class_names=["bg", "a", "b"])
    assert [p.name for p in tmp_path.iterdir()] == ["sep.safetensors"]
    loaded, meta = load_checkpoint(path)
    assert meta["model"]["name"] == "separate" and len(loaded.backbones) == 3
    x, attr = torch.randn(3, 1, 32, 32), torch.tensor([1, -1, 0])
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(x, attr), model(x, attr), atol=1e-6)


def test_profile_reports_separate_as_group_multiple_of_the_backbone():
    result = profile_model("transunet", "tiny", num_attributes=3)  # tiny: 128 x 128
    assert result["separate"]["params"] == 3 * result["none"]["params"]
    assert result["separate"]["gflops"] == pytest.approx(3 * result["none"]["gflops"])
    assert result["separate"]["gflops_per_patient"] == pytest.approx(result["none"]["gflops"])
    # the analytic total is what running every group model costs (the unknown path)
    from training.flops import count_flops, count_params

    real = create_model("separate", preset="tiny", in_channels=1, out_channels=2, moe="none",
                        num_attributes=3, backbone_kwargs={"img_size": 128})
    assert count_params(real) == result["separate"]["params"]
    # (counted on the same device: SDPA attention is counted differently on meta and CPU)
    one = count_flops(real.backbones[0], (1, 1, 128, 128)).total
    assert count_flops(real, (1, 1, 128, 128)).total == 3 * one


# -- --attribute-dropout for one model per group --------------------------------------------
def _separate_config(**kw):
    from training.fitting import FitConfig

    return FitConfig(data="x.csv", attribute="race", arch="separate", moe="none",
                     image_size=32, model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2},
                     **kw)


def test_separate_attribute_dropout_defaults_to_zero_and_honours_explicit_values():
    from training.fitting import FitConfig, build_model
    from training.fitting.config import saved_config
    from training.protocol import build_separate_model

    build = lambda cfg: build_separate_model(cfg, 1, 3, 3)  # noqa: E731
    # default: each group model trained on its own group only (the paper's baseline)
    assert build(_separate_config()).attribute_dropout == 0.0
    assert saved_config(_separate_config())["attribute_dropout"] == 0.0
    # the flag (it was ignored before) and --model-kwargs are honoured
    assert build(_separate_config(attribute_dropout=0.3)).attribute_dropout == 0.3
    cfg = _separate_config()
    cfg.model_kwargs = {**cfg.model_kwargs, "attribute_dropout": 0.2}
    assert build(cfg).attribute_dropout == 0.2
    # dMoE keeps its default 0.1 (trains the unknown router)
    dmoe = FitConfig(data="x.csv", attribute="race", image_size=32,
                     model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2})
    assert build_model(dmoe, 1, 3, 3).attribute_dropout == 0.1
    assert saved_config(dmoe)["attribute_dropout"] == 0.1
    with pytest.raises(ValueError, match="attribute-dropout"):
        _separate_config(attribute_dropout=1.5)


def test_benchmark_separate_run_keeps_zero_attribute_dropout(tmp_path):
    from training.benchmark import method_config
    from training.fitting import FitConfig
    from training.protocol import attribute_dropout_for

    base = FitConfig(data="x.csv", attribute="race")  # dMoE defaults
    assert attribute_dropout_for(method_config(base, "dmoe", 0, tmp_path)) == 0.1
    assert attribute_dropout_for(method_config(base, "separate", 0, tmp_path)) == 0.0
    explicit = FitConfig(data="x.csv", attribute="race", attribute_dropout=0.25)
    assert attribute_dropout_for(method_config(explicit, "separate", 0, tmp_path)) == 0.25


def test_attribute_dropout_trains_every_group_model_through_the_unknown_path():
    """Dropped samples are segmented by the mean of all group models, so with dropout 1
    a batch of group 0 alone reaches every backbone; with 0 only backbone 0."""
    x, attr = torch.randn(2, 1, 32, 32), torch.tensor([0, 0])
    for p, reached in ((0.0, [True, False, False]), (1.0, [True, True, True])):
        model = _model(dropout=p).train()
        model(x, attr).square().mean().backward()
        assert [any(q.grad is not None and q.grad.abs().sum() > 0 for q in net.parameters())
                for net in model.backbones] == reached, p
