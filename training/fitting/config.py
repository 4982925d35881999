"""The configuration of a training run (saved as ``config.yaml``) and its result."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..protocol import DEFAULT_SELECT


@dataclass
class FitConfig:
    """Everything a training run depends on (saved as ``config.yaml``)."""

    data: str
    out: str = "runs/fit"
    format: str | None = None
    attribute: str | None = None
    attribute_routing: str = "combination"
    classes: list[str] | None = None
    arch: str = "transunet"
    spatial_dims: int = 2
    preset: str = "tiny"
    moe: str = "dmoe"
    loss: str = "dicece"
    adv_weight: float = 0.1
    febs_missing: str = "reference"
    dice: str | None = None  # None: "monai", or the protocol's choice
    select: str = DEFAULT_SELECT
    protocol: str = "ours"
    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lr_decay: float = 0.98
    optimizer: str = "adamw"
    image_size: int | None = None
    center_crop: int | None = None
    intensity: str | None = None
    gray_from: str = "luminance"
    patch_size: list[int] | None = None
    ct_window: list[float] | None = None
    spacing: list[float] | None = None
    orientation: str | None = "RAS"
    val_every: int = 1
    patience: int | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    attribute_dropout: float | None = None  # None: protocol.attribute_dropout_for
    moe_importance_weight: float = 0.0
    moe_load_weight: float = 0.0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str | None = None
    quiet: bool = False
    precision: str | None = None
    compile: bool = False
    grad_checkpoint: bool = False
    resume: bool = False
    resume_fallback: str = "refuse"
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"--optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"--spatial-dims must be 2 or 3, got {self.spatial_dims}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: --resume continues "
                             "the run in --out, --overwrite replaces it")
        if self.resume_fallback not in ("refuse", "best", "fresh"):
            raise ValueError("--resume-fallback must be refuse, best or fresh, got "
                             f"{self.resume_fallback!r}")
        from ..losses import DICE_FORMS, FEBS_MISSING
        from ..protocol import apply_protocol, check_select

        check_select(self.select)
        if self.dice not in (None, *DICE_FORMS):
            raise ValueError(f"--dice must be monai or reference, got {self.dice!r}")
        if self.febs_missing not in FEBS_MISSING:
            raise ValueError(f"--febs-missing must be reference or present, got "
                             f"{self.febs_missing!r}")
        if self.adv_weight < 0:
            raise ValueError(f"--adv-weight must be >= 0, got {self.adv_weight}")
        if self.attribute_dropout is not None and not 0 <= self.attribute_dropout <= 1:
            raise ValueError(f"--attribute-dropout must be in [0, 1], got "
                             f"{self.attribute_dropout}")
        # --protocol paper: reference choices for every setting no flag set (not a field:
        # training.fit logs its lines)
        self.protocol_report = apply_protocol(self)
        if (self.arch == "separate" or self.loss == "adv") and not self.attribute:
            raise ValueError(f"--{'arch separate' if self.arch == 'separate' else 'loss adv'} "
                             "needs the patient attribute: give --attribute NAME")
        from ..data.cases import ROUTINGS

        if self.attribute_routing not in ROUTINGS:
            raise ValueError(f"--attribute-routing must be one of {', '.join(ROUTINGS)}, got "
                             f"{self.attribute_routing!r}")
        if self.moe == "dmoe" and not self.attribute:
            raise ValueError("--moe dmoe routes on a patient attribute: give --attribute NAME "
                             "(or train --moe moe / none)")


    @property
    def summed_routing(self) -> bool:
        """``--attribute-routing sum`` takes effect: several attributes (``race,gender``), a
        dMoE, a non-separate network and the plain loss. Otherwise (one attribute, or group
        losses/separate models, which weight or train the observed combinations) the
        routing is per observed combination."""
        return (self.attribute_routing == "sum" and self.moe == "dmoe"
                and self.arch != "separate" and self.loss == "dicece"
                and "," in (self.attribute or ""))


@dataclass
class FitResult:
    """Where the run wrote its outputs and how it ended."""

    out: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_metric: float
    best_epoch: int
    epochs_run: int
    history: list[dict[str, Any]]


# Settings that may change between a run and its --resume (they do not alter the model or
# the optimisation trajectory); every other setting must match.
RESUMABLE = frozenset({"data", "out", "epochs", "patience", "val_every", "quiet", "workers",
                       "device", "precision", "compile", "grad_checkpoint", "description"})
RUN_CONTROL = ("resume", "resume_fallback", "overwrite")


def saved_config(config: FitConfig) -> dict[str, Any]:
    """The configuration written to config.yaml (without run-control flags like --resume),
    with the ``attribute_dropout`` in effect."""
    from ..protocol import attribute_dropout_for

    saved = {k: v for k, v in dataclasses.asdict(config).items() if k not in RUN_CONTROL}
    saved["attribute_dropout"] = attribute_dropout_for(config)
    return saved
