"""Writers: a Labels layer to NIfTI (``.nii.gz``/``.nii``) or TIFF (``.tif``/``.tiff``).

NIfTI: the layer ``(Z, Y, X)`` is transposed back to the NIfTI array order ``(X, Y, Z)``
(see ``_reader``'s docstring). When the layer metadata holds the source image's affine
and header (layers read by this plugin, and segmentations made by its widget), they are
written unchanged, so spacing, orientation and origin survive exactly; otherwise the
affine is built from the layer's ``scale`` and ``translate``. The header's intent is set
to "label" so the file opens as a Labels layer again.

TIFF: an ImageJ hyperstack (uint8 or uint16) with the X/Y pixel size as resolution tags and
the Z spacing, unit and origin (``xorigin``/``yorigin``/``zorigin``, ImageJ's calibration
in pixels) in the ImageJ metadata, plus the layer's scanner rotation (``napari_dmoe_affine``,
JSON) when it has one, tagged so that it reopens as Labels in the same place.

DICOM-SEG / RTSTRUCT (``.dcm``): only for layers whose image came from a DICOM series
(``dicom_source`` in the metadata); ``training.data.dicom`` writes them, referencing the
source series, with the model and the attribute value used (``segmented_as``); an existing
file is never replaced.

Every writer refuses the file the layer was read from (``source`` in the metadata, also
through a link) and writes under a temporary name in the same folder, renamed into place
when complete (``training.checkpoint.atomic_write_bytes``): a write that fails (a full disk)
leaves an earlier file of that name as it was, and no torn file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ._reader import META, TIFF_AFFINE_KEY, TIFF_LABEL_TAG, file_suffix, source_order

_UNIT_TO_NIFTI = {"mm": "mm", "millimeter": "mm", "m": "meter", "meter": "meter",
                  "um": "micron", "micrometer": "micron", "micron": "micron"}
_UNIT_TO_IMAGEJ = {"mm": "mm", "millimeter": "mm", "um": "micron", "micrometer": "micron",
                   "nm": "nm", "nanometer": "nm", "cm": "cm", "centimeter": "cm"}


def _with_suffix(path: str | Path, allowed: tuple[str, ...], default: str) -> Path:
    path = Path(path)
    return path if file_suffix(path) in allowed else path.with_name(path.name + default)


def _check_labels(data: Any, path: Path) -> np.ndarray:
    labels = np.asarray(data)
    if labels.dtype.kind not in "iub":
        raise ValueError(f"{path}: only integer label images can be written, got "
                         f"{labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{path}: labels hold negative values ({labels.min()}); "
                         "masks use 0 for background and 1..K for classes")
    return labels


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _write_atomic(out: Path, attributes: dict[str, Any],
                  write: Callable[[str], None]) -> list[str]:
    """``write(temporary path)``, then rename it to ``out`` (module docstring).

    Raises:
        ValueError: ``out`` is the file the layer was read from; nothing is written.
        OSError: the write failed (the message names the file, the cause, says the
            earlier file is unchanged and what to do).
    """
    source = ((attributes.get("metadata") or {}).get(META) or {}).get("source")
    if source and _same_file(Path(source), out):
        raise ValueError(f"{out} is the file this layer's image was read from; choose "
                         "another file name (outputs never replace inputs).")
    from ._compat import prepare_torch

    prepare_torch()
    from training.checkpoint import CheckpointWriteError, atomic_write_bytes

    try:
        atomic_write_bytes(out, write, temp_suffix=file_suffix(out))
    except CheckpointWriteError as exc:  # its advice is for the command line
        raise OSError(f"{exc.reason}. Free some space or choose another folder (one you "
                      "can write to), then save again.") from None
    return [str(out)]


def _unit_name(unit: Any) -> str:
    return str(unit).strip().lower() if unit is not None else "pixel"


def write_labels_nifti(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: Labels -> ``.nii.gz`` (source affine/header when known)."""
    import nibabel as nib

    out = _with_suffix(path, (".nii", ".nii.gz"), ".nii.gz")
    labels = _check_labels(data, out)
    meta = (attributes.get("metadata") or {}).get(META, {})
    array = source_order(np.transpose(labels, tuple(reversed(range(labels.ndim)))), meta)
    high = int(labels.max()) if labels.size else 0
    dtype = np.uint8 if high < 256 else np.int16 if high < 32768 else np.int32
    array = np.ascontiguousarray(array, dtype=dtype)
    affine, raw = meta.get("affine"), meta.get("nifti_header")
    shape = meta.get("nifti_shape")
    if shape is not None and tuple(shape) != array.shape and int(np.prod(shape)) == array.size:
        array = array.reshape(tuple(shape))
    header = None
    image_class = nib.Nifti1Image
    if affine is not None and raw is not None:
        affine = np.asarray(affine, dtype=np.float64)
        if len(raw) == nib.Nifti2Header.template_dtype.itemsize:
            header, image_class = nib.Nifti2Header(binaryblock=raw), nib.Nifti2Image
        else:
            header = nib.Nifti1Header(binaryblock=raw)
    else:
        affine = _affine_from_layer(attributes, labels.ndim)
    img = image_class(array, affine, header=header)
    img.header.set_data_dtype(array.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, float(high)
    img.header.set_intent("label")
    if header is not None:
        img.set_qform(affine, code=int(header["qform_code"]) or 1)
        img.set_sform(affine, code=int(header["sform_code"]) or 1)
    else:
        units = attributes.get("units") or ()
        nifti_unit = _UNIT_TO_NIFTI.get(_unit_name(units[-1]) if units else "", "unknown")
        img.header.set_xyzt_units(nifti_unit, "sec")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    return _write_atomic(out, attributes, lambda tmp: nib.save(img, tmp))


def _affine_from_layer(attributes: dict[str, Any], ndim: int) -> np.ndarray:
    """NIfTI affine from the layer's (reversed) last three scale/translate entries and,
    for 3D layers, the rotation of the layer ``affine`` (``_reader.scanner_rotation``)."""
    scale = list(attributes.get("scale") or [1.0] * ndim)[::-1][:3]
    translate = list(attributes.get("translate") or [0.0] * ndim)[::-1][:3]
    affine = np.eye(4)
    for i, (s, t) in enumerate(zip(scale, translate)):
        affine[i, i], affine[i, 3] = float(s), float(t)
    layer_affine = _layer_affine(attributes, ndim)
    if ndim >= 3 and layer_affine is not None:
        world = np.eye(4)  # the layer's last three axes, reversed to NIfTI (x, y, z) order
        world[:3, :3] = layer_affine[-4:-1, -4:-1][::-1, ::-1]
        world[:3, 3] = layer_affine[-4:-1, -1][::-1]
        affine = world @ affine
    return affine


def _layer_affine(attributes: dict[str, Any], ndim: int) -> np.ndarray | None:
    """The layer's ``affine`` as an ``(ndim+1, ndim+1)`` array, None if absent/identity."""
    value = attributes.get("affine")
    value = getattr(value, "affine_matrix", value)
    if value is None:
        return None
    matrix = np.asarray(value, dtype=np.float64)
    if matrix.shape != (ndim + 1, ndim + 1) or np.allclose(matrix, np.eye(ndim + 1)):
        return None
    return matrix


def write_labels_tiff(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: Labels -> ImageJ ``.tif`` (uint8/uint16, pixel sizes)."""
    import tifffile

    out = _with_suffix(path, (".tif", ".tiff"), ".tif")
    labels = _check_labels(data, out)
    high = int(labels.max()) if labels.size else 0
    if high > 65535:
        raise ValueError(f"{out}: label {high} does not fit a 16-bit TIFF; save as .nii.gz")
    if labels.ndim not in (2, 3):
        raise ValueError(f"{out}: TIFF export takes 2D or 3D labels, got {labels.ndim}D; "
                         "save as .nii.gz")
    array = labels.astype(np.uint8 if high < 256 else np.uint16)
    scale = [float(s) for s in (attributes.get("scale") or [1.0] * labels.ndim)]
    units = attributes.get("units") or ()
    metadata: dict[str, Any] = {"axes": "ZYX" if labels.ndim == 3 else "YX",
                                "Info": TIFF_LABEL_TAG}
    unit = _UNIT_TO_IMAGEJ.get(_unit_name(units[-1]) if units else "")
    if unit:
        metadata["unit"] = unit
    if labels.ndim == 3:
        metadata["spacing"] = scale[0]
    # origin: ImageJ calibration keys (in pixels: world = (index - origin) * pixel size)
    translate = [float(t) for t in (attributes.get("translate") or [0.0] * labels.ndim)]
    for key, t, s in zip(("zorigin", "yorigin", "xorigin")[3 - labels.ndim:], translate, scale):
        if t:
            metadata[key] = -t / s
    layer_affine = _layer_affine(attributes, labels.ndim)
    if layer_affine is not None:  # scanner rotation of 3D layers (_reader.scanner_rotation)
        metadata[TIFF_AFFINE_KEY] = json.dumps(layer_affine.tolist())
    return _write_atomic(out, attributes, lambda tmp: tifffile.imwrite(
        tmp, array, imagej=True, resolution=(1.0 / scale[-1], 1.0 / scale[-2]),
        metadata=metadata))


# -- DICOM ------------------------------------------------------------------------------
def _dicom_write(kind: str, path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Labels ``(Z, Y, X)`` -> DICOM-SEG or RTSTRUCT over the layer's source DICOM series."""
    from training.data.dicom import (
        DicomError,
        read_series,
        software_version,
        write_dicom_seg,
        write_rtstruct,
    )

    out = _with_suffix(path, (".dcm",), ".dcm")
    if out.exists():
        raise DicomError(f"{out}: already exists; choose another name or delete it first "
                         "(napari-dmoe never overwrites a file).")
    labels = _check_labels(data, out)
    metadata = attributes.get("metadata") or {}
    meta = metadata.get(META) or {}
    source = meta.get("dicom_source") or metadata.get("dicom_source")
    what = "DICOM-SEG" if kind == "seg" else "RTSTRUCT"
    if not source:
        origin = meta.get("source") or "this layer's image"
        raise DicomError(f"{out}: a {what} must reference the DICOM series its image came "
                         f"from, but {origin} is not a DICOM series; save as NIfTI or TIFF, "
                         "or open the DICOM series folder, segment it and save that.")
    volume = read_series(source, meta.get("dicom_series_uid"), pixels=False)
    array = np.transpose(labels, tuple(reversed(range(labels.ndim))))  # -> (X, Y[, Z])
    array = source_order(array, meta)  # the series' own voxel order (_reader.axis_order)
    if array.ndim == 2:
        array = array[:, :, None]
    names = list(meta.get("class_names") or [])
    high = int(labels.max()) if labels.size else 0
    if len(names) <= high:
        names = ["background"] + [f"class {i}" for i in range(1, high + 1)]
    segmented_as = meta.get("segmented_as") or {}
    attribute, value = next(iter(segmented_as.items()), (None, None))
    model = str(meta.get("model") or attributes.get("name") or "napari-dmoe")
    writer = write_dicom_seg if kind == "seg" else write_rtstruct

    def write(tmp: str) -> None:
        Path(tmp).unlink()  # the DICOM writers refuse an existing file, even this empty one
        writer(array, volume, names, tmp, algorithm_name=model,
               algorithm_version=software_version(), attribute=attribute,
               attribute_value=value)

    return _write_atomic(out, attributes, write)


def write_labels_dicom_seg(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: Labels -> DICOM Segmentation referencing the source series.

    The layer must come from a DICOM series (``metadata["napari_dmoe"]["dicom_source"]``,
    set by the reader and copied to segmentations by the widget); one segment per
    foreground class (``class_names`` in the metadata). Never overwrites a file.
    """
    return _dicom_write("seg", path, data, attributes)


def write_labels_rtstruct(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: Labels -> RT Structure Set (one ROI per class, LPS mm)."""
    return _dicom_write("rtstruct", path, data, attributes)
