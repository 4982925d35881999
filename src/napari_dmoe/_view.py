"""Turn segmentation results into napari layers (aligned with the image) and HTML tables.

Every derived layer copies the image's ``scale``, ``translate``, ``units``, ``affine`` and
metadata (so NIfTI affine/header travel to the writer); routing grids get their own scale
and translate from ``_tasks.routing_layers`` so each grid cell covers exactly its pixels.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from . import _tables, _tasks
from ._reader import META, class_features


def _geometry(layer: Any) -> dict[str, Any]:
    return {"scale": list(layer.scale), "translate": list(layer.translate),
            "units": tuple(layer.units), "affine": layer.affine}


def _metadata(layer: Any, **extra: Any) -> dict[str, Any]:
    meta = copy.deepcopy(dict(layer.metadata or {}))
    meta[META] = {**(meta.get(META) or {}), **extra}
    return meta


def _is_ours(layer: Any) -> bool:
    return ((layer.metadata or {}).get(META) or {}).get("role") == "ground_truth"


def _ndim(layer: Any) -> int:
    return _tasks.layer_spatial_ndim(np.ndim(layer.data), bool(getattr(layer, "rgb", False)))


def _segmentation(viewer: Any, image: Any, model: str, segmenter: Any, result: Any,
                  visible: bool = True) -> Any:
    labels = _tasks.layer_labels(result.labels)
    name = _tasks.result_name(image.name, model, result.attribute_value)
    meta = _metadata(image, role="segmentation", image=image.name, model=model,
                     segmented_as={segmenter.attribute_name or "attribute":
                                   result.attribute_value},
                     class_names=list(segmenter.class_names))
    return viewer.add_labels(labels, name=name, metadata=meta, opacity=0.5, visible=visible,
                             features=class_features(segmenter.class_names), **_geometry(image))


def _truth_scores(viewer: Any, image: Any, labels: np.ndarray, num_classes: int
                  ) -> tuple[Any, dict[str, np.ndarray] | None, str]:
    truth = _tasks.find_ground_truth(viewer.layers, image, labels.shape)
    if truth is None:
        return None, None, ""
    try:
        return truth, _tasks.scores_vs_truth(labels, np.asarray(truth.data), num_classes), ""
    except ValueError as exc:
        return truth, None, _tables.message(f"No Dice against '{truth.name}': {exc}")


def add_segmentation_layer(viewer: Any, image: Any, model: str, segmenter: Any,
                           result: Any) -> tuple[Any, str]:
    """Add the Labels layer of one result; returns it and the results HTML."""
    layer = _segmentation(viewer, image, model, segmenter, result)
    names = list(segmenter.class_names)
    ndim = _ndim(image)
    unit = _tasks.unit_of(image.units, ndim)
    sizes = _tasks.measure(layer.data, names, list(image.scale)[-ndim:])
    what = "Area" if ndim == 2 else "Volume"
    html = _tables.measure_table(what, names, {result.attribute_value: sizes}, unit)
    truth, scores, problem = _truth_scores(viewer, image, np.asarray(layer.data), len(names))
    if scores is not None:
        html = _tables.scores_table(names, scores, truth.name) + html
    if truth is not None and _is_ours(truth) and truth.contour == 0:
        truth.contour = 2  # outline the truth so the filled prediction shows beneath
    return layer, html + problem


def add_routing_layers(viewer: Any, image: Any, labels_layer: Any, segmenter: Any,
                       result: Any) -> str:
    """Per dMoE layer: top-1 expert (Labels) and its gate weight (Image); usage tables."""
    html = []
    names = list(segmenter.class_names)
    for i, routing in enumerate(result.routing):
        data = _tasks.routing_layers(routing, list(image.scale), list(image.translate))
        base = f"{image.name} · {routing.name}"
        meta = {META: {"role": "routing", "image": image.name, "dmoe_layer": routing.name,
                       "grid_stride": list(routing.grid_stride)}}
        geometry = {"scale": data["scale"], "translate": data["translate"],
                    "units": tuple(image.units), "affine": image.affine}
        viewer.add_labels(data["experts"], name=f"{base} · top-1 expert", metadata=meta,
                          features=_tasks.expert_features(data["num_experts"]),
                          opacity=0.35, visible=i == 0, **geometry)
        viewer.add_image(data["gate"], name=f"{base} · gate", metadata=copy.deepcopy(meta),
                         colormap="viridis", contrast_limits=(0.0, 1.0), opacity=0.6,
                         visible=False, **geometry)
        usage = _tasks.expert_usage_rows(routing, result.labels, names)
        html.append(_tables.usage_table(routing.name, names, usage))
    viewer.layers.selection.active = labels_layer
    return "".join(html)


def add_compare_layers(viewer: Any, image: Any, model: str, segmenter: Any,
                       results: dict[str, Any]) -> str:
    """One Labels layer per attribute value, a disagreement map and the area/volume table."""
    names = list(segmenter.class_names)
    layers = {value: _segmentation(viewer, image, model, segmenter, result, visible=False)
              for value, result in results.items()}
    maps = [np.asarray(layer.data) for layer in layers.values()]
    majority, count = _tasks.disagreement(maps, len(names))
    n = len(maps)
    viewer.add_image(count.astype(np.float32), name=f"{image.name} · {model} · disagreement",
                     metadata=_metadata(image, role="compare", image=image.name, model=model,
                                        values=list(results)),
                     colormap="inferno", blending="additive",
                     contrast_limits=(0.0, float(max(1, n - 1))), **_geometry(image))
    ndim = _ndim(image)
    unit = _tasks.unit_of(image.units, ndim)
    sizes = {value: _tasks.measure(layer.data, names, list(image.scale)[-ndim:])
             for value, layer in layers.items()}
    extra: dict[str, dict[str, float]] = {"Dice vs\nmajority": {}}
    truth = _tasks.find_ground_truth(viewer.layers, image, majority.shape)
    for value, labels in zip(layers, maps, strict=True):
        extra["Dice vs\nmajority"][value] = float(np.mean(
            _tasks.scores_vs_truth(labels, majority, len(names))["dice"]))
        if truth is not None:
            try:
                scores = _tasks.scores_vs_truth(labels, np.asarray(truth.data), len(names))
            except ValueError:
                continue
            extra.setdefault("Dice vs\ntruth", {})[value] = float(np.mean(scores["dice"]))
    patient = _tasks.preselect_value(image.metadata, segmenter.attribute_name,
                                     segmenter.vocabulary)
    differing = int(np.count_nonzero(count))
    title = f"{'Area' if ndim == 2 else 'Volume'} per {segmenter.attribute_name or 'value'}"
    summary = _tables.message(
        f"{differing} {'pixels' if ndim == 2 else 'voxels'} change class with the attribute "
        f"value (bright in the disagreement map; the value layers are hidden, tick them to "
        f"view).")
    return summary + _tables.measure_table(title, names, sizes, unit, extra, highlight=patient,
                                           first=segmenter.attribute_name or "value")
