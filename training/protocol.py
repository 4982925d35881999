"""Method names, the reference (paper) protocol, checkpoint selection rules and the loss
options a training run derives from its configuration.

- :data:`METHODS`: the benchmark's method names → ``FitConfig`` settings (the paper's rows:
  TransUNet, +MoE, +dMoE, +FEBS, +GroupDRO, +ADV, one separate model per group);
- :data:`PAPER_PROTOCOL`: what ``--protocol paper`` changes, each one a choice where the
  official code differs from our defaults (see :data:`PROTOCOL_TABLE`);
- :func:`selection_score`: the number ``--select`` maximises to pick ``best.safetensors``;
- :func:`loss_options`: the keyword arguments ``build_loss`` gets from a configuration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

METHODS: dict[str, dict[str, Any]] = {
    "none": {"moe": "none", "loss": "dicece"},
    "moe": {"moe": "moe", "loss": "dicece"},
    "dmoe": {"moe": "dmoe", "loss": "dicece"},
    "febs": {"moe": "none", "loss": "febs"},
    "groupdro": {"moe": "none", "loss": "groupdro"},
    "adv": {"moe": "none", "loss": "adv"},
    "separate": {"moe": "none", "loss": "dicece", "arch": "separate"},
}
"""Benchmark method → FitConfig fields it sets (``separate`` keeps ``--arch`` as backbone)."""

METHOD_TITLES = {"none": "TransUNet", "moe": "+MoE", "dmoe": "+dMoE", "febs": "+FEBS",
                 "groupdro": "+GroupDRO", "adv": "+ADV", "separate": "separate per group"}

SELECT_RULES = ("es_dice", "dice", "worst_group", "last")
DEFAULT_SELECT = "dice"

PROTOCOLS = ("ours", "paper")
PAPER_PROTOCOL: dict[str, Any] = {
    "dice": "reference",
    "intensity": "scale255",
    "center_crop": 512,
    "vit_drop_rate": 0.1,
    "router_bias": True,
    "expert_dropout_position": "output",
}
"""``--protocol paper``: FitConfig/model settings taken from the official code."""

PROTOCOL_TABLE = [
    ("Dice loss", "MONAI form: per sample, Σp + Σt denominator",
     "squared (Σp² + Σt²), pooled over the batch per class",
     "per-sample Dice weights every image equally, so small structures in one image are not "
     "drowned by the rest of the batch"),
    ("intensity", "min-max per image", "fixed /255",
     "min-max also normalises 16-bit images and CT; /255 assumes 8-bit files"),
    ("centre crop", "none (whole image resized)", "512 px centre crop",
     "a fixed crop assumes FairSeg's 664 px SLO framing; other data would lose content"),
    ("ViT dropout", "0.0", "0.1", "small data sets in our tests trained faster without it"),
    ("router", "no bias, zero init (Shazeer et al.)", "bias, PyTorch default init",
     "zero init makes routing start uniform; noise breaks ties"),
    ("expert dropout", "after the ReLU (hidden layer)", "after the second linear layer",
     "dropout on the hidden units is the usual MLP placement (timm Mlp)"),
]
"""(setting, ours, reference, why ours differs) rows for the README."""


def check_select(select: str) -> str:
    if select not in SELECT_RULES:
        raise ValueError(f"--select must be one of {list(SELECT_RULES)}, got {select!r}")
    return select


def worst_group_dice(summary: Mapping[str, Any]) -> float:
    """The lowest mean Dice of a known group (``unknown`` excluded) in a fairness summary."""
    groups = summary["mean"].get("groups") or {}
    values = [v["dice"] for g, v in groups.items() if g != "unknown"]
    return min(values) if values else summary["mean"]["dice"]


def selection_score(select: str, summary: Mapping[str, Any], epoch: int) -> float:
    """The number ``--select`` maximises over validations (ties keep the earlier epoch,
    except ``last``, whose score is the epoch itself)."""
    check_select(select)
    mean = summary["mean"]
    if select == "es_dice":
        return float(mean["es_dice"])
    if select == "dice":
        return float(mean["dice"])
    if select == "worst_group":
        return float(worst_group_dice(summary))
    return float(epoch)


def loss_options(config: Any, model: Any, train_groups: Sequence[int] | None,
                 num_groups: int) -> dict[str, Any]:
    """``build_loss`` keyword arguments for ``config.loss``.

    Args:
        config: a ``FitConfig`` (``loss``, ``dice``, ``febs_missing``, ``adv_weight``).
        model: the network (ADV reads its bottleneck width).
        train_groups: training samples' group indices (−1 = unknown), for ADV's balance.
        num_groups: attribute vocabulary size.
    """
    loss = config.loss
    dice = getattr(config, "dice", "monai")
    if loss == "dicece":
        return {"dice": dice}
    if loss == "febs":
        return {"missing": getattr(config, "febs_missing", "reference")}
    if loss == "adv":
        from .adversarial import bottleneck_channels

        counts = None
        if train_groups is not None:
            counts = [0.0] * num_groups
            for g in train_groups:
                if 0 <= g < num_groups:
                    counts[g] += 1
        return {"in_features": bottleneck_channels(model),
                "weight": getattr(config, "adv_weight", 0.1), "group_counts": counts,
                "dice": dice}
    return {}


def protocol_changes(protocol: str) -> dict[str, Any]:
    """Settings ``--protocol`` changes (empty for ``ours``)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    return dict(PAPER_PROTOCOL) if protocol == "paper" else {}


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def build_separate_model(config: Any, in_channels: int, num_classes: int, num_attributes: int):
    """``--arch separate``: one backbone per attribute value (``training.networks`` name
    ``"separate"``); ``--model-kwargs`` may name the ``backbone`` (default transunet) and
    its arguments."""
    from .fitting.preparation import DEFAULT_IMAGE_SIZE
    from .networks import create_model

    kwargs = dict(config.model_kwargs)
    backbone = kwargs.pop("backbone", "transunet")
    dropout = kwargs.pop("attribute_dropout", 0.0)
    if backbone == "transunet" and config.spatial_dims == 2:
        kwargs.setdefault("img_size", config.image_size or DEFAULT_IMAGE_SIZE["transunet"])
    return create_model("separate", preset=config.preset, spatial_dims=config.spatial_dims,
                        in_channels=in_channels, out_channels=num_classes, moe=config.moe,
                        num_attributes=max(num_attributes, 1), backbone=backbone,
                        backbone_kwargs=kwargs, attribute_dropout=dropout)
