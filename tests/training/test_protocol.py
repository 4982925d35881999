"""--protocol paper and its parts: router bias, expert dropout position, ViT dropout,
reference Dice, fixed /255 intensity, 512 centre crop; --select rules."""

from __future__ import annotations

import pytest
import torch

from training.fitting import FitConfig
from training.networks import create_model
from training.networks.blocks.routing import AttributeRouterBank
from training.protocol import selection_score


def test_router_bias_option_has_bias_and_default_init():
    plain = AttributeRouterBank(16, num_experts=4, num_attributes=3)
    assert not hasattr(plain, "b_gate") and plain.w_gate.abs().sum() == 0  # zero init
    torch.manual_seed(0)
    biased = AttributeRouterBank(16, num_experts=4, num_attributes=3, router_bias=True)
    bound = 1 / 16 ** 0.5
    assert biased.b_gate.shape == (4, 4)  # 3 attribute routers + unknown, E = 4
    assert 0 < biased.w_gate.abs().max() <= bound and biased.b_gate.abs().max() <= bound
    x, attr = torch.zeros(2, 5, 16), torch.tensor([0, 2])
    out = biased.eval()(x, attr)  # zero tokens: the routing is the bias alone
    expected = biased.b_gate[attr].topk(biased.top_k, dim=-1).indices
    assert torch.equal(out.indices[:, 0].sort(-1).values, expected.sort(-1).values)


def test_paper_protocol_sets_every_reference_choice():
    cfg = FitConfig(data="x.csv", attribute="race", protocol="paper")
    assert cfg.dice == "reference" and cfg.intensity == "scale255" and cfg.center_crop == 512
    assert cfg.model_kwargs["drop_rate"] == 0.1
    assert cfg.model_kwargs["moe_spec"] == {"router_bias": True, "dropout_position": "output"}
    model = create_model("transunet", preset="tiny", in_channels=1, out_channels=3, moe="dmoe",
                         num_attributes=3, img_size=32, embed_dim=32, depth=2, num_heads=2,
                         **cfg.model_kwargs)
    layer = model.encoder_moe[0]
    assert layer.router.router_bias and layer.experts.dropout_position == "output"
    ours = FitConfig(data="x.csv", attribute="race")
    assert (ours.dice, ours.intensity, ours.center_crop, ours.model_kwargs) == (
        "monai", None, None, {})
    assert (ours.val_fraction, ours.test_fraction, ours.select) == (0.1, 0.1, "dice")
    # explicit choices win over the protocol
    mine = FitConfig(data="x.csv", attribute="race", protocol="paper", center_crop=400,
                     model_kwargs={"drop_rate": 0.0})
    assert mine.center_crop == 400 and mine.model_kwargs["drop_rate"] == 0.0
    with pytest.raises(ValueError, match="select"):
        FitConfig(data="x.csv", attribute="race", select="best")


def test_selection_rules():
    summary = {"mean": {"dice": 0.8, "es_dice": 0.6, "groups": {
        "A": {"dice": 0.9}, "B": {"dice": 0.5}, "unknown": {"dice": 0.1}}}}
    assert selection_score("dice", summary, 3) == 0.8
    assert selection_score("es_dice", summary, 3) == 0.6
    assert selection_score("worst_group", summary, 3) == 0.5  # unknown is not a group
    assert selection_score("last", summary, 7) == 7


# -- explicit flags win over --protocol, for every setting the protocol controls -------------
def _config(*flags, parse=None):
    from training.fit import build_parser

    argv = ["--data", "x.csv", "--attribute", "race", *flags]
    args = parse(build_parser(), argv) if parse else build_parser().parse_args(argv)
    return FitConfig(**{k: v for k, v in vars(args).items() if k != "config"})


PROTOCOL_CASES = [  # setting, read it from a FitConfig, explicit flags, explicit value
    ("dice", lambda c: c.dice, ["--dice", "monai"], "monai"),
    ("intensity", lambda c: c.intensity, ["--intensity", "minmax"], "minmax"),
    ("center_crop", lambda c: c.center_crop, ["--center-crop", "400"], 400),
    ("vit_drop_rate", lambda c: c.model_kwargs["drop_rate"],
     ["--model-kwargs", '{"drop_rate": 0.0}'], 0.0),
    ("router_bias", lambda c: c.model_kwargs["moe_spec"]["router_bias"],
     ["--model-kwargs", '{"moe_spec": {"router_bias": false}}'], False),
    ("expert_dropout_position", lambda c: c.model_kwargs["moe_spec"]["dropout_position"],
     ["--model-kwargs", '{"moe_spec": {"dropout_position": "hidden"}}'], "hidden"),
]


def test_every_protocol_setting_has_a_flag_case():
    from training.protocol import PAPER_PROTOCOL, PROTOCOL_FLAGS

    assert set(PROTOCOL_FLAGS) == set(PAPER_PROTOCOL) == {c[0] for c in PROTOCOL_CASES}


@pytest.mark.parametrize("key,read,flags,mine", PROTOCOL_CASES,
                         ids=[c[0] for c in PROTOCOL_CASES])
def test_explicit_flag_wins_over_paper_protocol(key, read, flags, mine):
    from training.protocol import PAPER_PROTOCOL

    paper = PAPER_PROTOCOL[key]
    assert mine != paper  # the explicit value is distinguishable from the protocol's
    cfg = _config("--protocol", "paper")  # no flag: the protocol's value, reported as applied
    assert read(cfg) == paper
    assert cfg.protocol_report.applied == PAPER_PROTOCOL and not cfg.protocol_report.kept
    cfg = _config("--protocol", "paper", *flags)  # the flag wins; the rest stays the protocol's
    assert read(cfg) == mine
    assert cfg.protocol_report.kept == {key: (mine, paper)}
    assert set(cfg.protocol_report.applied) == set(PAPER_PROTOCOL) - {key}
    lines = cfg.protocol_report.lines()
    assert len(lines) == 2 and flags[0] in lines[1] and repr(mine) in lines[1]
    ours = _config(*flags)  # --protocol ours: the flag as given, nothing reported
    assert read(ours) == mine and ours.protocol_report.lines() == []


def test_protocol_resolution_is_idempotent_and_ours_keeps_defaults():
    import dataclasses

    ours = _config()
    assert (ours.dice, ours.intensity, ours.center_crop, ours.model_kwargs) == (
        "monai", None, None, {})
    cfg = _config("--protocol", "paper", "--dice", "monai")
    again = dataclasses.replace(cfg)  # e.g. training.benchmark's per-method configs
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
    assert again.protocol_report.kept == {"dice": ("monai", "reference")}
    # settings that do not apply are left alone: 3D (no crop/intensity), no MoE (no router)
    vol = FitConfig(data="x.csv", attribute="race", protocol="paper", spatial_dims=3,
                    arch="resunet", moe="none")
    assert (vol.center_crop, vol.intensity, vol.model_kwargs) == (None, None, {})
    assert set(vol.protocol_report.applied) == {"dice"}
    # separate with TransUNet group models gets the ViT dropout too
    sep = FitConfig(data="x.csv", attribute="race", protocol="paper", arch="separate",
                    moe="none")
    assert sep.model_kwargs == {"drop_rate": 0.1}


def test_explicit_value_from_config_file_wins_over_protocol(tmp_path):
    from training.cli import parse_with_config

    path = tmp_path / "run.yaml"
    path.write_text("protocol: paper\ndice: monai\n")
    cfg = _config("--config", str(path), parse=lambda p, argv: parse_with_config(p, argv))
    assert cfg.dice == "monai" and cfg.intensity == "scale255"
    assert cfg.protocol_report.kept == {"dice": ("monai", "reference")}
