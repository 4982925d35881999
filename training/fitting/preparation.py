"""Everything a run builds before its first step: cases and splits, the attribute
vocabulary, preprocessing, the network, the loss and the optimiser."""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch

from .config import FitConfig

DEFAULT_IMAGE_SIZE = {"transunet": 224, "resunet": 224}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def manifest_hash(cases) -> str:
    """A short hash of the cases (ids, files, splits, attributes) a run was trained on."""
    h = hashlib.sha256()
    for c in sorted(cases, key=lambda c: c.id):
        h.update(f"{c.id}|{c.image}|{c.label}|{c.split}|{sorted(c.attributes.items())}".encode())
    return h.hexdigest()[:16]


def class_names_for(config: FitConfig, num_classes: int | None) -> list[str]:
    if config.classes:
        return list(config.classes)
    k = max(num_classes or 2, 2)
    return ["background"] + [f"class{i}" for i in range(1, k)]


def prepare_data(config: FitConfig):
    """Load, split and validate the cases; build the vocabulary and preprocessing.

    Returns:
        ``(format, cases, class_names, vocabulary, preprocessing)``.
    """
    from ..data import (
        Preprocessing,
        assign_splits,
        build_vocabulary,
        combine_attributes,
        detect_format,
        load_cases,
        validate_cases,
    )

    fmt = config.format or detect_format(config.data)
    cases = assign_splits(combine_attributes(load_cases(config.data, fmt), config.attribute),
                          config.val_fraction, config.test_fraction, seed=config.seed)
    num_classes = len(config.classes) if config.classes else None
    info = validate_cases(cases, config.attribute, num_classes=num_classes,
                          spatial_dims=config.spatial_dims, splits=("train", "val"))
    if num_classes is None:
        num_classes = int(info.get("max_label") or 1) + 1
    class_names = class_names_for(config, num_classes)
    routing = "sum" if config.summed_routing else "combination"
    vocabulary = build_vocabulary(cases, config.attribute, routing) if config.attribute else []
    in_channels = int(info.get("in_channels") or 1)
    if config.spatial_dims == 2:
        size = config.image_size or DEFAULT_IMAGE_SIZE.get(config.arch, 224)
        pre = Preprocessing(spatial_dims=2, image_size=(size, size), center_crop=config.center_crop,
                            intensity=config.intensity or "minmax", in_channels=in_channels,
                            gray_from=config.gray_from)
    else:
        window = config.ct_window
        orientation, spacing = config.orientation, config.spacing
        if spacing is None:  # the training set's median spacing (None: no affines, e.g. .npy)
            from ..data.geometry import training_spacing

            spacing = training_spacing([c for c in cases if c.split == "train"], orientation)
        pre = Preprocessing(spatial_dims=3, patch_size=tuple(config.patch_size or (64, 64, 32)),
                            intensity="ct_window" if window else "minmax",
                            ct_window=tuple(window) if window else None, in_channels=in_channels,
                            orientation=orientation, spacing=spacing)
    return fmt, cases, class_names, vocabulary, pre


def build_model(config: FitConfig, in_channels: int, num_classes: int, num_attributes: int,
                attribute_parts: tuple[int, ...] | None = None):
    """The network named by ``config.arch``/``preset``/``moe`` (``training.networks``).

    ``attribute_parts``: part sizes for summed intersectional routing (``MoESpec``'s
    ``attribute_parts``; their product must be ``num_attributes``); None = one router per
    value."""
    from ..networks import MoESpec, create_model
    from ..networks.blocks import fold_moe_kwargs
    from ..protocol import attribute_dropout_for

    kwargs = fold_moe_kwargs(config.model_kwargs)
    spec = MoESpec.of(kwargs.get("moe_spec"))
    given = set(config.model_kwargs.get("moe_spec") or {}) | {
        k for k in ("importance_weight", "load_weight", "attribute_dropout")
        if k in config.model_kwargs}
    flags = {"importance_weight": config.moe_importance_weight,
             "load_weight": config.moe_load_weight,
             "attribute_dropout": attribute_dropout_for(config) if config.moe == "dmoe" else 0.0}
    if config.moe == "dmoe" and attribute_parts is not None and len(attribute_parts) > 1:
        flags["attribute_parts"] = tuple(attribute_parts)
        given.discard("attribute_parts")
    kwargs["moe_spec"] = spec.replace(**{k: v for k, v in flags.items() if k not in given})
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


def build_optimizer(config: FitConfig, model: torch.nn.Module) -> tuple[Any, Any]:
    """``(optimizer, scheduler)``: AdamW or SGD with momentum, exponential LR decay."""
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                      weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9,
                                    weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay)
    return optimizer, scheduler
