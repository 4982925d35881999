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


def voxel_affine(layer: Any) -> np.ndarray | None:
    """The 4x4 voxel-to-RAS affine of a 3D image layer's model input ``(X, Y, Z)``.

    Exact from the reader's metadata (NIfTI, DICOM: ``voxel_affine``); otherwise taken from
    the layer's placement (scale, translate, rotation, affine; world axes read as
    ``(S, A, R)`` like the reader's layers) when the layer has a physical scale, and
    ``None`` for a plain array (the model then sees it in stored order, and says so).
    """
    meta = (getattr(layer, "metadata", None) or {}).get(META) or {}
    if meta.get("voxel_affine") is not None:
        return np.asarray(meta["voxel_affine"], dtype=np.float64)
    if layer_spatial_ndim(np.ndim(layer.data), bool(getattr(layer, "rgb", False))) != 3:
        return None
    if np.allclose(np.asarray(layer.scale)[-3:], 1.0) and np.allclose(
            np.asarray(layer.affine.affine_matrix), np.eye(len(layer.scale) + 1)):
        return None
    origin = np.asarray(layer.data_to_world((0, 0, 0)), dtype=np.float64)
    affine = np.eye(4)
    for data_axis in range(3):  # data (z, y, x) -> world (S, A, R); reversed to (x,y,z)->RAS
        step = np.zeros(3)
        step[data_axis] = 1.0
        column = np.asarray(layer.data_to_world(tuple(step)), dtype=np.float64) - origin
        affine[:3, 2 - data_axis] = column[::-1]
    affine[:3, 3] = origin[::-1]
    return affine


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
@dataclass
class RunOutput:
    """What a run hands back: the values that finished and whether it was cancelled.

    ``results`` maps attribute value -> ``SegmentationResult`` for every value that
    finished before a cancel (a cancelled Compare keeps its finished values).
    """

    results: dict[str, Any]
    cancelled: bool = False


@dataclass
class RunOptions:
    """How to run one image (all optional).

    Attributes:
        channel_axis: where the image's channels are (None: no channel axis).
        return_routing / return_probabilities: passed to ``Segmenter.segment``.
        region: 2D only, ``(row0, row1, col0, col1)`` in image pixels: segment that crop
            and paste the result into a full-size mask (background elsewhere).
        slices: a 2D model on a 3D stack ``(Z, Y, X[, C])``: segment slice by slice.
        affine: 3D only, the voxel-to-RAS affine of the ``(X, Y, Z)`` model input
            (:func:`voxel_affine`); the model reorients and resamples with it and maps the
            mask back onto the layer's grid. ``None``: stored order, no resampling.
    """

    channel_axis: int | None = None
    return_routing: bool = False
    return_probabilities: bool = False
    region: tuple[int, int, int, int] | None = None
    slices: bool = False
    affine: np.ndarray | None = None


def segment_steps(segmenter: Any, image: np.ndarray, values: Sequence[str], *,
                  channel_axis: int | None = None, return_routing: bool = False,
                  options: RunOptions | None = None,
                  cancel: threading.Event | None = None, poll: float = 0.05,
                  ) -> Generator[Progress, None, RunOutput]:
    """Segment ``image`` under each attribute value, yielding progress.

    Returns (as the generator's return value) a :class:`RunOutput`; a cancel (the event
    set, or ``training.inference.Cancelled`` from the model) ends the generator normally
    with ``cancelled=True`` and the values already finished, so a Qt worker running it
    always reaches ``returned`` and ``finished``. Other errors (``ValueError`` for
    images that do not fit the model) propagate.
    """
    from ._compat import prepare_torch

    prepare_torch()
    from training.inference import Cancelled

    options = options or RunOptions(channel_axis=channel_axis, return_routing=return_routing)
    cancel = cancel or threading.Event()
    results: dict[str, Any] = {}
    for run, value in enumerate(values, start=1):
        if cancel.is_set():
            return RunOutput(results, cancelled=True)
        yield Progress(0, 0, value, run, len(values))

        def call(progress, should_cancel, value=value):
            return segment_one(segmenter, image, value, options, progress, should_cancel)

        try:
            results[value] = yield from run_in_thread(call, cancel, value, run, len(values),
                                                   poll)
        except Cancelled:
            return RunOutput(results, cancelled=True)
    return RunOutput(results, cancelled=cancel.is_set() and len(results) < len(values))


def segment_one(segmenter: Any, image: np.ndarray, value: str, options: RunOptions,
                progress: Callable[[int, int], None] | None = None,
                should_cancel: Callable[[], bool] | None = None) -> Any:
    """One ``Segmenter.segment`` call with the region / slice-by-slice options applied."""
    kwargs: dict[str, Any] = {"channel_axis": options.channel_axis,
                              "return_routing": options.return_routing,
                              "progress": progress, "should_cancel": should_cancel}
    if options.return_probabilities:
        kwargs["return_probabilities"] = True
    if options.affine is not None and not options.slices:
        kwargs["affine"] = options.affine
    if options.slices:
        return _segment_slices(segmenter, image, value, kwargs)
    if options.region is None:
        return segmenter.segment(image, value, **kwargs)
    r0, r1, c0, c1 = (int(v) for v in options.region)
    result = segmenter.segment(np.asarray(image)[r0:r1, c0:c1], value, **kwargs)
    return paste_region(result, np.shape(image)[:2], (r0, c0))


def paste_region(result: Any, shape: tuple[int, int], origin: tuple[int, int]) -> Any:
    """Put a crop's result back into a full-size ``shape`` mask at ``origin`` (row, col).

    Labels outside the crop are background; probabilities there are 1 for background;
    routing grids are shifted so they keep covering the crop's pixels.
    """
    from dataclasses import replace

    r0, c0 = origin
    h, w = np.shape(result.labels)
    labels = np.zeros(shape, dtype=np.asarray(result.labels).dtype)
    labels[r0:r0 + h, c0:c0 + w] = result.labels
    probs = None
    if result.probabilities is not None:
        k = result.probabilities.shape[0]
        probs = np.zeros((k, *shape), dtype=result.probabilities.dtype)
        probs[0] = 1.0
        probs[:, r0:r0 + h, c0:c0 + w] = result.probabilities
    routing = [replace(m, grid_offset=(m.grid_offset[0] + r0, m.grid_offset[1] + c0))
               for m in result.routing]
    return replace(result, labels=labels, probabilities=probs, routing=routing)


def _segment_slices(segmenter: Any, stack: np.ndarray, value: str, kwargs: dict[str, Any]
                    ) -> Any:
    """A 2D model over a stack in *model* order: slices along the last spatial axis.

    ``model_input`` has already turned the layer ``(Z, Y, X)`` into ``(X, Y, Z)``, so the
    slices are ``stack[:, :, z]`` (transposed back to ``(Y, X)`` for the model, which
    sees each slice as the layer shows it). No routing maps for stacks.
    """
    from dataclasses import replace

    stack = np.asarray(stack)
    rgb = kwargs["channel_axis"] is not None
    n = stack.shape[2]
    progress, cancel = kwargs.pop("progress"), kwargs["should_cancel"] or (lambda: False)
    kwargs = {**kwargs, "return_routing": False, "progress": None}
    labels, probs, seconds, last = [], [], 0.0, None
    for z in range(n):
        if cancel():
            from training.inference import Cancelled

            raise Cancelled(f"cancelled after {z} of {n} slices")
        plane = stack[:, :, z]
        plane = np.transpose(plane, (1, 0, 2) if rgb else (1, 0))
        last = segmenter.segment(plane, value, **kwargs)
        labels.append(np.asarray(last.labels).T)  # (Y, X) -> (X, Y)
        if last.probabilities is not None:
            probs.append(np.swapaxes(last.probabilities, 1, 2))
        seconds += last.seconds
        if progress:
            progress(z + 1, n)
    return replace(last, labels=np.stack(labels, -1), routing=[], seconds=seconds,
                   probabilities=np.stack(probs, -1) if probs else None)


def run_in_thread(call: Callable[..., Any], cancel: threading.Event, value: str, run: int,
               runs: int, poll: float) -> Generator[Progress, None, Any]:
    """Run ``call(progress=..., should_cancel=...)`` in a helper thread, yielding progress.

    The helper thread is always joined before this generator ends (normally, by an
    error, or closed at a ``yield``), so no model code outlives the worker.
    """
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

    Returns ``{"experts": (*grid) uint8 label ``n`` = expert ``En`` (experts are numbered
    from 1 in the plugin, so no expert is the background label 0), "gate": (*grid)
    float32 top-1 gate weight, "scale", "translate", "num_experts"}``.
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
    """Labels features for a top-1 expert map: label ``n`` is expert ``En``."""
    return {"index": list(range(num_experts + 1)),
            "expert": ["—"] + [f"E{n}" for n in range(1, num_experts + 1)]}


def expert_usage_rows(routing_map: Any, labels: np.ndarray, class_names: Sequence[str]
                      ) -> list[list[float]]:
    """Per class (model order labels): share of its grid cells routed to each expert."""
    from ._compat import prepare_torch

    prepare_torch()
    from training.inference import expert_usage

    usage = expert_usage(routing_map, np.asarray(labels), len(class_names))
    return [list(map(float, row)) for row in usage]


# -- measurements -------------------------------------------------------------------------
def unit_of(units: Sequence[Any] | None, ndim: int,
            scale: Sequence[float] | None = None) -> str:
    """Unit of an area (2D) or volume (3D) measured with the layer's ``scale``.

    ``"mm²"``/``"mm³"`` etc. from the layer units; without a unit, ``"px"``/``"voxels"``
    only when the scale is 1 (raw pixel counts), else ``"scaled units²"`` (the numbers
    are scaled, their unit is unknown).
    """
    names = {str(u) for u in (units or ())}
    names.discard("pixel")
    power = "²" if ndim == 2 else "³"
    if len(names) == 1:
        short = {"millimeter": "mm", "micrometer": "µm", "nanometer": "nm",
                 "centimeter": "cm", "meter": "m"}
        name = next(iter(names))
        return f"{short.get(name, name)}{power}"
    if scale is not None and any(abs(float(s) - 1.0) > 1e-9 for s in scale):
        return f"scaled units{power}"
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


# -- attribute switches -------------------------------------------------------------------
def switch_maps(results: dict[str, Any], patient: str) -> list[dict[str, Any]]:
    """Where the attribute value switches the experts, per dMoE layer.

    Args:
        results: ``{value: SegmentationResult}`` with routing maps (same image).
        patient: the value the others are compared with (must be in ``results``).

    Returns:
        One dict per dMoE layer: ``{"name", "count": (*grid) uint8`` number of values
        whose top-1 expert differs from the patient's value's at each cell, ``"fraction":
        {value: share of cells switched}``, ``"map":`` the patient's ``RoutingMap``}.
        Empty when the results carry no routing.
    """
    if patient not in results:
        raise ValueError(f"patient value {patient!r} is not among the compared values "
                         f"{sorted(results)}")
    base = results[patient].routing
    out = []
    for i, routing in enumerate(base):
        top = routing.top1_expert
        count = np.zeros(top.shape, np.uint8)
        fraction = {}
        for value, result in results.items():
            if value == patient or i >= len(result.routing):
                continue
            switched = result.routing[i].top1_expert != top
            count += switched.astype(np.uint8)
            fraction[value] = float(switched.mean()) if switched.size else 0.0
        out.append({"name": routing.name, "count": count, "fraction": fraction,
                    "map": routing})
    return out


def probability_map(probabilities: np.ndarray, kind: str = "max") -> np.ndarray:
    """``(K, *spatial)`` softmax -> ``(*spatial)`` float32: ``"max"`` probability of the
    predicted class, or ``"entropy"`` normalised to [0, 1] (divided by log K)."""
    p = np.asarray(probabilities, dtype=np.float32)
    if kind == "max":
        return p.max(0)
    if kind == "entropy":
        k = p.shape[0]
        h = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(0)
        return (h / np.log(k)).astype(np.float32) if k > 1 else np.zeros_like(h)
    raise ValueError(f"kind must be 'max' or 'entropy', got {kind!r}")
