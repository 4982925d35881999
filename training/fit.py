"""``python -m training.fit``: train a dMoE (or baseline) segmentation model.

``main(argv)`` parses flags (a ``--config file.yaml`` may set any of them) and calls
:func:`fit`, a plain function of a :class:`FitConfig`. Outputs in ``--out``:
``best.safetensors`` (best validation ES-Dice), ``last.safetensors``, ``config.yaml`` (the
resolved configuration) and ``history.csv`` (per epoch: losses, validation Dice and
ES-Dice, learning rate, seconds).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cli import add_config_argument, parse_with_config, write_yaml

DEFAULT_IMAGE_SIZE = {"transunet": 224, "resunet": 224}


@dataclass
class FitConfig:
    """Everything a training run depends on (saved as ``config.yaml``)."""

    data: str
    out: str = "runs/fit"
    format: str | None = None
    attribute: str | None = None
    classes: list[str] | None = None
    arch: str = "transunet"
    spatial_dims: int = 2
    preset: str = "tiny"
    moe: str = "dmoe"
    loss: str = "dicece"
    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    lr_decay: float = 0.98
    optimizer: str = "adamw"
    image_size: int | None = None
    center_crop: int | None = None
    patch_size: list[int] | None = None
    ct_window: list[float] | None = None
    val_every: int = 1
    patience: int | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    attribute_dropout: float = 0.1
    moe_importance_weight: float = 0.0
    moe_load_weight: float = 0.0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str | None = None
    quiet: bool = False

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
        if self.moe == "dmoe" and not self.attribute:
            raise ValueError("--moe dmoe routes on a patient attribute: give --attribute NAME "
                             "(or train --moe moe / none)")


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _manifest_hash(cases) -> str:
    h = hashlib.sha256()
    for c in sorted(cases, key=lambda c: c.id):
        h.update(f"{c.id}|{c.image}|{c.label}|{c.split}|{sorted(c.attributes.items())}".encode())
    return h.hexdigest()[:16]


def _class_names(config: FitConfig, num_classes: int | None) -> list[str]:
    if config.classes:
        return list(config.classes)
    k = max(num_classes or 2, 2)
    return ["background"] + [f"class{i}" for i in range(1, k)]


def prepare_data(config: FitConfig):
    """Load, split and validate the cases; build the vocabulary and preprocessing."""
    from .data import (
        Preprocessing,
        assign_splits,
        build_vocabulary,
        detect_format,
        load_cases,
        validate_cases,
    )

    fmt = config.format or detect_format(config.data)
    cases = assign_splits(load_cases(config.data, fmt), config.val_fraction,
                          config.test_fraction, seed=config.seed)
    num_classes = len(config.classes) if config.classes else None
    info = validate_cases(cases, config.attribute, num_classes=num_classes,
                          spatial_dims=config.spatial_dims, splits=("train", "val"))
    if num_classes is None:
        num_classes = int(info.get("max_label") or 1) + 1
    class_names = _class_names(config, num_classes)
    vocabulary = build_vocabulary(cases, config.attribute) if config.attribute else []
    in_channels = int(info.get("in_channels") or 1)
    if config.spatial_dims == 2:
        size = config.image_size or DEFAULT_IMAGE_SIZE.get(config.arch, 224)
        pre = Preprocessing(spatial_dims=2, image_size=(size, size), center_crop=config.center_crop,
                            intensity="minmax", in_channels=in_channels)
    else:
        window = config.ct_window
        pre = Preprocessing(spatial_dims=3, patch_size=tuple(config.patch_size or (64, 64, 32)),
                            intensity="ct_window" if window else "minmax",
                            ct_window=tuple(window) if window else None, in_channels=in_channels)
    return fmt, cases, class_names, vocabulary, pre


def build_model(config: FitConfig, in_channels: int, num_classes: int, num_attributes: int):
    from .networks import create_model

    kwargs = dict(config.model_kwargs)
    if config.moe != "none":
        kwargs.setdefault("importance_weight", config.moe_importance_weight)
        kwargs.setdefault("load_weight", config.moe_load_weight)
    if config.moe == "dmoe":
        kwargs.setdefault("attribute_dropout", config.attribute_dropout)
    if config.arch == "transunet" and config.spatial_dims == 2:
        kwargs.setdefault("img_size", config.image_size or DEFAULT_IMAGE_SIZE["transunet"])
    return create_model(
        config.arch, preset=config.preset, spatial_dims=config.spatial_dims,
        in_channels=in_channels, out_channels=num_classes, moe=config.moe,
        num_attributes=max(num_attributes, 1) if config.moe == "dmoe" else 1, **kwargs,
    )  # fmt: skip


def fit(config: FitConfig) -> FitResult:
    """Train, validate every ``val_every`` epochs, keep the best model by ES-Dice."""
    from torch.utils.data import DataLoader

    from .checkpoint import save_checkpoint
    from .data import SegmentationDataset, read_case, seed_worker, train_transform
    from .engine import evaluate_cases, train_one_epoch
    from .inference import Segmenter, resolve_device
    from .losses import build_loss

    seed_everything(config.seed)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    fmt, cases, class_names, vocabulary, pre = prepare_data(config)
    attribute = config.attribute
    train_cases = [c for c in cases if c.split == "train"]
    val_cases = [c for c in cases if c.split == "val"]
    log = _Logger(config.quiet)
    log(f"data: {fmt}, {len(train_cases)} train / {len(val_cases)} val cases; attribute "
        f"{attribute!r} {vocabulary}; classes {class_names}; device {device}")

    train_set = SegmentationDataset(train_cases, attribute, vocabulary,
                                    train_transform(pre), spatial_dims=config.spatial_dims)
    train_set.fill_cache()
    gen = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, drop_last=False,
                        num_workers=config.workers, worker_init_fn=seed_worker, generator=gen,
                        persistent_workers=config.workers > 0)
    val_data = []
    for c in val_cases:
        image, label, _ = read_case(c, spatial_dims=config.spatial_dims)
        val_data.append((c.id, image, label, c.attributes.get(attribute, "") if attribute else ""))

    model = build_model(config, pre.in_channels, len(class_names), len(vocabulary)).to(device)
    loss_fn = build_loss(config.loss, num_classes=len(class_names),
                         num_groups=max(len(vocabulary), 1)).to(device)
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                      weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9,
                                    weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    use_aux = config.moe != "none" and (config.moe_importance_weight > 0
                                        or config.moe_load_weight > 0)
    metadata = {
        "class_names": class_names,
        "attribute": {"name": attribute, "vocabulary": vocabulary,
                      "unknown_router": config.moe == "dmoe"},
        "preprocessing": pre.to_dict(),
        "description": config.description or f"{config.arch}/{config.preset} {config.moe} "
                                              f"trained on {Path(config.data).name}",
    }
    provenance = {"data": str(config.data), "data_format": fmt,
                  "data_manifest_hash": _manifest_hash(cases),
                  "config": dataclasses.asdict(config)}
    write_yaml(out / "config.yaml", dataclasses.asdict(config))
    log(f"model: {config.arch}/{config.preset} moe={config.moe}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; loss {config.loss}")

    history: list[dict[str, Any]] = []
    best_metric, best_epoch, since_best = -math.inf, 0, 0
    best_path, last_path = out / "best.safetensors", out / "last.safetensors"
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        bar = log.bar(len(train_set), f"epoch {epoch}/{config.epochs}")
        stats = train_one_epoch(
            model, loader, loss_fn, optimizer, device, autocast=_no_autocast,
            use_aux=use_aux, progress=bar.update if bar else None,
        )  # fmt: skip
        if bar:
            bar.close()
        row: dict[str, Any] = {"epoch": epoch, "loss": stats.loss, "seg_loss": stats.seg_loss,
                               "aux_loss": stats.aux_loss, "lr": optimizer.param_groups[0]["lr"],
                               "train_seconds": round(stats.seconds, 3)}
        scheduler.step()
        if epoch % config.val_every == 0 or epoch == config.epochs:
            summary = evaluate_cases(Segmenter(model, {**metadata, "model": {
                "name": model.model_name, "kwargs": model.model_kwargs}}, device),
                val_data, attribute).summary()
            mean = summary["mean"]
            row.update(val_dice=mean["dice"], val_es_dice=mean["es_dice"],
                       val_iou=mean["iou"], val_es_iou=mean["es_iou"])
            groups = ", ".join(f"{g} {v['dice']:.3f}" for g, v in mean["groups"].items())
            improved = mean["es_dice"] > best_metric
            log(f"epoch {epoch}: loss {stats.loss:.4f} ({stats.samples_per_second:.1f} img/s) | "
                f"val Dice {mean['dice']:.4f} ES-Dice {mean['es_dice']:.4f} [{groups}]"
                + (" *best*" if improved else ""))
            if improved:
                best_metric, best_epoch, since_best = mean["es_dice"], epoch, 0
                save_checkpoint(model, best_path, **metadata, provenance={
                    **provenance, "epochs": epoch, "validation": summary})
            else:
                since_best += 1
        history.append(row)
        save_checkpoint(model, last_path, **metadata,
                        provenance={**provenance, "epochs": epoch})
        _write_history(out / "history.csv", history)
        if config.patience is not None and since_best >= config.patience:
            log(f"no ES-Dice improvement in {config.patience} validations: stopping early")
            break
    log(f"best validation ES-Dice {best_metric:.4f} at epoch {best_epoch}; outputs in {out}")
    return FitResult(out, best_path, last_path, best_metric, best_epoch, epoch, history)


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


class _Logger:
    """One-line summaries on stdout; a tqdm bar per epoch on stderr when it is a terminal."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)

    def bar(self, total: int, desc: str) -> _Bar | None:
        if self.quiet or not sys.stderr.isatty():
            return None
        return _Bar(total, desc)


class _Bar:
    """tqdm bar fed with ``(samples_done, running means)``."""

    def __init__(self, total: int, desc: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)

    def update(self, done: int, means: dict[str, float]) -> None:
        self._bar.update(done - self._bar.n)
        self._bar.set_postfix(loss=f"{means['loss']:.4f}")

    def close(self) -> None:
        self._bar.close()


def _json_object(text: str) -> dict[str, Any]:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.fit", description=__doc__.split("\n")[0])
    add_config_argument(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="manifest.csv or a dataset folder (FairSeg, HAM10000)")
    g.add_argument("--format", choices=["manifest", "fairseg", "ham10000"], help="default: detect")
    g.add_argument("--attribute", help="patient attribute column that routes (e.g. race)")
    g.add_argument("--classes", type=lambda s: s.split(","), help="e.g. background,rim,cup")
    g.add_argument("--image-size", type=int, help="2D model input side (default 224)")
    g.add_argument("--center-crop", type=int, help="2D centre crop in pixels before resizing")
    g.add_argument("--patch-size", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="3D training patch (default 64 64 32)")
    g.add_argument("--ct-window", type=float, nargs=2, metavar=("LO", "HI"),
                   help="3D intensity window in HU, e.g. -1000 1000 (default: min-max)")
    g.add_argument("--val-fraction", type=float, default=0.15)
    g.add_argument("--test-fraction", type=float, default=0.15)
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="transunet", choices=["transunet", "resunet"])
    g.add_argument("--spatial-dims", type=int, default=2, choices=[2, 3])
    g.add_argument("--preset", default="tiny", choices=["tiny", "small", "paper"])
    g.add_argument("--moe", default="dmoe", choices=["none", "moe", "dmoe"])
    g.add_argument("--attribute-dropout", type=float, default=0.1,
                   help="share of training samples routed as 'unknown' (trains that router)")
    g.add_argument("--model-kwargs", type=_json_object, default={}, metavar="JSON",
                   help='extra network arguments, e.g. \'{"embed_dim": 64, "depth": 2}\'')
    g.add_argument("--moe-importance-weight", type=float, default=0.0)
    g.add_argument("--moe-load-weight", type=float, default=0.0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--loss", default="dicece", choices=["dicece", "febs", "groupdro"])
    g.add_argument("--epochs", type=int, default=50)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--lr-decay", type=float, default=0.98, help="exponential decay per epoch")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    g.add_argument("--val-every", type=int, default=1)
    g.add_argument("--patience", type=int, help="stop after N validations without improvement")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.add_argument("--workers", type=int, default=0)
    g.add_argument("--out", default="runs/fit")
    g.add_argument("--description", help="one line stored in the checkpoint (shown by the plugin)")
    g.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> FitResult:
    parser = build_parser()
    args = parse_with_config(parser, argv, required=("data",))
    from .data import DataError

    try:
        config = FitConfig(**{k: v for k, v in vars(args).items() if k != "config"})
        return fit(config)
    except (DataError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
