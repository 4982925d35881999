"""Method names, the reference (paper) protocol, checkpoint selection rules and the loss
options a training run derives from its configuration.

- :data:`METHODS`: the benchmark's method names → ``FitConfig`` settings (the paper's rows:
  TransUNet, +MoE, +dMoE, +FEBS, +GroupDRO, +ADV, one separate model per group);
- :data:`PAPER_PROTOCOL`: what ``--protocol paper`` changes, each one a choice where the
  official code differs from our defaults (see :data:`PROTOCOL_TABLE`);
  :func:`apply_protocol` fills in the settings no flag set (explicit flags win) and reports
  which were applied and which overridden;
- :func:`attribute_dropout_for`: the ``--attribute-dropout`` in effect (0 for ``separate``);
- :func:`selection_score`: the number ``--select`` maximises to pick ``best.safetensors``;
- :func:`loss_options`: the keyword arguments ``build_loss`` gets from a configuration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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


PROTOCOL_FLAGS = {
    "dice": "--dice",
    "intensity": "--intensity",
    "center_crop": "--center-crop",
    "vit_drop_rate": "--model-kwargs drop_rate",
    "router_bias": "--model-kwargs moe_spec.router_bias",
    "expert_dropout_position": "--model-kwargs moe_spec.dropout_position",
}
"""Each :data:`PAPER_PROTOCOL` setting → the flag that sets it explicitly (and then wins)."""

OUR_DICE = "monai"


@dataclass(frozen=True)
class ProtocolReport:
    """What :func:`apply_protocol` did: ``applied`` — setting → the protocol's value, taken
    because no flag set it (or a flag gave the same value); ``kept`` — setting → ``(explicit
    value, protocol value)`` where an explicit flag overrode the protocol."""

    protocol: str
    applied: dict[str, Any] = field(default_factory=dict)
    kept: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """Log lines (none for ``--protocol ours``)."""
        out = []
        if self.applied:
            out.append(f"--protocol {self.protocol}: applied "
                       + ", ".join(f"{k}={v!r}" for k, v in self.applied.items()))
        if self.kept:
            out.append(f"--protocol {self.protocol}: explicit flags override it: "
                       + ", ".join(f"{PROTOCOL_FLAGS[k]} {mine!r} (protocol: {theirs!r})"
                                   for k, (mine, theirs) in self.kept.items()))
        return out


def transunet_backbone(arch: str, model_kwargs: Mapping[str, Any]) -> bool:
    """True when the network (or, for ``separate``, each group model) is a TransUNet."""
    return arch == "transunet" or (arch == "separate"
                                   and model_kwargs.get("backbone", "transunet") == "transunet")


def apply_protocol(config: Any) -> ProtocolReport:
    """Fill the settings of ``config`` that no flag set with ``config.protocol``'s choices.

    A setting counts as unset when its field is ``None`` (``dice``, ``intensity``,
    ``center_crop``) or its key is absent from ``model_kwargs`` (``drop_rate``;
    ``moe_spec`` ``router_bias``/``dropout_position``). Explicit values always win; a
    ``dice`` left unset under ``--protocol ours`` becomes ``"monai"``. Only settings that
    apply to the run are touched: intensity and crop in 2D, ViT dropout for TransUNets,
    router and expert dropout with ``--moe moe|dmoe``. Mutates ``config`` (its ``dice``,
    ``intensity``, ``center_crop``, ``model_kwargs``); idempotent.

    Raises:
        ValueError: unknown ``config.protocol``.
    """
    paper = protocol_changes(config.protocol)
    applied: dict[str, Any] = {}
    kept: dict[str, tuple[Any, Any]] = {}

    def choose(key: str, current: Any, unset: bool) -> Any:
        if unset or current == paper[key]:
            applied[key] = paper[key]
            return paper[key]
        kept[key] = (current, paper[key])
        return current

    if paper:
        config.dice = choose("dice", config.dice, config.dice is None)
        if config.spatial_dims == 2:
            config.intensity = choose("intensity", config.intensity, config.intensity is None)
            config.center_crop = choose("center_crop", config.center_crop,
                                        config.center_crop is None)
        kwargs = dict(config.model_kwargs)
        if transunet_backbone(config.arch, kwargs):
            kwargs["drop_rate"] = choose("vit_drop_rate", kwargs.get("drop_rate"),
                                         "drop_rate" not in kwargs)
        if config.moe != "none":
            spec = kwargs.get("moe_spec") or {}
            spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
            for key, name in (("router_bias", "router_bias"),
                              ("expert_dropout_position", "dropout_position")):
                spec[name] = choose(key, spec.get(name), name not in spec)
            kwargs["moe_spec"] = spec
        config.model_kwargs = kwargs
    if config.dice is None:
        config.dice = OUR_DICE
    return ProtocolReport(config.protocol, applied, kept)


DMOE_ATTRIBUTE_DROPOUT = 0.1


def attribute_dropout_for(config: Any) -> float:
    """The ``--attribute-dropout`` in effect: the explicit value, else 0.1 (trains dMoE's
    unknown-attribute router) — but 0 for ``--arch separate``.

    One model per group routes an unknown attribute to the mean of the group models, which
    needs no training; a share ``p > 0`` would also train *every* group model on ``p`` of
    the other groups' samples (through that mean), so the paper's baseline — each model
    trained on its own group — is ``p = 0``. Given explicitly, ``p`` is honoured.
    """
    if config.attribute_dropout is not None:
        return float(config.attribute_dropout)
    return 0.0 if config.arch == "separate" else DMOE_ATTRIBUTE_DROPOUT


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def build_separate_model(config: Any, in_channels: int, num_classes: int, num_attributes: int):
    """``--arch separate``: one backbone per attribute value (``training.networks`` name
    ``"separate"``); ``--model-kwargs`` may name the ``backbone`` (default transunet) and
    its arguments. ``--attribute-dropout`` (default 0 here, see
    :func:`attribute_dropout_for`) routes that share of training samples through the
    unknown-attribute path, the mean of all group models."""
    from .fitting.preparation import DEFAULT_IMAGE_SIZE
    from .networks import create_model

    kwargs = dict(config.model_kwargs)
    backbone = kwargs.pop("backbone", "transunet")
    dropout = kwargs.pop("attribute_dropout", None)  # as for build_model: model_kwargs win
    if dropout is None:
        dropout = attribute_dropout_for(config)
    if backbone == "transunet" and config.spatial_dims == 2:
        kwargs.setdefault("img_size", config.image_size or DEFAULT_IMAGE_SIZE["transunet"])
    return create_model("separate", preset=config.preset, spatial_dims=config.spatial_dims,
                        in_channels=in_channels, out_channels=num_classes, moe=config.moe,
                        num_attributes=max(num_attributes, 1), backbone=backbone,
                        backbone_kwargs=kwargs, attribute_dropout=dropout)
