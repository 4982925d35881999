"""Inference: one entry point for ``training.predict``, ``training.evaluate`` and the plugin.

:class:`Segmenter` wraps a checkpoint: it checks that an image fits the model, applies the
checkpoint's preprocessing, runs the network (2D: the whole image at the model's input
size; 3D: MONAI sliding-window inference over the whole volume with the attribute passed
through), maps the logits back to the image's own grid and, on request, returns the
expert-routing maps of every dMoE layer placed in image pixel coordinates.

Long runs report ``progress(done, total)`` (windows for 3D) and stop with
:class:`Cancelled` as soon as ``should_cancel()`` returns True; nothing here knows about
Qt or napari.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

UNKNOWN = "unknown"
MIN_SIDE = 8
DEFAULT_OVERLAP = 0.25


class Cancelled(Exception):
    """Raised by :meth:`Segmenter.segment` when its ``should_cancel`` callback says so.

    Deliberately not a ``RuntimeError``: Qt worker wrappers (superqt's generator worker)
    treat a RuntimeError as "the worker object was deleted" and then emit neither
    ``finished`` nor ``errored``, which would leave a UI waiting forever.
    """


def available_devices() -> list[str]:
    """Device names usable here, ``"auto"`` first (then cuda, mps, cpu as present)."""
    names = ["auto"]
    if torch.cuda.is_available():
        names.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    names.append("cpu")
    return names


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA, else MPS, else CPU; an unavailable explicit device → ValueError."""
    name = str(device)
    choices = available_devices()
    if name == "auto":
        return torch.device(choices[1])
    if name.split(":")[0] not in choices:
        raise ValueError(f"device {name!r} is not available here; choose one of {choices}")
    return torch.device(name)


@dataclass
class RoutingMap:
    """Routing of one dMoE layer, on a grid laid over the image.

    Grid cell ``i`` (per axis) covers image pixels ``[offset + i*stride, offset + (i+1)*stride)``.

    Attributes:
        name: layer name, e.g. ``"encoder.block3"``.
        expert_gates: ``(E, *grid)`` gate weight of each expert (0 where not chosen; 3D maps
            are averaged over overlapping windows).
        grid_stride: image pixels per grid cell, per spatial axis.
        grid_offset: image pixel coordinate of the grid's first cell edge, per axis.
    """

    name: str
    expert_gates: np.ndarray
    grid_stride: tuple[float, ...]
    grid_offset: tuple[float, ...]

    @property
    def top1_expert(self) -> np.ndarray:
        """``(*grid)`` index of the expert with the largest gate."""
        return self.expert_gates.argmax(0)

    @property
    def top1_gate(self) -> np.ndarray:
        """``(*grid)`` gate weight of the top-1 expert."""
        return self.expert_gates.max(0)

    @property
    def num_experts(self) -> int:
        return self.expert_gates.shape[0]


@dataclass
class SegmentationResult:
    """labels: ``(*spatial)`` int array on the image's grid; probabilities: ``(K, *spatial)``."""

    labels: np.ndarray
    attribute_value: str
    class_names: list[str]
    routing: list[RoutingMap] = field(default_factory=list)
    probabilities: np.ndarray | None = None
    seconds: float = 0.0
    notices: list[str] = field(default_factory=list)
    """One line per conversion the input went through (channels, geometry), for the user."""


def expert_usage(routing: RoutingMap, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Share of each class's grid cells whose top-1 expert is ``e``.

    Args:
        routing: one layer's map.
        labels: ``(*spatial)`` predicted labels on the image grid.
        num_classes: K.

    Returns:
        ``(K, E)``; rows of classes absent from ``labels`` are zero.
    """
    grid = routing.expert_gates.shape[1:]
    centres = []
    for axis, n in enumerate(grid):
        c = routing.grid_offset[axis] + (np.arange(n) + 0.5) * routing.grid_stride[axis]
        centres.append(np.clip(np.floor(c).astype(int), 0, labels.shape[axis] - 1))
    cell_class = labels[np.ix_(*centres)].reshape(-1)
    top1 = routing.top1_expert.reshape(-1)
    E = routing.num_experts
    counts = np.bincount(cell_class * E + top1, minlength=num_classes * E)[: num_classes * E]
    counts = counts.reshape(num_classes, E).astype(float)
    totals = counts.sum(1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def _gate_maps(routing, num_experts: int) -> list[torch.Tensor]:
    """LayerRouting list → per-layer ``(B, E, *grid)`` gate maps."""
    maps = []
    for r in routing:
        idx, gates = r.indices, r.gates.float()  # (B, *grid, k)
        full = torch.zeros(*idx.shape[:-1], num_experts, device=idx.device)
        full.scatter_(-1, idx, gates)
        maps.append(torch.movedim(full, -1, 1).contiguous())
    return maps


class Segmenter:
    """A checkpointed model ready to segment images.

    Args:
        model: a network from ``training.networks.create_model`` (eval mode).
        metadata: the checkpoint's metadata (class names, attribute, preprocessing, ...).
        device: where to run.
    """

    def __init__(self, model: torch.nn.Module, metadata: dict[str, Any],
                 device: str | torch.device = "auto") -> None:
        from .data import Preprocessing
        from .data.transforms import GEOMETRY_KEYS

        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.metadata = metadata
        self.preprocessing = Preprocessing.from_dict(metadata["preprocessing"])
        if self.preprocessing.spatial_dims == 3 and not any(
                k in metadata["preprocessing"] for k in GEOMETRY_KEYS):
            warnings.warn("this 3D checkpoint predates scanner geometry (no orientation or "
                          "spacing in its preprocessing): volumes go to the model in their "
                          "stored voxel order and spacing; retrain it for orientation-"
                          "independent results", UserWarning, stacklevel=2)
        kwargs = metadata["model"]["kwargs"]
        self.num_classes = int(kwargs["out_channels"])
        names = metadata.get("class_names") or ["background"] + [
            f"class{i}" for i in range(1, self.num_classes)]
        self.class_names = list(names)
        attribute = metadata.get("attribute") or {}
        self.attribute_name: str | None = attribute.get("name")
        self.vocabulary: list[str] = list(attribute.get("vocabulary") or [])
        from .networks.blocks import fold_moe_kwargs

        self.num_experts = int(fold_moe_kwargs(kwargs).get("moe_spec", {}).get("num_experts", 8))
        self.uses_attribute = (kwargs.get("moe") == "dmoe"
                               or metadata["model"].get("name") == "separate")
        self.overlap = DEFAULT_OVERLAP

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto") -> Segmenter:
        """Load a ``.safetensors`` checkpoint (ValueError with a readable reason if invalid)."""
        from .checkpoint import load_checkpoint

        model, meta = load_checkpoint(path, device="cpu")
        if "preprocessing" not in meta:
            raise ValueError(f"{path}: checkpoint has no preprocessing metadata; re-save it "
                             "with training.fit")
        return cls(model, meta, device=device)

    # -- descriptions ---------------------------------------------------------------------
    @property
    def spatial_dims(self) -> int:
        return self.preprocessing.spatial_dims

    @property
    def in_channels(self) -> int:
        return self.preprocessing.in_channels

    @property
    def has_routing(self) -> bool:
        """Whether the network has dMoE/MoE layers (``training.networks.DMoE``): only then
        does ``segment(return_routing=True)`` return routing maps and ``training.routing``
        have expert usage to report."""
        from .networks import DMoE

        return any(isinstance(m, DMoE) for m in self.model.modules())

    @property
    def description(self) -> str:
        """One line for UIs: architecture, MoE mode, attribute and classes."""
        kw = self.metadata["model"]["kwargs"]
        attr = f"{self.attribute_name} ({', '.join(self.vocabulary)})" if self.vocabulary else "—"
        return (f"{self.metadata['model']['name']} {kw.get('preset', '')} · {kw.get('moe')} · "
                f"{self.spatial_dims}D · attribute {attr} · classes {', '.join(self.class_names)}")

    def encode(self, attribute_value: str | None) -> tuple[int, str]:
        """Attribute value → (router index, value used); unknown/unseen → (-1, "unknown")."""
        if attribute_value in (None, "", UNKNOWN) or attribute_value not in self.vocabulary:
            return -1, UNKNOWN
        return self.vocabulary.index(attribute_value), attribute_value

    def unseen_values(self, values) -> list[str]:
        """One warning per distinct attribute value in ``values`` that training never saw
        (it is routed as unknown), suggesting a close or case-insensitive match."""
        import difflib

        if not self.uses_attribute or not self.vocabulary:
            return []
        lines, lowered = [], {v.lower(): v for v in self.vocabulary}
        for value in dict.fromkeys(v for v in values if v not in (None, "", UNKNOWN)):
            if value in self.vocabulary:
                continue
            if "," in (self.attribute_name or ""):
                lines.append(self._unseen_combination(str(value)))
                continue
            close = lowered.get(str(value).strip().lower()) or next(iter(
                difflib.get_close_matches(str(value), self.vocabulary, n=1, cutoff=0.6)), None)
            hint = f"; did you mean {close!r}?" if close else ""
            lines.append(f"warning: {self.attribute_name} value {value!r} was never seen in "
                         f"training (known: {', '.join(self.vocabulary)}); it is routed as "
                         f"unknown{hint}")
        return lines

    def _unseen_combination(self, value: str) -> str:
        """The warning for an intersectional value (``"Black|female"`` of ``race,gender``)
        outside the vocabulary: which part is unknown (with a close match of that part), or
        that only the combination is new. Whole-string close matches would point at another
        group (``"Black|male"`` for ``"Black|female"``)."""
        import difflib

        from .data import COMBINATION_SEPARATOR

        names = [n.strip() for n in self.attribute_name.split(",")]
        known = [sorted({v.split(COMBINATION_SEPARATOR)[i] for v in self.vocabulary})
                 for i in range(len(names))]
        parts = value.split(COMBINATION_SEPARATOR)
        head = (f"warning: {self.attribute_name} value {value!r} was never seen in training; "
                "it is routed as unknown")
        if len(parts) != len(names):
            return (f"{head} (give one value per attribute, joined by "
                    f"{COMBINATION_SEPARATOR!r}, e.g. {self.vocabulary[0]!r})")
        problems = []
        for name, part, seen in zip(names, parts, known, strict=True):
            if part in seen:
                continue
            lowered = {v.lower(): v for v in seen}
            close = lowered.get(part.strip().lower()) or next(iter(
                difflib.get_close_matches(part, seen, n=1, cutoff=0.6)), None)
            hint = f", did you mean {close!r}?" if close else ""
            problems.append(f"{name} {part!r} is not a known value (known: "
                            f"{', '.join(seen)}){hint}")
        if problems:
            return f"{head}: " + "; ".join(problems)
        return (f"{head}: each of its values was seen, but not this combination (known "
                f"combinations: {', '.join(self.vocabulary)})")

    # -- input checks ---------------------------------------------------------------------
    def _channels_first(self, image: np.ndarray, channel_axis: int | None) -> np.ndarray:
        image = np.asarray(image)
        sd, shape = self.spatial_dims, np.shape(image)
        kind = {2: "2D images", 3: "3D volumes"}[sd]
        if channel_axis is None:
            if image.ndim == sd:
                return image[None]
            if image.ndim == sd + 1 and (shape[-1] <= 4 or shape[0] <= 4):
                channel_axis = -1 if shape[-1] <= 4 else 0
            elif image.ndim == 3 and sd == 2:
                raise ValueError(f"This model segments 2D images, but the image looks like a 3D "
                                 f"volume {shape}. Pick a 3D model or segment a single slice.")
            else:
                raise ValueError(f"This model segments {kind}, but the image has shape {shape}; "
                                 "pick a model made for this kind of image.")
        image = np.moveaxis(image, channel_axis, 0)
        if image.ndim != sd + 1:
            raise ValueError(f"This model segments {kind}, but the image without its channel "
                             f"axis has shape {image.shape[1:]}.")
        if image.shape[0] == 4 and self.in_channels == 3:
            image = image[:3]  # RGBA → RGB
        return image

    def convert_channels(self, image: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """``(C, *spatial)`` -> the model's channels, with a one-line notice per conversion.

        RGB(A) into a grayscale model: luminance (ITU-R 601, as PIL's "L") or the channel
        the checkpoint's ``gray_from`` names; grayscale into an RGB model: replicated.
        Other mismatches are left for :meth:`check_image` to refuse.
        """
        arr = np.asarray(image)
        pre = self.preprocessing
        if arr.shape[0] in (3, 4) and self.in_channels == 1:
            rgb = arr[:3].astype(np.float32)
            if pre.gray_from == "luminance":
                gray = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
                how = "luminance (0.299 R + 0.587 G + 0.114 B)"
            else:
                gray = rgb[("red", "green", "blue").index(pre.gray_from)]
                how = f"its {pre.gray_from} channel"
            return gray[None], [f"RGB image converted to grayscale by {how}: the model was "
                                "trained on grayscale images."]
        if arr.shape[0] == 1 and self.in_channels == 3:
            return np.repeat(arr, 3, axis=0), [
                "grayscale image replicated to R, G and B: the model was trained on RGB images."]
        return arr, []

    def check_image(self, image: np.ndarray, *, channel_axis: int | None = None) -> np.ndarray:
        """Raise a user-facing ValueError if the image cannot go through this model.

        RGB into a grayscale model and grayscale into an RGB model are converted
        (:meth:`convert_channels`).

        Returns:
            The image as ``(C, *spatial)`` with the model's channel count.
        """
        arr, _ = self.convert_channels(self._channels_first(image, channel_axis))
        if arr.shape[0] != self.in_channels:
            raise ValueError(
                f"The model expects {self.in_channels} channel(s) "
                f"({'RGB' if self.in_channels == 3 else 'grayscale'}), the image has "
                f"{arr.shape[0]}. Use a model trained on this kind of image.")
        if min(arr.shape[1:]) < MIN_SIDE:
            raise ValueError(f"The image is too small ({'×'.join(map(str, arr.shape[1:]))} "
                             f"pixels); each side needs at least {MIN_SIDE}.")
        if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
            raise ValueError(f"The image has dtype {arr.dtype}; expected real numbers.")
        if np.issubdtype(arr.dtype, np.floating):
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            if bad:
                raise ValueError(f"The image contains {bad} NaN or infinite values; fill or "
                                 "mask them before segmenting.")
        return arr

    # -- running --------------------------------------------------------------------------
    def _autocast(self):
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return torch.autocast(self.device.type, enabled=False)

    @torch.no_grad()
    def segment(
        self,
        image: np.ndarray,
        attribute_value: str | None = None,
        *,
        channel_axis: int | None = None,
        return_routing: bool = False,
        return_probabilities: bool = False,
        progress: Callable[[int, int], None] | None = None,
        should_cancel: Callable[[], bool] | None = None,
        affine: np.ndarray | None = None,
    ) -> SegmentationResult:
        """Segment one image.

        Args:
            image: 2D ``(H, W)`` / ``(H, W, C)`` / ``(C, H, W)`` or 3D ``(X, Y, Z)`` (NIfTI
                array order) / ``(C, X, Y, Z)``, raw intensities.
            attribute_value: the patient's attribute value; None/"unknown"/unseen values use
                the unknown-attribute path.
            channel_axis: where the channels are, if any (guessed when None).
            return_routing: add per-layer :class:`RoutingMap` s.
            return_probabilities: add softmax probabilities ``(K, *spatial)``.
            progress: called as ``progress(done, total)``.
            should_cancel: polled between steps; True → :class:`Cancelled`.
            affine: 3D only: the volume's 4x4 voxel-to-RAS affine (NIfTI, DICOM). With a
                checkpoint that knows geometry, the volume is brought to its orientation and
                spacing, and the prediction is mapped back onto the input's voxel grid
                (probabilities resampled, then argmax), so ``labels`` keep the input's
                shape and affine.
        """
        start = time.perf_counter()
        arr, notices = self.convert_channels(self._channels_first(image, channel_axis))
        arr = self.check_image(arr, channel_axis=0)
        attr_index, used = self.encode(attribute_value)
        if self.spatial_dims == 3 and self.preprocessing.uses_geometry and affine is None:
            notices.append("no affine given: the volume is assumed to be stored in the model's "
                           f"orientation ({self.preprocessing.orientation or 'as trained'}) "
                           "and spacing.")
        x, geometry = self.preprocessing.prepare(arr, affine if self.spatial_dims == 3 else None)
        canonical = geometry.get("canonical")
        if canonical is not None and (canonical.reorients or canonical.resamples):
            notices.append(f"volume resampled for the model: {canonical.describe()}; the "
                           "mask is mapped back onto the input's grid.")
        x = x[None].to(self.device)
        attr = torch.tensor([attr_index], device=self.device)
        cancel = should_cancel or (lambda: False)
        if cancel():
            raise Cancelled("cancelled before start")
        with self._autocast():
            if self.spatial_dims == 2:
                logits, gates, names, strides = self._run_whole(x, attr, return_routing)
                if progress:
                    progress(1, 1)
            else:
                logits, gates, names, strides = self._run_sliding(
                    x, attr, return_routing, progress, cancel)
        logits = self.preprocessing.restore(logits.float(), geometry)[0]
        if canonical is not None:
            from .data.geometry import from_canonical, labels_from_canonical

            model_probs = torch.softmax(logits, 0).cpu()
            del logits
            if return_probabilities:  # resample once; argmax keeps ties on the lower class
                probs = from_canonical(model_probs, canonical)
                labels = probs.argmax(0).astype(np.int32)
            else:  # one class at a time: memory of two source-grid channels, not K
                probs, labels = None, labels_from_canonical(model_probs, canonical)
        else:
            labels = logits.argmax(0).to(torch.int32).cpu().numpy()
            probs = torch.softmax(logits, 0).cpu().numpy() if return_probabilities else None
        routing = [self._place(n, g[0], s, geometry) for n, g, s in zip(names, gates, strides)]
        return SegmentationResult(labels, used, self.class_names, routing, probs,
                                  time.perf_counter() - start, notices)

    def _run_whole(self, x, attr, return_routing):
        out = self.model(x, attr, return_routing=return_routing)
        if not return_routing:
            return out, [], [], []
        gates = [g.float().cpu() for g in _gate_maps(out.routing, self.num_experts)]
        return (out.logits, gates, [r.name for r in out.routing],
                [tuple(r.grid_stride) for r in out.routing])

    def _run_sliding(self, x, attr, return_routing, progress, cancel):
        from monai.inferers import sliding_window_inference

        roi = tuple(self.preprocessing.patch_size or x.shape[2:])
        total = _count_windows(tuple(x.shape[2:]), roi, self.overlap)
        done = 0
        meta: dict[str, Any] = {}

        def predictor(patch, attr_batch):
            nonlocal done
            if cancel():
                raise Cancelled(f"cancelled after {done} of {total} windows")
            out = self.model(patch, attr_batch.expand(patch.shape[0]),
                             return_routing=return_routing)
            done += patch.shape[0]
            if progress:
                progress(min(done, total), total)
            if not return_routing:
                return out
            meta["names"] = [r.name for r in out.routing]
            meta["strides"] = [tuple(r.grid_stride) for r in out.routing]
            return (out.logits, *_gate_maps(out.routing, self.num_experts))

        result = sliding_window_inference(
            x, roi, sw_batch_size=1, predictor=predictor, overlap=self.overlap,
            mode="gaussian", padding_mode="constant", cval=float(x.min()), progress=False,
            attr_batch=attr,
        )  # fmt: skip
        if not return_routing:
            return result, [], [], []
        logits, *gates = result
        return logits, [g.float().cpu() for g in gates], meta["names"], meta["strides"]

    def _place(self, name, gates, stride, geometry) -> RoutingMap:
        """Express a model-space routing grid in the original image's pixel coordinates."""
        if self.spatial_dims == 2:
            top, left, h, w = geometry["crop_box"]
            sh, sw = geometry["size"]
            scale = (h / sh, w / sw)
            stride = tuple(float(s) * f for s, f in zip(stride, scale))
            offset = (float(top), float(left))
        else:
            # sliding-window outputs were resized to the volume: one cell per stride voxels
            shape = geometry["original_shape"]
            canonical = geometry.get("canonical")
            if canonical is not None:  # the grid spans the volume: undo flips/permutation
                from .data.geometry import to_source_grid_cells

                gates, shape = to_source_grid_cells(gates, canonical), canonical.source_shape
            stride = tuple(float(n) / g for n, g in zip(shape, gates.shape[1:]))
            offset = (0.0,) * 3
        return RoutingMap(name, gates.numpy(), stride, offset)


def _count_windows(image: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """Sliding windows MONAI will run (its scan-interval rule)."""
    n = 1
    for size, r in zip(image, roi):
        r = min(r, size) if size < r else r
        if size <= r:
            continue
        interval = max(int(r * (1 - overlap)), 1)
        n *= math.ceil((size - r) / interval) + 1
    return n
