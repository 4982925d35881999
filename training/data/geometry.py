"""Scanner geometry of 3D volumes: canonical orientation, target spacing, and the exact way back.

A volume is a ``(C, X, Y, Z)`` array in NIfTI array order plus its 4x4 affine, which maps
voxel indices ``(i, j, k, 1)`` to RAS+ millimetres (shared/DATA_FORMATS.md §4). Files from
different tools store the same anatomy in different voxel orders, so models see volumes
only after :func:`to_canonical`:

1. **Orientation**: the voxel axes are permuted and flipped (no interpolation) so that they
   point along the closest of the target axis codes (``"RAS"``: +i toward the patient's
   Right, +j Anterior, +k Superior; nibabel ``io_orientation``/``ornt_transform``). An
   oblique affine is canonicalised the same way; its residual rotation stays in the
   canonical affine.
2. **Spacing**: the reoriented volume is resampled (images trilinear, labels nearest) to
   ``round(n * spacing / target)`` voxels per axis covering the same field of view (voxel
   edges aligned, ``align_corners=False``), so the spacing reached is the target up to the
   rounding of the voxel count.

:func:`labels_from_canonical` maps class probabilities ``(K, *model_grid)`` back onto the
source voxel grid: each class channel is resampled (trilinear, the exact inverse grid
mapping), the axes are flipped and permuted back, then argmax. The result has the input's
shape, so it is written with the input's affine unchanged. For pure permutations/flips
(no spacing change) the mapping is exact voxel for voxel.

Memory: resampling runs one channel at a time in float32 (a 512x512x300 CT is 315 MB
per channel); the way back keeps a running maximum instead of all K channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_ORIENTATION = "RAS"


def _check_affine(affine: Any) -> np.ndarray:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {a.shape}")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError(f"affine has a singular 3x3 part (zero voxel size?):\n{a}")
    return a


def axcodes(affine: Any) -> str:
    """Axis codes of a voxel grid, e.g. ``"RAS"``, ``"LPS"``, ``"SRA"`` (closest axes)."""
    from nibabel.orientations import aff2axcodes

    return "".join(aff2axcodes(_check_affine(affine)))


def voxel_spacing(affine: Any) -> tuple[float, float, float]:
    """Voxel size along each array axis (mm): the lengths of the affine's columns."""
    a = _check_affine(affine)
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))


def affine_mismatch(a: Any, b: Any) -> float:
    """Largest difference (mm) between where the two affines place the grid's corner
    voxel and its unit steps: ``max |a - b|`` over the 3x4 part."""
    return float(np.abs(_check_affine(a)[:3] - _check_affine(b)[:3]).max())


def affines_match(a: Any, b: Any, tolerance: float = 0.01) -> bool:
    """True if ``a`` and ``b`` describe the same grid, within ``tolerance`` x the smallest
    voxel size (default 1 %: float32 header rounding passes, a flip or a shift does not)."""
    return affine_mismatch(a, b) <= tolerance * min(voxel_spacing(a))


def _check_orientation(orientation: str) -> str:
    from nibabel.orientations import axcodes2ornt

    codes = str(orientation).upper()
    try:
        ornt = axcodes2ornt(tuple(codes))
    except Exception:  # nibabel raises ValueError or KeyError
        ornt = None
    if len(codes) != 3 or ornt is None or np.isnan(ornt).any():
        raise ValueError(f"orientation must be three axis codes such as 'RAS' or 'LPS', "
                         f"got {orientation!r}")
    return codes


@dataclass(frozen=True)
class CanonicalGeometry:
    """How one volume goes from its stored grid to the model's grid, and back.

    Attributes:
        source_shape: ``(X, Y, Z)`` as stored.
        source_affine: the stored 4x4 affine.
        transform: ``(3, 2)`` nibabel orientation transform, source -> canonical axes
            (row i: output axis of source axis i, and -1 if it is flipped).
        canonical_shape: shape after reorientation (before resampling).
        canonical_affine: affine after reorientation (residual rotation of an oblique
            scan kept here).
        target_shape: model grid shape (after resampling; = canonical_shape without).
        target_affine: affine of the model grid.
        orientation: the target axis codes, or None (stored order kept).
        spacing: the requested spacing, or None (stored spacing kept).
    """

    source_shape: tuple[int, int, int]
    source_affine: np.ndarray
    transform: np.ndarray
    canonical_shape: tuple[int, int, int]
    canonical_affine: np.ndarray
    target_shape: tuple[int, int, int]
    target_affine: np.ndarray
    orientation: str | None
    spacing: tuple[float, float, float] | None

    @property
    def source_axcodes(self) -> str:
        return axcodes(self.source_affine)

    @property
    def target_spacing(self) -> tuple[float, float, float]:
        """Spacing actually reached (the request up to voxel-count rounding)."""
        return voxel_spacing(self.target_affine)

    @property
    def reorients(self) -> bool:
        identity = np.column_stack([np.arange(3), np.ones(3)])
        return not np.array_equal(self.transform, identity)

    @property
    def resamples(self) -> bool:
        return self.target_shape != self.canonical_shape

    def describe(self) -> str:
        """One line: ``"LPS 64x64x32 @ 0.9x0.9x2.5 mm -> RAS 64x64x32 @ 0.9x0.9x2.5 mm"``."""
        def grid(shape, affine):
            size = "x".join(str(s) for s in shape)
            mm = "x".join(f"{s:.3g}" for s in voxel_spacing(affine))
            return f"{axcodes(affine)} {size} @ {mm} mm"
        return f"{grid(self.source_shape, self.source_affine)} -> " \
               f"{grid(self.target_shape, self.target_affine)}"


def plan_geometry(shape: tuple[int, ...], affine: Any,
                  orientation: str | None = DEFAULT_ORIENTATION,
                  spacing: tuple[float, ...] | None = None) -> CanonicalGeometry:
    """Describe the way from a stored grid ``shape`` ``(X, Y, Z)`` + ``affine`` to the
    canonical grid (``orientation`` axis codes, ``spacing`` mm; None keeps either)."""
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes (X, Y, Z), got {shape}")
    source = _check_affine(affine)
    if orientation is None:
        transform = np.column_stack([np.arange(3), np.ones(3)])
    else:
        target = axcodes2ornt(tuple(_check_orientation(orientation)))
        transform = ornt_transform(io_orientation(source), target)
    canonical_shape = tuple(int(shape[i]) for i in np.argsort(transform[:, 0]))
    canonical_affine = source @ inv_ornt_aff(transform, shape)
    target_shape, target_affine = canonical_shape, canonical_affine
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be three positive voxel sizes in mm, got {spacing}")
        current = voxel_spacing(canonical_affine)
        target_shape = tuple(max(1, int(round(n * c / s)))
                             for n, c, s in zip(canonical_shape, current, spacing))
        ratio = np.array(canonical_shape, float) / np.array(target_shape, float)
        step = np.eye(4)
        step[:3, :3] = np.diag(ratio)
        step[:3, 3] = 0.5 * ratio - 0.5  # target voxel j sits at canonical index (j+.5)r-.5
        target_affine = canonical_affine @ step
    return CanonicalGeometry(shape, source, transform, canonical_shape, canonical_affine,
                             target_shape, target_affine,
                             None if orientation is None else _check_orientation(orientation),
                             spacing)


def _reorient(array: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """``(C, *S)`` view with spatial axes flipped/permuted by a nibabel transform."""
    for axis, flip in enumerate(transform[:, 1]):
        if flip == -1:
            array = np.flip(array, axis + 1)
    order = np.argsort(transform[:, 0])
    return array.transpose(0, *(int(i) + 1 for i in order))


def _inverse(transform: np.ndarray) -> np.ndarray:
    inverse = np.empty_like(transform)
    for axis, (out, flip) in enumerate(transform):
        inverse[int(out)] = (axis, flip)
    return inverse


def _resample(channel: np.ndarray, size: tuple[int, ...], nearest: bool) -> np.ndarray:
    """One ``(*S)`` float32 channel resampled to ``size`` (grid edges aligned)."""
    import torch
    import torch.nn.functional as F

    if tuple(channel.shape) == tuple(size):
        return np.ascontiguousarray(channel, dtype=np.float32)
    x = torch.from_numpy(np.ascontiguousarray(channel, dtype=np.float32))[None, None]
    mode = "nearest-exact" if nearest else "trilinear"
    kwargs = {} if nearest else {"align_corners": False}
    with torch.no_grad():
        return F.interpolate(x, size=tuple(size), mode=mode, **kwargs)[0, 0].numpy()


def to_canonical(volume: np.ndarray, geometry: CanonicalGeometry, *, nearest: bool = False
                 ) -> np.ndarray:
    """``(C, X, Y, Z)`` stored volume -> float32 ``(C, *geometry.target_shape)``.

    ``nearest`` for label masks (class indices stay integers), trilinear otherwise.
    """
    volume = np.asarray(volume)
    if volume.ndim != 4 or tuple(volume.shape[1:]) != geometry.source_shape:
        raise ValueError(f"volume must be (C, X, Y, Z) with spatial shape "
                         f"{geometry.source_shape}, got {volume.shape}")
    view = _reorient(volume, geometry.transform)
    out = np.empty((volume.shape[0], *geometry.target_shape), dtype=np.float32)
    for c in range(volume.shape[0]):
        out[c] = _resample(view[c], geometry.target_shape, nearest)
    return out


def _to_source(channel: np.ndarray, geometry: CanonicalGeometry) -> np.ndarray:
    """One model-grid channel ``(*target)`` -> a ``(*source)`` view (resampled, reoriented)."""
    canonical = _resample(channel, geometry.canonical_shape, nearest=False)
    return _reorient(canonical[None], _inverse(geometry.transform))[0]


def from_canonical(values: Any, geometry: CanonicalGeometry) -> np.ndarray:
    """``(K, *target_shape)`` per-voxel values (e.g. probabilities) -> float32
    ``(K, *source_shape)`` on the stored grid (trilinear, then flips/permutation undone)."""
    values = _as_numpy(values, geometry)
    out = np.empty((values.shape[0], *geometry.source_shape), dtype=np.float32)
    for k in range(values.shape[0]):
        out[k] = _to_source(values[k], geometry)
    return out


def labels_from_canonical(probabilities: Any, geometry: CanonicalGeometry) -> np.ndarray:
    """``(K, *target_shape)`` class probabilities -> int32 labels ``(*source_shape)``:
    each class resampled onto the stored grid, then argmax (ties go to the lower class)."""
    values = _as_numpy(probabilities, geometry)
    best = _to_source(values[0], geometry)  # a view of a fresh array: safe to update
    labels = np.zeros(geometry.source_shape, dtype=np.int32)
    for k in range(1, values.shape[0]):
        channel = _to_source(values[k], geometry)
        better = channel > best
        labels[better] = k
        np.copyto(best, channel, where=better)
    return labels


def to_source_grid_cells(cells: Any, geometry: CanonicalGeometry) -> Any:
    """``(E, *grid)`` cells spanning the model grid evenly (e.g. routing maps) -> the same
    cells in the stored axis order (flips and permutation undone; numpy or torch)."""
    inverse = _inverse(geometry.transform)
    if hasattr(cells, "detach"):
        dims = [int(axis) + 1 for axis, flip in enumerate(inverse[:, 1]) if flip == -1]
        cells = cells.flip(dims) if dims else cells
        return cells.permute(0, *(int(i) + 1 for i in np.argsort(inverse[:, 0])))
    return _reorient(np.asarray(cells), inverse)


def _as_numpy(values: Any, geometry: CanonicalGeometry) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 4 or tuple(values.shape[1:]) != geometry.target_shape:
        raise ValueError(f"expected (K, *{geometry.target_shape}) values on the model grid, "
                         f"got {values.shape}")
    return values


def median_spacing(affines: list[Any], orientation: str | None = DEFAULT_ORIENTATION
                   ) -> tuple[float, float, float]:
    """Median voxel size per canonical axis over a training set's affines (mm)."""
    if not affines:
        raise ValueError("median_spacing needs at least one affine")
    spacings = [plan_geometry((1, 1, 1), a, orientation).canonical_affine for a in affines]
    per_axis = np.median(np.array([voxel_spacing(a) for a in spacings]), axis=0)
    return tuple(float(f"{v:.6g}") for v in per_axis)


def training_spacing(cases: list[Any], orientation: str | None = DEFAULT_ORIENTATION
                     ) -> tuple[float, float, float] | None:
    """Median canonical spacing of the cases' images (from their headers: ``image_info``'s
    ``affine``); None when no image has an affine (e.g. ``.npy`` volumes)."""
    from training.data.io import image_info

    affines = [info["affine"] for info in (image_info(c.image, c.image_key) for c in cases)
               if info.get("affine") is not None]
    return median_spacing(affines, orientation) if affines else None
