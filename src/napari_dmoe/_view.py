"""Turn segmentation results into napari layers (aligned with the image) and HTML tables.

Every derived layer copies the image's ``scale``, ``translate``, ``units``, ``affine`` and
metadata (so NIfTI affine/header travel to the writer); routing grids get their own scale
and translate from ``_tasks.routing_layers`` so each grid cell covers exactly its pixels.

Colours: predictions are filled in bright colours that stand out over fundus and skin
images (cyan, yellow, lime, ...); a ground truth is drawn as contours in a different
palette (red, pink, orange, ...). Expert maps use one fixed palette: label value ``n`` is
expert ``En`` (experts are numbered from 1 in the plugin), the same in the layer, on
hover, in the legend and in the tables. Gate weights use the ``viridis`` colormap over
[0, 1] with napari's colour bar shown.

napari 0.9 has no layer groups: the routing layers of one run are added consecutively,
only the first is visible, and the routing layers of earlier runs are hidden.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from . import _tables, _tasks
from ._reader import META, class_features

PREDICTION_COLOURS = [(0.0, 0.9, 1.0), (1.0, 0.95, 0.0), (0.45, 1.0, 0.2), (1.0, 0.3, 1.0),
                      (0.35, 0.55, 1.0), (1.0, 1.0, 1.0)]
TRUTH_COLOURS = [(1.0, 0.2, 0.2), (1.0, 0.5, 0.85), (1.0, 0.6, 0.1), (0.7, 0.3, 1.0),
                 (0.6, 0.2, 0.2), (0.5, 0.5, 0.5)]
EXPERT_COLOURS = [(0.12, 0.47, 0.71), (1.0, 0.5, 0.05), (0.17, 0.63, 0.17),
                  (0.84, 0.15, 0.16), (0.58, 0.4, 0.74), (0.55, 0.34, 0.29),
                  (0.89, 0.47, 0.76), (0.5, 0.5, 0.5), (0.74, 0.74, 0.13),
                  (0.09, 0.75, 0.81)]
DERIVED_ROLES = ("routing", "compare", "switch", "probability")


def _geometry(layer: Any) -> dict[str, Any]:
    return {"scale": list(layer.scale), "translate": list(layer.translate),
            "units": tuple(layer.units), "affine": layer.affine}


def _metadata(layer: Any, **extra: Any) -> dict[str, Any]:
    meta = copy.deepcopy(dict(layer.metadata or {}))
    meta[META] = {**(meta.get(META) or {}), **extra}
    return meta


def _ndim(layer: Any) -> int:
    return _tasks.layer_spatial_ndim(np.ndim(layer.data), bool(getattr(layer, "rgb", False)))


def _palette(colours: list[tuple[float, float, float]], n: int, alpha: float = 1.0):
    from napari.utils.colormaps import DirectLabelColormap

    colour_dict: dict[int | None, tuple[float, ...]] = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
    for label in range(1, max(n, 1) + 1):
        colour_dict[label] = (*colours[(label - 1) % len(colours)], alpha)
    return DirectLabelColormap(color_dict=colour_dict)


def colour_hex(colour: tuple[float, ...]) -> str:
    return "#" + "".join(f"{int(round(255 * c)):02x}" for c in colour[:3])


def role_of(layer: Any) -> str | None:
    return ((layer.metadata or {}).get(META) or {}).get("role")


def style_truth(layer: Any, num_classes: int) -> None:
    """Draw a ground truth as 2-pixel contours in the truth palette."""
    layer.colormap = _palette(TRUTH_COLOURS, max(num_classes - 1, int(np.max(layer.data))))
    layer.contour = 2
    layer.opacity = 1.0


def truth_legend(class_names: list[str]) -> str:
    items = [(f"{name} (prediction)", colour_hex(PREDICTION_COLOURS[i % 6]))
             for i, name in enumerate(class_names[1:])]
    items += [(f"{name} (truth, contour)", colour_hex(TRUTH_COLOURS[i % 6]))
              for i, name in enumerate(class_names[1:])]
    return _tables.swatches(items, per_row=2)


def segmentation_layer(viewer: Any, image: Any, model: str, segmenter: Any, result: Any,
                       visible: bool = True) -> Any:
    labels = _tasks.layer_labels(result.labels)
    name = _tasks.result_name(image.name, model, result.attribute_value)
    meta = _metadata(image, role="segmentation", image=image.name, model=model,
                     segmented_as={segmenter.attribute_name or "attribute":
                                   result.attribute_value},
                     class_names=list(segmenter.class_names))
    return viewer.add_labels(labels, name=name, metadata=meta, opacity=0.55, visible=visible,
                             colormap=_palette(PREDICTION_COLOURS, len(segmenter.class_names)),
                             features=class_features(segmenter.class_names), **_geometry(image))


def measurements(image: Any, labels: np.ndarray, class_names: list[str], value: str) -> str:
    ndim = _ndim(image)
    scale = list(image.scale)[-ndim:]
    unit = _tasks.unit_of(image.units, ndim, scale)
    sizes = _tasks.measure(labels, class_names, scale)
    return _tables.measure_table("Area" if ndim == 2 else "Volume", class_names,
                                 {value: sizes}, unit)


def add_probability_layer(viewer: Any, image: Any, result: Any, kind: str) -> Any:
    """An Image layer of the max softmax probability or the normalised entropy."""
    probs = np.asarray(result.probabilities)
    if probs.ndim == 4:  # (K, X, Y, Z) -> (K, Z, Y, X)
        probs = np.transpose(probs, (0, 3, 2, 1))
    data = _tasks.probability_map(probs, kind)
    title = "max probability" if kind == "max" else "entropy"
    layer = viewer.add_image(
        data, name=f"{title} · {result.attribute_value}",
        metadata=_metadata(image, role="probability", image=image.name, kind=kind),
        colormap="magma" if kind == "entropy" else "viridis", contrast_limits=(0.0, 1.0),
        opacity=0.6, visible=False, **_geometry(image))
    layer.colorbar.visible = True
    return layer


def hide_earlier_routing(viewer: Any) -> None:
    for layer in viewer.layers:
        if role_of(layer) in ("routing", "switch"):
            layer.visible = False


def short_name(dmoe_layer: str) -> str:
    """``"encoder.block0"`` -> ``"block0"``: the part that tells layers apart."""
    return dmoe_layer[len("encoder."):] if dmoe_layer.startswith("encoder.") else dmoe_layer


def add_routing_layers(viewer: Any, image: Any, labels_layer: Any, segmenter: Any,
                       result: Any) -> str:
    """Per dMoE layer: top-1 expert (Labels) and its gate weight (Image); legend, tables."""
    hide_earlier_routing(viewer)
    html = []
    names = list(segmenter.class_names)
    value = result.attribute_value
    num_experts = 0
    for i, routing in enumerate(result.routing):
        data = _tasks.routing_layers(routing, list(image.scale), list(image.translate))
        num_experts = data["num_experts"]
        short = short_name(routing.name)
        meta = {META: {"role": "routing", "image": image.name, "dmoe_layer": routing.name,
                       "attribute_value": value, "grid_stride": list(routing.grid_stride)}}
        geometry = {"scale": data["scale"], "translate": data["translate"],
                    "units": tuple(image.units), "affine": image.affine}
        viewer.add_labels(data["experts"], name=f"E top-1 · {short} · {value}",
                          metadata=meta, colormap=_palette(EXPERT_COLOURS, num_experts),
                          features=_tasks.expert_features(num_experts),
                          opacity=0.45, visible=i == 0, **geometry)
        gate = viewer.add_image(data["gate"], name=f"gate · {short} · {value}",
                                metadata=copy.deepcopy(meta), colormap="viridis",
                                contrast_limits=(0.0, 1.0), opacity=0.6, visible=False,
                                **geometry)
        gate.colorbar.visible = True
        usage = _tasks.expert_usage_rows(routing, result.labels, names)
        html.append(_tables.usage_table(short, names, usage))
    viewer.layers.selection.active = labels_layer
    legend = _tables.swatches([(f"E{e}", colour_hex(EXPERT_COLOURS[(e - 1) % 10]))
                               for e in range(1, num_experts + 1)],
                              title=f"Experts (label value n = expert En) · routed as "
                                    f"'{value}'")
    note = _tables.message("Gate maps: viridis, 0 (dark) to 1 (yellow) = weight of the "
                           "top-1 expert; colour bar shown on the canvas.")
    return legend + note + "".join(html)


def add_compare_layers(viewer: Any, image: Any, model: str, segmenter: Any,
                       results: dict[str, Any], truth: Any = None,
                       patient: str | None = None, cancelled: bool = False) -> str:
    """One Labels layer per value, disagreement map, switch maps and the tables."""
    names = list(segmenter.class_names)
    layers = {value: segmentation_layer(viewer, image, model, segmenter, result,
                                        visible=False)
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
    scale = list(image.scale)[-ndim:]
    unit = _tasks.unit_of(image.units, ndim, scale)
    sizes = {value: _tasks.measure(layer.data, names, scale) for value, layer in layers.items()}
    extra: dict[str, dict[str, float]] = {"Dice vs\nmajority": {}}
    for value, labels in zip(layers, maps, strict=True):
        extra["Dice vs\nmajority"][value] = float(np.mean(
            _tasks.scores_vs_truth(labels, majority, len(names))["dice"]))
        if truth is not None:
            try:
                scores = _tasks.scores_vs_truth(labels, np.asarray(truth.data), len(names))
            except ValueError:
                continue
            extra.setdefault("Dice vs\ntruth", {})[value] = float(np.mean(scores["dice"]))
    differing = int(np.count_nonzero(count))
    title = f"{'Area' if ndim == 2 else 'Volume'} per {segmenter.attribute_name or 'value'}"
    partial = (_tables.message(f"Cancelled: showing the {n} value(s) that finished.",
                               "#d08770") if cancelled else "")
    summary = _tables.message(
        f"{differing} {'pixels' if ndim == 2 else 'voxels'} change class with the attribute "
        f"value (bright in the disagreement map; the value layers are hidden, tick them to "
        f"view).")
    html = partial + summary + _tables.measure_table(
        title, names, sizes, unit, extra, highlight=patient,
        first=segmenter.attribute_name or "value")
    if patient in results and results[patient].routing and n > 1:
        html += add_switch_layers(viewer, image, results, patient)
    return html


def add_switch_layers(viewer: Any, image: Any, results: dict[str, Any], patient: str) -> str:
    """Per dMoE layer: how many other values change the top-1 expert at each cell."""
    hide_earlier_routing(viewer)
    switches = _tasks.switch_maps(results, patient)
    others = [v for v in results if v != patient]
    rows = {}
    for i, item in enumerate(switches):
        routing = item["map"]
        data = _tasks.routing_layers(routing, list(image.scale), list(image.translate))
        count = item["count"]
        if count.ndim == 3:
            count = np.transpose(count, (2, 1, 0))
        short = short_name(item["name"])
        meta = {META: {"role": "switch", "image": image.name, "dmoe_layer": item["name"],
                       "patient_value": patient, "fraction": item["fraction"]}}
        layer = viewer.add_image(
            count.astype(np.float32), name=f"switch · {short} · vs {patient}", metadata=meta,
            colormap="magma", contrast_limits=(0.0, float(max(1, len(others)))),
            opacity=0.6, visible=i == 0, scale=data["scale"], translate=data["translate"],
            units=tuple(image.units), affine=image.affine)
        layer.colorbar.visible = i == 0
        rows[short] = [item["fraction"].get(v, 0.0) for v in others]
    return _tables.switch_table(patient, others, rows)
