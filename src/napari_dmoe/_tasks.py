"""The widget's work as plain functions, testable without a viewer or Qt.

- Layer data <-> model input: napari shows 3D as ``(Z, Y, X)``; models take NIfTI order
  ``(X, Y, Z)`` (``_reader``'s convention), so 3D arrays are transposed with ``(2, 1, 0)``
  on the way in and out. 2D images (grayscale ``(H, W)`` or RGB ``(H, W, C)``) go as they are.
- :func:`segment_steps`: a generator (the body of the widget's ``thread_worker``) that runs
  ``Segmenter.segment`` for one or more attribute values in a helper thread and yields
  :class:`Progress` (windows done / total) until it finishes; closing the generator
  (``worker.quit()``) or setting the cancel event stops the run at the next window.
- Results: routing-map placement in world coordinates, expert usage, areas/volumes in
  physical units, Dice/IoU against a ground truth, disagreement between attribute values.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._reader import META

UNKNOWN = "unknown"


@dataclass
class Progress:
    """One progress report: ``done`` of ``total`` steps of run ``run`` (1-based) of ``runs``."""

    done: int
    total: int
    value: str
    run: int = 1
    runs: int = 1


# -- layer <-> model arrays ---------------------------------------------------------------
def layer_spatial_ndim(data_ndim: int, rgb: bool) -> int:
    """Spatial dimensions of an Image layer (RGB layers have a trailing channel axis)."""
    return data_ndim - 1 if rgb else data_ndim


def model_input(data: Any, *, rgb: bool) -> tuple[np.ndarray, int | None]:
    """Image layer data -> (array in training order, channel axis or None).

    ``(H, W)`` -> ``(H, W)``; RGB ``(H, W, C)`` -> same, channel axis -1; a volume
    ``(Z, Y, X)`` -> ``(X, Y, Z)``; an RGB volume ``(Z, Y, X, C)`` -> ``(X, Y, Z, C)``.
    Other dimensionalities are returned untouched (the model's fit check explains).
    """
    array = np.asarray(data)
    spatial = layer_spatial_ndim(array.ndim, rgb)
    if spatial == 3:
        order = (2, 1, 0, 3) if rgb else (2, 1, 0)
        array = np.transpose(array, order)
    return array, (-1 if rgb else None)


def layer_labels(labels: np.ndarray) -> np.ndarray:
    """Model-order labels ``(*spatial)`` -> layer order (3D transposed back to ``(Z, Y, X)``)."""
    labels = np.asarray(labels)
    if labels.ndim == 3:
        labels = np.transpose(labels, (2, 1, 0))
    out_dtype = np.uint8 if labels.size == 0 or labels.max() < 256 else np.int32
    return np.ascontiguousarray(labels, dtype=out_dtype)


def result_name(image: str, model: str, value: str) -> str:
    """Name of a segmentation layer: ``"<image> · <model> · <attribute value>"``."""
    return f"{image} · {model} · {value}"


def preselect_value(metadata: dict[str, Any] | None, attribute: str | None,
                    vocabulary: Sequence[str]) -> str:
    """The layer's attribute value if the model knows it, else ``"unknown"``."""
    attributes = ((metadata or {}).get(META) or {}).get("attributes") or {}
    value = attributes.get(attribute) if attribute else None
    return value if value in vocabulary else UNKNOWN


# -- running ------------------------------------------------------------------------------
def segment_steps(segmenter: Any, image: np.ndarray, values: Sequence[str], *,
                  channel_axis: int | None = None, return_routing: bool = False,
                  cancel: threading.Event | None = None, poll: float = 0.05,
                  ) -> Generator[Progress, None, dict[str, Any]]:
    """Segment ``image`` under each attribute value, yielding progress.

    Returns (as the generator's return value) ``{value: SegmentationResult}``. Raises
    ``training.inference.Cancelled`` when ``cancel`` is set during a run, and whatever
    ``segment`` raises (``ValueError`` for images that do not fit the model).
    """
    cancel = cancel or threading.Event()
    results: dict[str, Any] = {}
    for run, value in enumerate(values, start=1):
        yield Progress(0, 0, value, run, len(values))

        def call(progress, should_cancel, value=value):
            return segmenter.segment(image, value, channel_axis=channel_axis,
                                     return_routing=return_routing, progress=progress,
                                     should_cancel=should_cancel)

        results[value] = yield from _in_thread(call, cancel, value, run, len(values), poll)
    return results


def _in_thread(call: Callable[..., Any], cancel: threading.Event, value: str, run: int,
               runs: int, poll: float) -> Generator[Progress, None, Any]:
    """Run ``call(progress=..., should_cancel=...)`` in a helper thread, yielding progress."""
    reports: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = call(progress=lambda d, t: reports.put((d, t)),
                                 should_cancel=cancel.is_set)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, name="napari-dmoe-segment", daemon=True)
    thread.start()
    try:
        while True:
            thread.join(poll)
            latest = None
            while not reports.empty():
                latest = reports.get_nowait()
            if latest is not None:
                yield Progress(latest[0], latest[1], value, run, runs)
            if not thread.is_alive():
                break
    finally:
        if thread.is_alive():  # the generator was closed (worker.quit()): stop the run
            cancel.set()
            thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


# -- routing maps -------------------------------------------------------------------------
def routing_geometry(stride: Sequence[float], offset: Sequence[float],
                     image_scale: Sequence[float], image_translate: Sequence[float],
                     ) -> tuple[list[float], list[float]]:
    """World ``(scale, translate)`` of a routing grid, in layer axis order.

    Grid cell ``i`` covers image pixels ``[offset + i*stride, offset + (i+1)*stride)``
    (pixel edges). napari puts pixel ``j``'s centre at ``translate + j*scale``, so the
    cell's centre is at pixel ``offset + (i + 1/2)*stride - 1/2``; hence
    ``scale = image_scale*stride`` and
    ``translate = image_translate + image_scale*(offset + (stride - 1)/2)``.
    ``stride``/``offset`` must already be in layer order.
    """
    scale = [float(s) * float(k) for s, k in zip(image_scale, stride)]
    translate = [float(t) + float(s) * (float(o) + (float(k) - 1.0) / 2.0)
                 for t, s, k, o in zip(image_translate, image_scale, stride, offset)]
    return scale, translate


def routing_layers(routing_map: Any, image_scale: Sequence[float],
                   image_translate: Sequence[float]) -> dict[str, Any]:
    """Layer-order arrays and geometry of one dMoE layer's routing.

    Returns ``{"experts": (*grid) uint8 (top-1 expert + 1, so expert 0 is not
    background), "gate": (*grid) float32 top-1 gate weight, "scale", "translate",
    "num_experts"}``.
    """
    experts = np.asarray(routing_map.top1_expert)
    gate = np.asarray(routing_map.top1_gate, dtype=np.float32)
    stride, offset = list(routing_map.grid_stride), list(routing_map.grid_offset)
    if experts.ndim == 3:
        experts, gate = np.transpose(experts, (2, 1, 0)), np.transpose(gate, (2, 1, 0))
        stride, offset = stride[::-1], offset[::-1]
    scale, translate = routing_geometry(stride, offset, image_scale, image_translate)
    return {"experts": (experts + 1).astype(np.uint8), "gate": np.ascontiguousarray(gate),
            "scale": scale, "translate": translate,
            "num_experts": int(routing_map.num_experts)}


def expert_features(num_experts: int) -> dict[str, list]:
    """Labels features for a top-1 expert map (label ``e + 1`` is expert ``e``)."""
    return {"index": list(range(num_experts + 1)),
            "expert": ["—"] + [f"expert {e}" for e in range(num_experts)]}


def expert_usage_rows(routing_map: Any, labels: np.ndarray, class_names: Sequence[str]
                      ) -> list[list[float]]:
    """Per class (model order labels): share of its grid cells routed to each expert."""
    from ._compat import prepare_torch

    prepare_torch()
    from training.inference import expert_usage

    usage = expert_usage(routing_map, np.asarray(labels), len(class_names))
    return [list(map(float, row)) for row in usage]


# -- measurements -------------------------------------------------------------------------
def unit_of(units: Sequence[Any] | None, ndim: int) -> str:
    """``"mm²"``/``"mm³"`` etc. from layer units; ``"px"``/``"voxels"`` without a unit."""
    names = {str(u) for u in (units or ())}
    names.discard("pixel")
    if len(names) == 1:
        short = {"millimeter": "mm", "micrometer": "µm", "nanometer": "nm",
                 "centimeter": "cm", "meter": "m"}
        name = next(iter(names))
        return f"{short.get(name, name)}{'²' if ndim == 2 else '³'}"
    return "px" if ndim == 2 else "voxels"


def measure(labels: np.ndarray, class_names: Sequence[str], voxel_size: Sequence[float]
            ) -> list[float]:
    """Physical area/volume of each foreground class (voxel count x voxel size)."""
    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64),
                         minlength=len(class_names))
    cell = float(np.prod([abs(float(v)) for v in voxel_size])) if len(voxel_size) else 1.0
    return [float(counts[k]) * cell for k in range(1, len(class_names))]


def scores_vs_truth(pred: np.ndarray, truth: np.ndarray, num_classes: int
                    ) -> dict[str, np.ndarray]:
    """Dice and IoU per foreground class (``training.metrics.case_scores``).

    Raises:
        ValueError: shapes differ or the ground truth holds labels the model lacks.
    """
    from training.metrics import case_scores

    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"ground truth shape {truth.shape} differs from the segmentation's "
                         f"{pred.shape}")
    if truth.size and (truth.min() < 0 or truth.max() >= num_classes):
        raise ValueError(f"ground truth holds label {int(truth.max())}, but the model has "
                         f"only {num_classes} classes")
    return case_scores(pred.astype(np.int64), truth.astype(np.int64), num_classes)


def disagreement(label_maps: Sequence[np.ndarray], num_classes: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Majority label and, per pixel, how many maps disagree with it.

    Args:
        label_maps: V label maps of one shape.
        num_classes: K.

    Returns:
        ``(majority, count)``, both ``(*spatial)``; ``count`` is in ``[0, V - 1]``
        (ties go to the lower class index).
    """
    if not label_maps:
        raise ValueError("disagreement needs at least one label map")
    votes = np.zeros((num_classes, *np.shape(label_maps[0])), dtype=np.int16)
    for labels in label_maps:
        for k in range(num_classes):
            votes[k] += np.asarray(labels) == k
    majority = votes.argmax(0)
    agree = np.take_along_axis(votes, majority[None], 0)[0]
    return majority.astype(np.uint8), (len(label_maps) - agree).astype(np.uint8)


def find_ground_truth(layers: Sequence[Any], image: Any, shape: tuple[int, ...]) -> Any:
    """A Labels layer holding the image's ground truth, or None.

    Prefers layers marked ``metadata["napari_dmoe"]["role"] == "ground_truth"`` for this
    image, then any layer named like "... ground truth"; the shape must match.
    """
    candidates = []
    for layer in layers:
        if type(layer).__name__ != "Labels" or tuple(np.shape(layer.data)) != tuple(shape):
            continue
        meta = (layer.metadata or {}).get(META) or {}
        if meta.get("role") == "ground_truth":
            candidates.append((0 if meta.get("image") == image.name else 2, layer))
        elif "ground truth" in layer.name.lower():
            candidates.append((1 if layer.name.startswith(image.name) else 3, layer))
    candidates.sort(key=lambda item: item[0])
    return candidates[0][1] if candidates else None
