"""``python -m training.fit``: train a dMoE (or baseline) segmentation model.

``main(argv)`` parses flags (a ``--config file.yaml`` may set any of them) and calls
:func:`fit`, a plain function of a :class:`FitConfig`. Outputs in ``--out``:
``best.safetensors`` (best validation ES-Dice), ``last.safetensors``, ``config.yaml`` (the
resolved configuration) and ``history.csv`` (per epoch: losses, validation Dice and
ES-Dice, learning rate, seconds), plus ``last.state.safetensors`` (optimizer, scheduler,
RNG, epoch, best metric, patience, history; see ``training.train_state``) for ``--resume``.

``torchrun --nproc_per_node=N -m training.fit ...`` trains with DistributedDataParallel
(``training.distributed``). Exit codes of ``main``: 0 done, 2 bad settings/data or an
unusable resume point, 3 non-finite loss (last good files kept), 128+signal (143 SIGTERM,
130 SIGINT) when a signal stopped training after the current step.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import math
import os
import random
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
    precision: str | None = None
    compile: bool = False
    grad_checkpoint: bool = False
    resume: bool = False
    resume_fallback: str = "refuse"

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
        if self.resume_fallback not in ("refuse", "best", "fresh"):
            raise ValueError("--resume-fallback must be refuse, best or fresh, got "
                             f"{self.resume_fallback!r}")
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
    if config.grad_checkpoint:
        kwargs["grad_checkpoint"] = True
    try:
        return create_model(
            config.arch, preset=config.preset, spatial_dims=config.spatial_dims,
            in_channels=in_channels, out_channels=num_classes, moe=config.moe,
            num_attributes=max(num_attributes, 1) if config.moe == "dmoe" else 1, **kwargs,
        )  # fmt: skip
    except ValueError as exc:
        if config.grad_checkpoint and "grad_checkpoint" in str(exc):
            raise ValueError(f"--grad-checkpoint: the {config.arch!r} network has no "
                             "gradient-checkpointing switch in this version; train without "
                             "it (or with a smaller --patch-size / --batch-size)") from None
        raise


def fit(config: FitConfig) -> FitResult:
    """Train, validate every ``val_every`` epochs, keep the best model by ES-Dice.

    Under ``torchrun`` the processes train one DistributedDataParallel model (see
    ``training.distributed``); only rank 0 writes files and logs.

    Raises:
        NonFiniteLoss: the loss became NaN/inf; the files of the last good epoch are kept.
        TrainingInterrupted: SIGTERM/SIGINT; the last completed epoch is saved for --resume.
        ValueError: bad settings, or ``--resume`` found nothing usable (``StateError``).
    """
    from .distributed import setup_distributed, teardown_distributed
    from .inference import resolve_device

    seed_everything(config.seed)
    info = setup_distributed(resolve_device(config.device))
    try:
        return _fit(config, info)
    finally:
        if info.distributed:
            teardown_distributed()


def _fit(config: FitConfig, info) -> FitResult:
    from torch.utils.data import DataLoader, DistributedSampler

    from .data import SegmentationDataset, read_case, seed_worker, train_transform
    from .distributed import any_flag, shard
    from .engine import (
        NonFiniteLoss,
        StopOnSignal,
        TrainingInterrupted,
        TrainingLog,
        autocast_for,
        default_precision,
        evaluate_sharded,
        grad_scaler_for,
        train_one_epoch,
    )
    from .inference import Segmenter
    from .losses import build_loss
    from .train_state import (
        LAST_NAME,
        TrainState,
        config_differences,
        restore_rng,
        shared_resume_point,
    )

    device = info.device
    out = Path(config.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    fmt, cases, class_names, vocabulary, pre = prepare_data(config)
    attribute = config.attribute
    train_cases = [c for c in cases if c.split == "train"]
    val_cases = [c for c in cases if c.split == "val"]
    log = TrainingLog(config.quiet or not info.is_main)
    log(f"data: {fmt}, {len(train_cases)} train / {len(val_cases)} val cases; attribute "
        f"{attribute!r} {vocabulary}; classes {class_names}; device {device}")
    precision = config.precision or default_precision(device)
    if info.distributed or precision != "fp32":
        log(f"processes: {info.world_size} ({info.backend or 'single'}); precision {precision}")

    train_set = SegmentationDataset(train_cases, attribute, vocabulary,
                                    train_transform(pre), spatial_dims=config.spatial_dims)
    train_set.fill_cache()
    gen = torch.Generator().manual_seed(config.seed + info.rank)
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=config.seed) if info.distributed else None
    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=sampler is None,
                        sampler=sampler, drop_last=False, num_workers=config.workers,
                        worker_init_fn=seed_worker, generator=gen,
                        persistent_workers=config.workers > 0)
    val_data = []  # this rank's share of the validation cases
    for c in shard(val_cases, info.rank, info.world_size):
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
    if info.distributed:  # same initial weights everywhere, then one random stream per rank
        seed_everything(config.seed + 1_000_003 * info.rank)
    scaler = grad_scaler_for(precision, device)
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
    # the loop's bookkeeping (epoch, best metric, patience, history) is a TrainState
    run = TrainState(0, -math.inf, 0, 0, [], {}, config={
        **_saved_config(config), "data_manifest_hash": provenance["data_manifest_hash"]})
    point = shared_resume_point(out, config.resume_fallback) if config.resume else None
    if point is not None:
        log(point.message)
        state = point.state
        if state is not None:
            diffs = config_differences(state.config, run.config, ignore=_RESUMABLE)
            if diffs:
                raise ValueError(f"--resume: the run in {out} was trained with other settings "
                                 f"({'; '.join(diffs)}); resume with the same settings or "
                                 "choose another --out")
            if state.model:
                model.load_state_dict(state.model)
            state.load_optimisation(optimizer, scheduler, scaler, loss_fn)
            run = dataclasses.replace(run, epoch=state.epoch, best_metric=state.best_metric,
                                      best_epoch=state.best_epoch, since_best=state.since_best,
                                      history=list(state.history))
            if state.world_size != info.world_size and point.kind == "state":
                log(f"note: the state was written by {state.world_size} process(es), this run "
                    f"has {info.world_size}; the continuation is valid but not bit-identical")
    if info.is_main:
        write_yaml(out / "config.yaml", _saved_config(config))
    log(f"model: {config.arch}/{config.preset} moe={config.moe}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; loss {config.loss}")

    train_model = model
    if info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)
    saver = _Saver(out, model, metadata, provenance, optimizer, scheduler, scaler, loss_fn,
                   {"loader": gen}, info)
    # RNG last: nothing between here and the first batch draws random numbers.
    if point is not None and point.kind == "state":
        ranks = point.state.rng["ranks"]
        restore_rng(ranks[info.rank % len(ranks)], {"loader": gen})
    elif point is not None and point.kind == "best":
        seed_everything(config.seed + run.epoch + 1_000_003 * info.rank)
        gen.manual_seed(config.seed + info.rank + run.epoch)
    if run.epoch >= config.epochs:
        log(f"already trained {run.epoch} of --epochs {config.epochs}; raise --epochs to go on")

    autocast = autocast_for(precision, device)
    epoch = run.epoch
    with StopOnSignal() as stop:
        for epoch in range(run.epoch + 1, config.epochs + 1):
            if sampler is not None:
                sampler.set_epoch(epoch)
            bar = log.bar(len(sampler) if sampler is not None else len(train_set),
                          f"epoch {epoch}/{config.epochs}")
            try:
                stats = train_one_epoch(
                    train_model, loader, loss_fn, optimizer, device, autocast=autocast,
                    scaler=scaler, use_aux=use_aux, progress=bar.update if bar else None,
                    should_stop=stop.is_set, sync=info.distributed,
                )  # fmt: skip
            except NonFiniteLoss as exc:
                raise NonFiniteLoss(_kept_message(f"epoch {epoch}: {exc}", out, run.epoch)
                                    ) from None
            finally:
                if bar:
                    bar.close()
            if stats.stopped:
                raise TrainingInterrupted(stop.signal_name or "stop request", epoch, run.epoch,
                                          out)
            stats = stats.over_ranks()
            row: dict[str, Any] = {"epoch": epoch, "loss": stats.loss,
                                   "seg_loss": stats.seg_loss, "aux_loss": stats.aux_loss,
                                   "lr": optimizer.param_groups[0]["lr"],
                                   "train_seconds": round(stats.seconds, 3)}
            scheduler.step()
            if epoch % config.val_every == 0 or epoch == config.epochs:
                summary = evaluate_sharded(Segmenter(model, {**metadata, "model": {
                    "name": model.model_name, "kwargs": model.model_kwargs}}, device),
                    val_data, attribute, len(val_cases)).summary()
                mean = summary["mean"]
                row.update(val_dice=mean["dice"], val_es_dice=mean["es_dice"],
                           val_iou=mean["iou"], val_es_iou=mean["es_iou"])
                groups = ", ".join(f"{g} {v['dice']:.3f}" for g, v in mean["groups"].items())
                improved = mean["es_dice"] > run.best_metric
                log(f"epoch {epoch}: loss {stats.loss:.4f} ({stats.samples_per_second:.1f} "
                    f"img/s) | val Dice {mean['dice']:.4f} ES-Dice {mean['es_dice']:.4f} "
                    f"[{groups}]" + (" *best*" if improved else ""))
                if improved:
                    run.best_metric, run.best_epoch, run.since_best = mean["es_dice"], epoch, 0
                    saver.best(epoch, summary)
                else:
                    run.since_best += 1
            run.history.append(row)
            run.epoch = epoch
            saver.last(run)
            if epoch < config.epochs and any_flag(stop.is_set())[0]:
                raise TrainingInterrupted(stop.signal_name or "stop request", None, epoch, out)
            if config.patience is not None and run.since_best >= config.patience:
                log(f"no ES-Dice improvement in {config.patience} validations: stopping early")
                break
    log(f"best validation ES-Dice {run.best_metric:.4f} at epoch {run.best_epoch}; outputs in "
        f"{out}")
    return FitResult(out, out / "best.safetensors", out / LAST_NAME, run.best_metric,
                     run.best_epoch, epoch, run.history)


# Settings that may change between a run and its --resume (they do not alter the model or
# the optimisation trajectory); every other setting must match.
_RESUMABLE = frozenset({"data", "out", "epochs", "patience", "val_every", "quiet", "workers",
                        "device", "precision", "compile", "grad_checkpoint", "description"})
_RUN_CONTROL = ("resume", "resume_fallback")


def _saved_config(config: FitConfig) -> dict[str, Any]:
    """The configuration written to config.yaml (without run-control flags like --resume)."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in _RUN_CONTROL}


class _Saver:
    """Writes best.safetensors and the last pair; only rank 0 writes, every rank takes part
    in gathering the RNG states (each rank's streams are saved for an exact resume)."""

    def __init__(self, out, model, metadata, provenance, optimizer, scheduler, scaler, loss_fn,
                 generators, info) -> None:
        self.out, self.model, self.metadata, self.provenance = out, model, metadata, provenance
        self.parts = (optimizer, scheduler, scaler, loss_fn)
        self.generators, self.info = generators, info

    def best(self, epoch: int, summary: dict[str, Any]) -> None:
        from .checkpoint import save_checkpoint

        if self.info.is_main:
            save_checkpoint(self.model, self.out / "best.safetensors", **self.metadata,
                            provenance={**self.provenance, "epochs": epoch,
                                        "validation": summary})

    def last(self, run) -> None:
        """Save the ``TrainState`` ``run`` (bookkeeping) with live optimisation states."""
        from .distributed import all_gather_objects
        from .train_state import capture_rng, save_last_pair

        rngs = all_gather_objects(capture_rng(self.generators))
        if not self.info.is_main:
            return
        optimizer, scheduler, scaler, loss_fn = self.parts
        state = dataclasses.replace(
            run, model={}, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict() if scaler is not None else None,
            loss=loss_fn.state_dict() or None, rng={"ranks": rngs},
            world_size=self.info.world_size,
        )  # fmt: skip
        save_last_pair(self.out, self.model, state, **self.metadata,
                       provenance={**self.provenance, "epochs": run.epoch})
        _write_history(self.out / "history.csv", run.history)


def _kept_message(problem: str, out: Path, completed: int) -> str:
    if completed:
        return (f"{problem}. Stopped; the files of epoch {completed} in {out} are kept "
                "(try a lower --lr or --precision fp32, check the data, then --resume)")
    return f"{problem}. Stopped before any epoch completed (try a lower --lr or --precision fp32)"


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


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
    p = argparse.ArgumentParser(
        prog="python -m training.fit", description=__doc__.split("\n")[0],
        epilog="Several processes/GPUs: torchrun --standalone --nproc_per_node=N -m "
               "training.fit ... (--batch-size is per process). Exit codes: 2 bad settings or "
               "unusable resume files, 3 non-finite loss, 143/130 stopped by SIGTERM/SIGINT "
               "(rerun with --resume).")
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
    g.add_argument("--quiet", action="store_true")
    g.add_argument("--description", help="one line stored in the checkpoint (shown by the plugin)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="autocast precision (fp16 adds a GradScaler); default bf16 on CUDA "
                        "when supported, else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the network")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute activations in backward to save memory (3D presets)")
    g = p.add_argument_group("resume")
    g.add_argument("--resume", action="store_true",
                   help="continue from --out's last.safetensors + last.state.safetensors "
                        "(starts a new run if --out holds neither)")
    g.add_argument("--resume-fallback", default="refuse", choices=["refuse", "best", "fresh"],
                   help="if the last pair is damaged: refuse (default), restart from "
                        "best.safetensors, or start over")
    return p


def main(argv: list[str] | None = None) -> FitResult:
    parser = build_parser()
    args = parse_with_config(parser, argv, required=("data",))
    from .data import DataError
    from .engine import NonFiniteLoss, TrainingInterrupted

    main_rank = os.environ.get("RANK", "0") == "0"  # other torchrun ranks stay silent

    def stop(code: int, message: str) -> None:
        parser.exit(code, message if main_rank else None)

    try:
        config = FitConfig(**{k: v for k, v in vars(args).items() if k != "config"})
        return fit(config)
    except NonFiniteLoss as exc:
        stop(3, f"error: non-finite loss: {exc}\n")
    except TrainingInterrupted as exc:
        stop(exc.exit_code, f"{exc}\n")
    except (DataError, ValueError) as exc:
        stop(2, f"error: {exc}\n")


if __name__ == "__main__":
    main()
