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
