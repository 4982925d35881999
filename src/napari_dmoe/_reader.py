"""Readers: NIfTI (``.nii``/``.nii.gz``), TIFF (2D, RGB, 3D) and Harvard-FairSeg ``.npz``.

Axis and geometry convention (shared by the reader, the writer and the widget):

- napari shows the last two axes as rows and columns, so a NIfTI array stored as
  ``(X, Y, Z)`` (nibabel's voxel order i, j, k, never reoriented) becomes the layer
  ``(Z, Y, X)``: the NIfTI axes reversed. 2D NIfTI ``(X, Y)`` or ``(X, Y, 1)`` becomes
  ``(Y, X)``.
- ``scale`` is the voxel spacing reversed (3D: the affine's column lengths) and
  ``translate`` the affine's origin (``affine[:3, 3]``) reversed; ``units`` come from the
  header (mm by default). 3D layers also get the affine's direction cosines (rotation,
  flips, axis permutation) as the layer ``affine`` (``scanner_rotation``, identity for
  RAS-aligned volumes), so napari's world coordinates are the scanner's RAS millimetres
  in ``(S, A, R)`` order, whatever the file's voxel order. The source geometry is also
  kept, exactly, in the layer metadata::

      metadata["napari_dmoe"] = {"axes": "zyx", "affine": (4, 4) array,
                                 "nifti_header": bytes, "nifti_shape": (X, Y[, Z]),
                                 "source": path, "axis_order": [i, j, k],
                                 "voxel_affine": (4, 4) array}

  Files that store the anatomy with permuted axes (e.g. S-R-A) are shown with their voxel
  axes permuted toward R, A, S (``axis_order``: stored axis shown as layer x, y, z;
  ``display_axis_order``); ``voxel_affine`` is the affine of the layer data transposed to
  ``(X, Y, Z)`` (what ``Segmenter.segment(affine=...)`` takes with that array). The writer
  transposes back with ``(2, 1, 0)``, undoes ``axis_order`` (``source_order``) and writes
  the source affine and header, and the widget hands the model ``(X, Y, Z)``.
- TIFF stacks are already ``(Z, Y, X)`` (tifffile's order); ImageJ ``spacing`` and the
  X/Y resolution tags become ``scale``, ImageJ ``xorigin``/``yorigin``/``zorigin`` (pixels)
  ``translate``, and a ``napari_dmoe_affine`` (written by our TIFF writer) the layer
  ``affine``. 3D TIFFs also carry ``axes = "zyx"``.
- FairSeg ``.npz``: the fundus image, a Labels layer "<case> ground truth" (0/1/2 =
  background/rim/cup, remapped from 0/-1/-2) and the patient's attributes, mapped to names
  (shared/DATA_FORMATS.md §2; unknown codes -> ``"unknown"``), in
  ``metadata["napari_dmoe"]["attributes"]``.

- DICOM series (a folder, or ``.dcm`` files of it): one Image layer per series, named by
  its SeriesDescription, read in NIfTI voxel order with its RAS affine and placed like the
  same volume stored as NIfTI; ``dicom_source``/``dicom_series_uid`` in the metadata.

Integer files whose name says ``label``, ``seg``, ``mask`` or ``gt`` (or a NIfTI with the
label intent, or a TIFF written by this plugin) open as Labels layers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from training.data.io import file_stem, file_suffix  # light: numpy only, no torch

LayerData = tuple[Any, dict[str, Any], str]
META = "napari_dmoe"
FAIRSEG_IMAGE_KEYS = ("slo_fundus", "fundus_slo")
FAIRSEG_LABEL_KEYS = ("disc_cup_mask", "disc_cup")
FAIRSEG_CLASSES = ["background", "rim", "cup"]
TIFF_LABEL_TAG = "napari_dmoe:labels"
TIFF_AFFINE_KEY = "napari_dmoe_affine"
"""ImageJ metadata key holding a layer's ``affine`` (JSON) in TIFFs written by the plugin."""
_LABEL_NAME = re.compile(r"(^|[^a-z])(label|labels|seg|segmentation|mask|gt)([^a-z]|$)")
_NIFTI_UNITS = {"mm": "mm", "meter": "m", "micron": "um"}
_TIFF_UNITS = {"micron": "um", "\\u00B5m": "um", "µm": "um", "um": "um", "mm": "mm",
               "nm": "nm", "cm": "cm", "m": "m"}


def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """npe2 reader hook: a reader function for our formats, else None."""
    try:
        paths = [path] if isinstance(path, (str, Path)) else list(path)
        if not paths or any(_reader_for(p) is None for p in paths):
            return None
    except Exception:  # noqa: BLE001 - a reader hook must never raise
        return None
    return read_paths


def read_paths(path: str | list[str]) -> list[LayerData]:
    """Read one or several files into layer data tuples."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    out: list[LayerData] = []
    dicom = []
    for p in paths:
        reader = _reader_for(p)
        if reader is None:
            raise ValueError(f"{p}: napari-dmoe reads .nii, .nii.gz, .tif, .tiff, DICOM "
                             "series (a folder or .dcm files) and Harvard-FairSeg .npz files")
        if reader is read_dicom:
            dicom.append(p)  # several files of one series open it once
        else:
            out += reader(p)
    return out + (read_dicom(dicom) if dicom else [])


def _reader_for(path: str | Path) -> Callable[[str | Path], list[LayerData]] | None:
    suffix = file_suffix(path)
    if suffix == ".dcm" or Path(path).is_dir():
        from training.data.dicom_series import is_dicom_path  # light: numpy only

        return read_dicom if is_dicom_path(path) else None
    if suffix in (".nii", ".nii.gz"):
        return read_nifti
    if suffix in (".tif", ".tiff"):
        return read_tiff
    if suffix == ".npz" and _is_fairseg(path):
        return read_fairseg
    return None


def _looks_like_labels(path: str | Path, dtype: np.dtype) -> bool:
    return np.dtype(dtype).kind in "iub" and bool(_LABEL_NAME.search(file_stem(path).lower()))


# -- NIfTI --------------------------------------------------------------------------------
def read_nifti(path: str | Path) -> list[LayerData]:
    """One Image or Labels layer from a NIfTI file (convention: module docstring).

    Raises:
        ValueError: naming the file, if it is truncated or damaged, or its header has a
            non-finite spacing or promises more data than the file can hold.
    """
    import nibabel as nib

    from training.data.io import check_nifti, damaged_file_message

    try:
        img = nib.load(str(path))
        check_nifti(img, path)
        return nifti_image_layers(img, path)
    except ValueError:  # DataError from check_nifti names the file already
        raise
    except Exception as exc:  # noqa: BLE001 - zlib/gzip/EOF/nibabel errors of a damaged file
        raise ValueError(damaged_file_message(path, exc)) from None


def nifti_image_layers(img: Any, path: str | Path) -> list[LayerData]:
    """Layers of a nibabel image, from a file or in memory (a DICOM series, ``read_dicom``)."""
    data = np.asanyarray(img.dataobj)
    if data.ndim == 5 and data.shape[3] == 1:  # (X, Y, Z, 1, C): drop the time axis
        data = data.reshape(data.shape[:3] + data.shape[4:])
    nifti_shape = tuple(int(s) for s in data.shape)
    spatial = min(data.ndim, 3)
    if spatial == 3 and data.ndim == 3 and data.shape[2] == 1:
        data, spatial = data[:, :, 0], 2  # a 2D image stored as (X, Y, 1)
    # header values are float32: round away the float32 noise (0.8999999761581421 -> 0.9)
    zooms = [_tidy(z) for z in img.header.get_zooms()[:spatial]]
    origin = [_tidy(v) for v in np.asarray(img.affine)[:spatial, 3]]
    extra = data.ndim - spatial
    axis_order, voxel_affine = [0, 1, 2], np.asarray(img.affine, dtype=np.float64)
    if spatial == 3:  # voxel axes permuted toward R, A, S (flips and rotation: layer affine)
        axis_order = display_axis_order(img.affine)
        data = np.transpose(data, axis_order + list(range(3, data.ndim)))
        voxel_affine = voxel_affine[:, axis_order + [3]]
        # scale from the affine's columns, so scale + rotation give the affine exactly
        zooms = [_tidy(z) for z in np.linalg.norm(voxel_affine[:3, :3], axis=0)]
    # spatial axes reversed; any extra (channel/time) axes go first
    order = tuple(range(spatial, data.ndim)) + tuple(reversed(range(spatial)))
    layer = np.ascontiguousarray(np.transpose(data, order))
    unit = _NIFTI_UNITS.get(img.header.get_xyzt_units()[0], "mm")
    intent = img.header.get_intent()[0]
    is_labels = intent == "label" or _looks_like_labels(path, data.dtype)
    meta = {
        "axes": "zyx"[3 - spatial:],
        "affine": np.asarray(img.affine, dtype=np.float64),
        "nifti_header": bytes(img.header.binaryblock),
        "nifti_shape": nifti_shape,
        "source": str(path),
    }
    if spatial == 3:
        meta["axis_order"] = axis_order
        meta["voxel_affine"] = voxel_affine
    kwargs = {
        "name": file_stem(path),
        "scale": [1.0] * extra + zooms[::-1],
        "translate": [0.0] * extra + origin[::-1],
        "units": ["pixel"] * extra + [unit] * spatial,
        "metadata": {META: meta},
    }
    if spatial == 3:
        kwargs["affine"] = scanner_rotation(voxel_affine, extra)
    if is_labels:
        return [(layer.astype(_label_dtype(layer), copy=False), kwargs, "labels")]
    return [(layer, kwargs, "image")]


def display_axis_order(affine: Any) -> list[int]:
    """Stored voxel axis shown as layer x, y, z: the ones closest to R-L, A-P, S-I.

    Files storing the anatomy in another axis order (a sagittal series, ``as_reoriented``
    to S-R-A) would otherwise need an axis-swapping layer affine, which napari cannot
    slice. Flips stay in the affine (napari slices those fine).
    """
    from nibabel.orientations import io_orientation

    return [int(a) for a in np.argsort(io_orientation(np.asarray(affine, float))[:, 0])]


def source_order(array: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Layer data transposed to ``(X, Y, Z)`` -> the stored file's voxel order (undoes
    ``metadata["napari_dmoe"]["axis_order"]``; unchanged when there is none)."""
    order = list(meta.get("axis_order") or [0, 1, 2])
    if array.ndim < 3 or order == [0, 1, 2]:
        return array
    return np.transpose(array, [int(i) for i in np.argsort(order)] + list(range(3, array.ndim)))


def scanner_rotation(affine: Any, extra: int = 0) -> np.ndarray:
    """Layer ``affine`` that turns the voxel-order display into scanner coordinates.

    With ``scale`` = voxel sizes and ``translate`` = origin (both reversed to napari's
    ``(z, y, x)``), napari's world point is ``affine @ (translate + scale * index)``; this
    affine applies the NIfTI direction cosines (rotation, flips, axis permutation; reversed
    axes) about the origin, so world = the NIfTI affine's RAS millimetres in ``(S, A, R)``
    order and the cursor reads patient millimetres. Identity for RAS-aligned volumes.
    ``extra`` leading (channel/time) axes are left alone. Returns ``(n+1, n+1)``.
    """
    a = np.asarray(affine, dtype=np.float64)
    reverse = np.eye(3)[::-1]
    direction = reverse @ (a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)) @ reverse
    origin = reverse @ a[:3, 3]
    n = extra + 3
    out = np.eye(n + 1)
    out[extra:n, extra:n] = direction
    out[extra:n, n] = origin - direction @ origin
    return out


def _tidy(x: float) -> float:
    return float(f"{float(x):.7g}")


def _label_dtype(data: np.ndarray) -> np.dtype:
    if data.dtype.kind in "iu":
        return data.dtype
    return np.dtype(np.int32)


# -- DICOM --------------------------------------------------------------------------------
def read_dicom(path: str | Path | list[str | Path]) -> list[LayerData]:
    """One Image layer per DICOM series: a folder (every series in it) or files (theirs).

    The series (``training.data.dicom.read_series``: HU, NIfTI voxel order, RAS affine) is
    placed exactly like a NIfTI file holding the same volume (``nifti_image_layers``),
    named by its SeriesDescription; ``metadata["napari_dmoe"]`` adds ``dicom_source`` (the
    folder) and ``dicom_series_uid``, which the DICOM-SEG / RTSTRUCT writers need. A series
    that cannot be read is reported (warning) while the others open; if none opens, the
    first problem is raised.
    """
    import warnings

    import nibabel as nib

    from training.data.dicom import DicomError, find_series, read_series

    paths = [Path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
    series, seen = [], set()
    for folder in dict.fromkeys(p if p.is_dir() else p.parent for p in paths):
        files = {p for p in paths if not p.is_dir() and p.parent == folder}
        for info in find_series(folder):
            wanted = folder in paths or files & set(info.files)
            if wanted and info.series_instance_uid not in seen:
                seen.add(info.series_instance_uid)
                series.append(info)
    layers, problems = [], []
    for info in series:
        try:
            volume = read_series(info)  # the files find_series found: no second scan
        except DicomError as exc:
            problems.append(exc)
            continue
        img = nib.Nifti1Image(volume.array, volume.affine)
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(volume.affine, code=1)  # scanner coordinates
        img.set_sform(volume.affine, code=1)
        (data, kwargs, _), = nifti_image_layers(img, info.folder)
        kwargs["name"] = volume.description
        kwargs["metadata"][META].update(
            source=str(info.folder), dicom_source=str(info.folder),
            dicom_series_uid=volume.series_instance_uid, dicom_modality=volume.modality)
        if volume.modality == "CT":
            kwargs["contrast_limits"] = [-160.0, 240.0]  # soft-tissue window (HU)
            kwargs["metadata"][META]["kind"] = "ct"  # the widget suggests a CT model
        layers.append((data.astype(np.float32, copy=False), kwargs, "image"))
    if problems and not layers:
        raise problems[0]
    for exc in problems:
        warnings.warn(str(exc), stacklevel=2)
    return layers


# -- TIFF ---------------------------------------------------------------------------------
def read_tiff(path: str | Path) -> list[LayerData]:
    """One Image (grayscale 2D, RGB(A) 2D or a 3D stack) or Labels layer from a TIFF."""
    import tifffile

    with tifffile.TiffFile(str(path)) as tf:
        series = tf.series[0]
        data, axes = series.asarray(), series.axes.upper()
        ij = tf.imagej_metadata or {}
        page = tf.pages[0]
        xres = _resolution(page, "XResolution")
        yres = _resolution(page, "YResolution")
    rgb = axes.endswith("S") and data.shape[-1] in (3, 4)
    spatial = data.ndim - (1 if rgb else 0)
    unit = _TIFF_UNITS.get(str(ij.get("unit", "")).strip(), "pixel")
    scale = [1.0] * spatial
    scale[-1], scale[-2] = xres, yres
    if spatial >= 3 and "spacing" in ij:
        scale[-3] = float(ij["spacing"])
    # ImageJ calibration origin is in pixels: world = (index - origin) * pixel size
    keys = ("zorigin", "yorigin", "xorigin")[-min(spatial, 3):]
    translate = [0.0] * (spatial - len(keys)) + [
        -float(ij.get(key, 0.0) or 0.0) * s for key, s in zip(keys, scale[-len(keys):])]
    tagged = ij.get("Info") == TIFF_LABEL_TAG
    is_labels = not rgb and (tagged or _looks_like_labels(path, data.dtype))
    meta: dict[str, Any] = {"source": str(path), "tiff_axes": axes}
    if spatial == 3:
        meta["axes"] = "zyx"
    kwargs: dict[str, Any] = {"name": file_stem(path), "scale": scale, "metadata": {META: meta}}
    if any(translate):
        kwargs["translate"] = translate
    if TIFF_AFFINE_KEY in ij:
        kwargs["affine"] = np.asarray(json.loads(ij[TIFF_AFFINE_KEY]), dtype=np.float64)
    if unit != "pixel":
        kwargs["units"] = [unit] * spatial
    if is_labels:
        return [(data.astype(_label_dtype(data), copy=False), kwargs, "labels")]
    kwargs["rgb"] = bool(rgb)
    return [(data, kwargs, "image")]


def _resolution(page: Any, tag: str) -> float:
    """Pixel size from a TIFF resolution tag (pixels per unit); 1.0 when absent."""
    item = page.tags.get(tag)
    if item is None:
        return 1.0
    value = item.value
    num, den = (value if isinstance(value, tuple) else (value, 1))
    return float(den) / float(num) if num else 1.0


# -- Harvard-FairSeg ----------------------------------------------------------------------
def _is_fairseg(path: str | Path) -> bool:
    try:
        with np.load(str(path), allow_pickle=False) as npz:
            return any(k in npz.files for k in FAIRSEG_IMAGE_KEYS)
    except Exception:  # noqa: BLE001 - empty/truncated zip (BadZipFile, EOFError): not ours
        return False


def read_fairseg(path: str | Path) -> list[LayerData]:
    """Image, ground truth (if present) and attributes of one FairSeg ``.npz`` case.

    Raises:
        ValueError: naming the file, if a member is truncated or damaged, or the mask's
            shape differs from the image's.
    """
    from training.data.io import damaged_file_message

    try:
        layers = _read_fairseg(path)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - BadZipFile, EOFError, zlib.error, OSError
        raise ValueError(damaged_file_message(path, exc)) from None
    if len(layers) > 1 and layers[1][0].shape != layers[0][0].shape[:2]:
        raise ValueError(f"{path}: the mask is {layers[1][0].shape} but the image is "
                         f"{layers[0][0].shape[:2]}; the file is inconsistent. Re-export it "
                         "with the mask on the image's grid.")
    return layers


def _read_fairseg(path: str | Path) -> list[LayerData]:
    from ._compat import prepare_torch

    prepare_torch()
    from training.data.fairseg import fairseg_attributes

    name = file_stem(path)
    with np.load(str(path), allow_pickle=False) as npz:
        image_key = next(k for k in FAIRSEG_IMAGE_KEYS if k in npz.files)
        image = np.asarray(npz[image_key])
        label_key = next((k for k in FAIRSEG_LABEL_KEYS if k in npz.files), None)
        mask = None if label_key is None else np.asarray(npz[label_key])
        attributes = {k: (v or "unknown") for k, v in fairseg_attributes(npz).items()}
    info = {"source": str(path), "attributes": attributes, "kind": "fundus"}
    layers: list[LayerData] = [
        (image, {"name": name, "rgb": image.ndim == 3 and image.shape[-1] in (3, 4),
                 "metadata": {META: dict(info)}}, "image")
    ]
    if mask is not None:
        labels = np.abs(np.rint(mask)).astype(np.uint8)  # 0 / -1 / -2 -> 0 / 1 / 2
        layers.append(ground_truth_layer(labels, name, FAIRSEG_CLASSES, info))
    return layers


def ground_truth_layer(labels: np.ndarray, image_name: str, class_names: list[str],
                       info: dict[str, Any], **kwargs: Any) -> LayerData:
    """A Labels layer "<image> ground truth" with class names as features."""
    meta = {**info, "role": "ground_truth", "image": image_name, "class_names": class_names}
    return (labels, {"name": f"{image_name} ground truth", "metadata": {META: meta},
                     "features": class_features(class_names), "opacity": 0.5,
                     **kwargs}, "labels")


def class_features(class_names: list[str]) -> dict[str, list]:
    """Labels ``features`` so that hovering a label shows its class name."""
    return {"index": list(range(len(class_names))), "class": list(class_names)}
