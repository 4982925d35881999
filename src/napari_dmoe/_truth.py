"""Ground truth for the selected image: which Labels layers may serve, and which is the default.

A layer may serve as the image's ground truth only if it is a Labels layer with the
image's spatial shape *and* the same placement in the world (scale, translate, rotate,
shear and affine), and is not one of the plugin's own outputs. Names are never used to
guess: the default is the layer a reader or sample paired with this image explicitly
(``metadata["napari_dmoe"] == {"role": "ground_truth", "image": <image name>}``), else
none; the user's choice per image is remembered by the widget.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _tasks, _view
from ._reader import META

OUTPUT_ROLES = ("segmentation", *_view.DERIVED_ROLES)  # one list of the plugin's outputs


def spatial_shape(layer: Any) -> tuple[int, ...]:
    shape = tuple(np.shape(layer.data))
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def same_placement(a: Any, b: Any, atol: float = 1e-6) -> bool:
    """True when two layers put their pixels at the same world positions."""
    pairs = [(a.scale, b.scale), (a.translate, b.translate), (a.rotate, b.rotate),
             (a.shear, b.shear), (a.affine.affine_matrix, b.affine.affine_matrix)]
    for x, y in pairs:
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if x.shape != y.shape or not np.allclose(x, y, atol=atol, rtol=1e-6):
            return False
    return True


def _role(layer: Any) -> tuple[str | None, str | None]:
    meta = (layer.metadata or {}).get(META) or {}
    return meta.get("role"), meta.get("image")


def truth_candidates(layers: Sequence[Any], image: Any) -> list[Any]:
    """Labels layers that match ``image``'s shape and placement (never the plugin's outputs)."""
    if image is None:
        return []
    shape = spatial_shape(image)
    out = []
    for layer in layers:
        if type(layer).__name__ != "Labels" or _role(layer)[0] in OUTPUT_ROLES:
            continue
        if tuple(np.shape(layer.data)) == shape and same_placement(layer, image):
            out.append(layer)
    return out


def default_truth(candidates: Sequence[Any], image: Any) -> Any:
    """The candidate paired with ``image`` by its reader or sample, else None."""
    for layer in candidates:
        if _role(layer) == ("ground_truth", image.name):
            return layer
    return None


def score(pred: Any, truth: Any, num_classes: int) -> dict[str, np.ndarray]:
    """Dice/IoU per foreground class of a prediction layer against a truth layer."""
    return _tasks.scores_vs_truth(np.asarray(pred.data), np.asarray(truth.data), num_classes)
