"""The training engine: :func:`fit` runs epochs, validates, and hands the results to the
handlers (:mod:`.handlers`). Step-level work (one epoch, one sharded validation) lives in
``training.engine``."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from ..cli import write_yaml
from .config import RESUMABLE, FitConfig, FitResult, saved_config
from .handlers import CheckpointSaver, kept_message
from .preparation import build_model, build_optimizer, manifest_hash, prepare_data, seed_everything


def fit(config: FitConfig) -> FitResult:
    """Train, validate every ``val_every`` epochs, keep the best model by ``--select``.

    Under ``torchrun`` the processes train one DistributedDataParallel model (see
    ``training.distributed``); only rank 0 writes files and logs.

    Raises:
        NonFiniteLoss: the loss became NaN/inf; the files of the last good epoch are kept.
        TrainingInterrupted: SIGTERM/SIGINT; the last completed epoch is saved for --resume.
        ValueError: bad settings, or ``--resume`` found nothing usable (``StateError``).
    """
    from ..distributed import barrier, setup_distributed, teardown_distributed
    from ..engine import TrainingLog
    from ..inference import resolve_device
    from ..run_folder import open_shared_run_folder, refuse_data_inside

    refuse_data_inside(config.out, config.data)
    seed_everything(config.seed)
    info = setup_distributed(resolve_device(config.device))
    try:
        # refuse to replace a run, lock --out, remove temp files of killed writes
        folder = open_shared_run_folder(config.out, resume=config.resume,
                                        overwrite=config.overwrite)
        try:
            for note in folder.notes if folder else []:
                TrainingLog(config.quiet)(f"{config.out}: {note}")
            result = _run(config, info)
            if info.distributed:  # leave together: a rank that tears the group down while
                barrier()         # rank 0 still writes its files can abort (gloo, SIGABRT)
            return result
        finally:
            if folder is not None:
                folder.close()
    finally:
        if info.distributed:
            teardown_distributed()


def _loaders(config: FitConfig, info, cases, vocabulary, pre):
    """The training loader (with its sampler and generator) and this rank's share of the
    validation cases as ``(id, image, label, attribute value)``."""
    from torch.utils.data import DataLoader, DistributedSampler

    from ..data import SegmentationDataset, read_case, seed_worker, train_transform
    from ..distributed import shard

    attribute = config.attribute
    train_cases = [c for c in cases if c.split == "train"]
    val_cases = [c for c in cases if c.split == "val"]
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
    val_data = []
    for c in shard(val_cases, info.rank, info.world_size):
        image, label, meta = read_case(c, spatial_dims=config.spatial_dims)
        val_data.append((c.id, image, label, c.attributes.get(attribute, "") if attribute else "",
                         meta.get("affine")))
    return loader, sampler, gen, len(train_set), val_data, len(val_cases)


def _resume(config: FitConfig, info, out: Path, run, model, optimizer, scheduler, scaler,
            loss_fn, log):
    """Load ``--resume``'s point into the live objects; returns ``(point, run)``."""
    from ..train_state import config_differences, shared_resume_point

    point = shared_resume_point(out, config.resume_fallback) if config.resume else None
    if point is None:
        return None, run
    log(point.message)
    state = point.state
    if state is None:
        return point, run
    diffs = config_differences(state.config, run.config, ignore=RESUMABLE)
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
    return point, run


def _run(config: FitConfig, info) -> FitResult:
    from ..distributed import any_flag
    from ..engine import (
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
    from ..inference import Segmenter
    from ..losses import build_loss
    from ..protocol import (
        build_separate_model,
        loss_options,
        selection_score,
        worst_group_dice,
    )
    from ..train_state import BEST_NAME, LAST_NAME, TrainState, restore_rng

    device = info.device
    out = Path(config.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    fmt, cases, class_names, vocabulary, pre = prepare_data(config)
    attribute = config.attribute
    log = TrainingLog(config.quiet or not info.is_main)
    loader, sampler, gen, n_train, val_data, n_val = _loaders(config, info, cases, vocabulary,
                                                              pre)
    log(f"data: {fmt}, {n_train} train / {n_val} val cases; attribute "
        f"{attribute!r} {vocabulary}; classes {class_names}; device {device}")
    for line in config.protocol_report.lines():  # --protocol: applied and overridden
        log(line)
    precision = config.precision or default_precision(device)
    if info.distributed or precision != "fp32":
        log(f"processes: {info.world_size} ({info.backend or 'single'}); precision {precision}")

    build = build_separate_model if config.arch == "separate" else build_model
    parts = {}
    if config.summed_routing:  # intersectional, routers of the parts summed
        from ..data.cases import vocabulary_parts

        parts = {"attribute_parts": vocabulary_parts(vocabulary)}
        log(f"routing: sum of per-attribute routers, parts {list(parts['attribute_parts'])}")
    elif config.attribute_routing == "sum" and "," in (attribute or ""):
        log("routing: --attribute-routing sum applies to --moe dmoe with the plain loss; "
            "routing per observed combination instead")
    model = build(config, pre.in_channels, len(class_names), len(vocabulary), **parts
                  ).to(device)
    train_groups = [vocabulary.index(c.attributes.get(attribute, ""))
                    if c.attributes.get(attribute, "") in vocabulary else -1
                    for c in cases if c.split == "train"] if attribute else None
    loss_fn = build_loss(config.loss, num_classes=len(class_names),
                         num_groups=max(len(vocabulary), 1),
                         **loss_options(config, model, train_groups, max(len(vocabulary), 1))
                         ).to(device)
    if hasattr(loss_fn, "attach"):  # ADV: the discriminator reads the bottleneck
        loss_fn.attach(model)
    # the loss's own parameters (ADV's discriminator) are optimised with the network's
    optimizer, scheduler = build_optimizer(config, torch.nn.ModuleList([model, loss_fn]))
    if info.distributed:  # same initial weights everywhere, then one random stream per rank
        seed_everything(config.seed + 1_000_003 * info.rank)
    scaler = grad_scaler_for(precision, device)
    use_aux = config.moe != "none" and (config.moe_importance_weight > 0
                                        or config.moe_load_weight > 0)
    metadata = {
        "class_names": class_names,
        "attribute": {"name": attribute, "vocabulary": vocabulary,
                      "unknown_router": config.moe == "dmoe",
                      # summed intersectional routing; absent = one router per value
                      **({"routing": "sum"} if config.summed_routing else {})},
        "preprocessing": pre.to_dict(),
        "description": config.description or f"{config.arch}/{config.preset} {config.moe} "
                                              f"trained on {Path(config.data).name}",
    }
    provenance: dict[str, Any] = {"data": str(config.data), "data_format": fmt,
                                  "data_manifest_hash": manifest_hash(cases),
                                  "data_cases": len(cases), "select": config.select,
                                  # settings in effect (e.g. attribute_dropout)
                                  "config": {**dataclasses.asdict(config),
                                             **saved_config(config)}}
    # the loop's bookkeeping (epoch, best metric, patience, history) is a TrainState
    run = TrainState(0, -math.inf, 0, 0, [], {}, config={
        **saved_config(config), "data_manifest_hash": provenance["data_manifest_hash"]})
    point, run = _resume(config, info, out, run, model, optimizer, scheduler, scaler, loss_fn,
                         log)
    if info.is_main:
        write_yaml(out / "config.yaml", saved_config(config))
    log(f"model: {config.arch}/{config.preset} moe={config.moe}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; loss {config.loss}")

    train_model = model
    if info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            # separate: a batch may hold no sample of some group, leaving its model unused
            find_unused_parameters=config.arch == "separate")
    if config.compile:
        train_model = torch.compile(train_model)
    saver = CheckpointSaver(out, model, metadata, provenance, optimizer, scheduler, scaler,
                            loss_fn, {"loader": gen}, info)
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
            bar = log.bar(len(sampler) if sampler is not None else n_train,
                          f"epoch {epoch}/{config.epochs}")
            try:
                stats = train_one_epoch(
                    train_model, loader, loss_fn, optimizer, device, autocast=autocast,
                    scaler=scaler, use_aux=use_aux, progress=bar.update if bar else None,
                    should_stop=stop.is_set, sync=info.distributed,
                )  # fmt: skip
            except NonFiniteLoss as exc:
                raise NonFiniteLoss(kept_message(f"epoch {epoch}: {exc}", out, run.epoch)
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
                    val_data, attribute, n_val).summary()
                mean = summary["mean"]
                row.update(val_dice=mean["dice"], val_es_dice=mean["es_dice"],
                           val_iou=mean["iou"], val_es_iou=mean["es_iou"],
                           val_worst_dice=worst_group_dice(summary))
                groups = ", ".join(f"{g} {v['dice']:.3f}" for g, v in mean["groups"].items())
                score = selection_score(config.select, summary, epoch)  # --select
                improved = score > run.best_metric
                log(f"epoch {epoch}: loss {stats.loss:.4f} ({stats.samples_per_second:.1f} "
                    f"img/s) | val Dice {mean['dice']:.4f} ES-Dice {mean['es_dice']:.4f} "
                    f"[{groups}]" + (" *best*" if improved else ""))
                if improved:
                    run.best_metric, run.best_epoch, run.since_best = score, epoch, 0
                    saver.best(epoch, summary)
                else:
                    run.since_best += 1
            run.history.append(row)
            run.epoch = epoch
            saver.last(run)
            if epoch < config.epochs and any_flag(stop.is_set())[0]:
                raise TrainingInterrupted(stop.signal_name or "stop request", None, epoch, out)
            if config.patience is not None and run.since_best >= config.patience:
                log(f"no {config.select} improvement in {config.patience} validations: "
                    "stopping early")
                break
    log(f"best validation {config.select} {run.best_metric:.4f} at epoch {run.best_epoch}; "
        f"outputs in "
        f"{out}")
    return FitResult(out, out / BEST_NAME, out / LAST_NAME, run.best_metric,
                     run.best_epoch, epoch, run.history)
