"""Read images and label masks from disk, and write predicted masks back.

Formats (shared/DATA_FORMATS.md §1-4): ``.png .jpg .jpeg .tif .tiff .npy .npz .nii .nii.gz``.
Images may also be DICOM series (a folder, or one ``.dcm`` file of the series; read by
``training.data.dicom`` in NIfTI voxel order with a RAS affine, ``meta["suffix"] == "dicom"``).

Images come back as float32 ``(C, *spatial)``: grayscale 2D ``(1, H, W)``, RGB 2D
``(3, H, W)`` (channel-first), 3D volumes ``(1, X, Y, Z)`` in the file's own array order
(NIfTI: voxel axes i, j, k, never reoriented, so the affine stays valid). Channel layout of
arrays without metadata (``.npy``/``.npz``/plain ``.tif``) is decided by ``_channel_axis``:

- 2-D arrays are grayscale 2D images.
- 3-D arrays are channels-last 2D when the last axis has 3-4 entries, channels-first 2D
  when the first axis has 1, 3 or 4 entries, otherwise one 3D volume. Pass
  ``spatial_dims`` to ``read_image`` to settle the ambiguous cases.
- 4-D arrays are 3D volumes with channels first (first axis <= 4) or last.

Label masks come back as int64 ``(*spatial)`` class indices. FairSeg masks (npz key
``disc_cup_mask`` or the old ``disc_cup``) hold 0/-1/-2 and become 0/1/2 (rim = 1,
cup = 2); 8-bit image masks holding only 0 and 255 (HAM10000) become 0/1; everything else
is returned as stored. Float masks with non-integer values raise ``DataError``.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from training.data.errors import DataError

PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
SUPPORTED_SUFFIXES = (*PIL_SUFFIXES, *TIFF_SUFFIXES, ".npy", ".npz", *NIFTI_SUFFIXES)
DICOM_SUFFIX = "dicom"
"""``meta["suffix"]`` of a DICOM series (a folder, or one ``.dcm`` file of the series)."""

FAIRSEG_IMAGE_KEYS = ("slo_fundus", "fundus_slo")
"""npz keys of a FairSeg image: current name first, then the old one."""
FAIRSEG_LABEL_KEYS = ("disc_cup_mask", "disc_cup")
"""npz keys of a FairSeg disc/cup mask (0 = background, -1 = rim, -2 = cup)."""

_PIL_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def file_suffix(path: str | Path) -> str:
    """Lower-case suffix, treating ``.nii.gz`` as one suffix."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def file_stem(path: str | Path) -> str:
    """File name without its suffix (``case.nii.gz`` -> ``case``)."""
    name = Path(path).name
    return name[: len(name) - len(file_suffix(path))]


def label_suffix_for(image_path: str | Path) -> str:
    """Suffix of the label file written for an image: same family, lossless.

    png/jpg/jpeg -> ``.png``, tif/tiff -> ``.tif``, nii/nii.gz -> ``.nii.gz``,
    npy -> ``.npy``, npz (FairSeg) -> ``.png``.
    """
    suffix = file_suffix(image_path)
    if is_dicom_image(image_path):
        return ".nii.gz"
    table = {".png": ".png", ".jpg": ".png", ".jpeg": ".png", ".tif": ".tif",
             ".tiff": ".tif", ".nii": ".nii.gz", ".nii.gz": ".nii.gz", ".npy": ".npy",
             ".npz": ".png"}
    if suffix not in table:
        raise DataError(f"{image_path}: unsupported file type {suffix!r}; "
                        f"use one of {', '.join(SUPPORTED_SUFFIXES)}.")
    return table[suffix]


def is_dicom_image(path: str | Path) -> bool:
    """A DICOM series given as its folder or as one ``.dcm`` file of it (no file read)."""
    path = Path(path)
    return path.is_dir() or file_suffix(path) == ".dcm"


def _read_dicom(path: Path, pixels: bool) -> tuple[np.ndarray | None, dict[str, Any]]:
    """A DICOM series as ``(1, X, Y, Z)`` HU (NIfTI voxel order) and its RAS affine."""
    from training.data.dicom import read_series

    volume = read_series(path, pixels=pixels)
    meta = {"path": str(path), "suffix": DICOM_SUFFIX, "spatial_shape": volume.shape,
            "channels": 1, "original_channels_last": False, "affine": volume.affine,
            "spacing": volume.spacing, "nifti_header": None,
            "dicom_series_uid": volume.series_instance_uid}
    image = None if volume.array is None else volume.array[None]
    return image, meta


def _check_readable(path: Path) -> str:
    suffix = file_suffix(path)
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; "
                        f"convert it to one of {', '.join(SUPPORTED_SUFFIXES)}.")
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path (manifest paths are "
                        "relative to the manifest's folder).")
    return suffix


def _npz_key(path: Path, files: list[str], key: str | None, defaults: tuple[str, ...]) -> str:
    """Pick the array to read from an npz: ``key`` if given, else the first default present."""
    candidates = (key,) if key is not None else defaults
    for name in candidates:
        if name in files:
            return name
    if key is None and len(files) == 1:
        return files[0]
    raise DataError(f"{path}: no array named {' or '.join(candidates)} in the npz "
                    f"(it holds {', '.join(sorted(files))}); pass the right key.")


def _npz_header_shape(path: Path, name: str) -> tuple[int, ...]:
    """Shape of one npz member, read from its .npy header without loading the data."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, _ = np.lib.format.read_array_header_2_0(f)
    return tuple(int(s) for s in shape)


def _channel_axis(shape: tuple[int, ...], suffix: str, path: Path, *, axes: str | None = None,
                  spatial_dims: int | None = None) -> int | None:
    """Which axis of a stored array holds channels (None: single channel, add one)."""
    ndim = len(shape)
    if suffix in NIFTI_SUFFIXES:
        return -1 if ndim == 4 else None
    if axes:
        for letter in ("S", "C"):
            if letter in axes:
                return axes.index(letter)
        if ndim == 3 and spatial_dims != 2:
            return None
    if ndim == 2:
        return None
    if ndim == 3:
        first, last = shape[0], shape[-1]
        if spatial_dims == 3:
            return None
        if spatial_dims == 2:
            if first <= 4:
                return 0
            if last <= 4:
                return -1
        elif last in (3, 4) and first > 4:
            return -1
        elif first in (1, 3, 4) and last > 4:
            return 0
        else:
            return None
    if ndim == 4 and spatial_dims != 2:
        if shape[0] <= 4:
            return 0
        if shape[-1] <= 4:
            return -1
    raise DataError(f"{path}: cannot tell channels from spatial axes in an array of shape "
                    f"{shape}; store 2D images as (H, W[, C]) and 3D volumes as "
                    "(X, Y, Z) or (C, X, Y, Z).")


def _split_shape(shape: tuple[int, ...], axis: int | None) -> tuple[int, tuple[int, ...]]:
    if axis is None:
        return 1, tuple(shape)
    axis = axis % len(shape)
    return shape[axis], tuple(s for i, s in enumerate(shape) if i != axis)


def image_info(path: str | Path, key: str | None = None, *,
               spatial_dims: int | None = None) -> dict[str, Any]:
    """Channels and spatial shape of an image, from its header where the format allows.

    Returns ``{"channels": C, "spatial_shape": (...), "suffix": str}`` without decoding
    pixel data (PIL size, tifffile series, npy mmap, npz member header, NIfTI header).

    Raises:
        DataError: unsupported, missing, damaged or truncated file (naming it), a NIfTI
            header with non-finite spacing or a size no file of this length can hold.
    """
    try:
        return _image_info(Path(path), key, spatial_dims)
    except DataError:
        raise
    except _read_errors() as exc:
        raise DataError(damaged_file_message(path, exc)) from None


READ_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError, zipfile.BadZipFile,
                                                zlib.error, MemoryError, ImportError)
"""What decoding a damaged file raises in PIL, numpy, zipfile, gzip, tifffile; nibabel's
``ImageFileError`` is added when nibabel is imported."""


def damaged_file_message(path: str | Path, exc: BaseException) -> str:
    """User-facing text for a file that cannot be decoded (names the file and the cause)."""
    text = str(exc) or type(exc).__name__
    return (f"{path}: cannot read the file ({text}); it is damaged, truncated or not what "
            "its name says. Re-export or re-copy it.")


NIFTI_GZIP_MAX_RATIO = 1100
"""gzip (deflate) cannot compress more than about 1032:1, so a ``.nii.gz`` whose header
promises more than this times its file size is truncated or lies."""


def check_nifti(img: Any, path: str | Path) -> None:
    """Refuse a NIfTI header before its data is read: spacing that is not a positive
    number, or a data size the file cannot hold (or this machine cannot allocate).

    Raises:
        DataError: naming the file, the header values and what to do.
    """
    path = Path(path)
    shape = tuple(int(s) for s in img.shape)
    spatial = min(len(shape), 3)
    zooms = [float(z) for z in img.header.get_zooms()[:spatial]]
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        raise DataError(f"{path}: the header's voxel spacing {tuple(zooms)} is not a positive "
                        "number on every axis (pixdim is NaN, infinite or 0); fix the header "
                        "(e.g. nibabel: img.header.set_zooms(...)) or re-export the file.")
    itemsize = np.dtype(img.get_data_dtype()).itemsize
    nbytes = int(np.prod(shape, dtype=object)) * itemsize
    size = path.stat().st_size if path.is_file() else None
    dims = "×".join(map(str, shape))
    if size is not None:
        limit = size * NIFTI_GZIP_MAX_RATIO if file_suffix(path) == ".nii.gz" else size
        if nbytes > limit:
            raise DataError(f"{path}: the header claims {dims} voxels ({nbytes / 2**30:.1f} "
                            f"GiB of data) but the file has {size} bytes; the file is "
                            "truncated or its header is corrupt. Re-export or re-copy it.")
    memory = _physical_memory()
    if memory and nbytes * 4 > memory:  # float32 copy + preprocessing
        raise DataError(f"{path}: the volume is {dims} voxels ({nbytes / 2**30:.1f} GiB as "
                        f"stored), more than this machine's memory ({memory / 2**30:.1f} GiB) "
                        "can process; crop or downsample it first.")


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _image_info(path: Path, key: str | None, spatial_dims: int | None) -> dict[str, Any]:
    if is_dicom_image(path):
        _, meta = _read_dicom(path, pixels=False)
        return {"channels": 1, "spatial_shape": meta["spatial_shape"], "suffix": DICOM_SUFFIX,
                "affine": meta["affine"], "spacing": meta["spacing"]}
    suffix = _check_readable(path)
    axes = affine = None
    if suffix in PIL_SUFFIXES:
        from PIL import Image

        with Image.open(path) as im:
            channels = 1 if im.mode in _PIL_GRAY_MODES else 3
            return {"channels": channels, "spatial_shape": (im.height, im.width),
                    "suffix": suffix}
    if suffix in TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            shape, axes = tuple(tf.series[0].shape), tf.series[0].axes
    elif suffix == ".npy":
        shape = tuple(np.load(path, mmap_mode="r").shape)
    elif suffix == ".npz":
        with np.load(path) as npz:
            name = _npz_key(path, list(npz.files), key, FAIRSEG_IMAGE_KEYS)
        shape = _npz_header_shape(path, name)
    else:
        import nibabel as nib

        nifti = nib.load(path)
        check_nifti(nifti, path)
        shape = _squeeze_nifti(tuple(nifti.shape))
        affine = np.asarray(nifti.affine, dtype=np.float64)  # NIfTI: geometry from the header
    axis = _channel_axis(shape, suffix, path, axes=axes, spatial_dims=spatial_dims)
    channels, spatial = _split_shape(shape, axis)
    return {"channels": channels, "spatial_shape": spatial, "suffix": suffix, "affine": affine}


def _squeeze_nifti(shape: tuple[int, ...]) -> tuple[int, ...]:
    """NIfTI stores channels of a 3D image as dim 5 (X, Y, Z, 1, C): drop the time axis."""
    if len(shape) == 5 and shape[3] == 1:
        return shape[:3] + shape[4:]
    return shape


def _read_pil(path: Path, as_label: bool) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if as_label:
            return np.asarray(im)
        if im.mode in _PIL_GRAY_MODES:
            im = im.convert("L") if im.mode in ("1", "LA") else im
            return np.asarray(im)
        return np.asarray(im.convert("RGB"))


def _read_array(path: Path, suffix: str, key: str | None, as_label: bool
                ) -> tuple[np.ndarray, str | None, str | None, Any]:
    """Decode a file: (array as stored, tiff axes or None, npz key or None, nibabel image).

    A damaged or truncated file raises ``DataError`` naming it (never a library error)."""
    try:
        return _decode_array(path, suffix, key, as_label)
    except DataError:
        raise
    except _read_errors() as exc:
        raise DataError(damaged_file_message(path, exc)) from None


def _read_errors() -> tuple[type[BaseException], ...]:
    try:
        from nibabel.filebasedimages import ImageFileError
    except ImportError:
        return READ_ERRORS
    return (*READ_ERRORS, ImageFileError)


def _decode_array(path: Path, suffix: str, key: str | None, as_label: bool
                  ) -> tuple[np.ndarray, str | None, str | None, Any]:
    if suffix in PIL_SUFFIXES:
        return _read_pil(path, as_label), None, None, None
    if suffix in TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tf:
            return tf.series[0].asarray(), tf.series[0].axes, None, None
    if suffix == ".npy":
        return np.load(path, allow_pickle=False), None, None, None
    if suffix == ".npz":
        defaults = FAIRSEG_LABEL_KEYS if as_label else FAIRSEG_IMAGE_KEYS
        with np.load(path, allow_pickle=False) as npz:
            name = _npz_key(path, list(npz.files), key, defaults)
            return np.asarray(npz[name]), None, name, None
    import nibabel as nib

    img = nib.load(path)
    check_nifti(img, path)
    data = np.asanyarray(img.dataobj)
    return data.reshape(_squeeze_nifti(data.shape)), None, None, img


def read_image(path: str | Path, key: str | None = None, *,
               spatial_dims: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Read an image as float32 ``(C, *spatial)`` plus metadata.

    Args:
        path: image file (see module docstring for formats).
        key: npz array name; default ``slo_fundus`` then ``fundus_slo`` (FairSeg).
        spatial_dims: 2 or 3 to settle ambiguous channel layouts of raw arrays.

    Returns:
        ``(image, meta)``; meta holds ``spatial_shape``, ``channels``, ``affine`` (4x4 for
        NIfTI, else None), ``spacing`` (NIfTI voxel sizes, else None),
        ``original_channels_last``, ``nifti_header`` (raw header bytes or None),
        ``suffix`` and ``path``.
    """
    path = Path(path)
    if is_dicom_image(path):
        return _read_dicom(path, pixels=True)
    suffix = _check_readable(path)
    array, axes, _, nifti = _read_array(path, suffix, key, as_label=False)
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: image data of type {array.dtype} is not numeric; "
                        "store intensities as integers or floats.")
    axis = _channel_axis(array.shape, suffix, path, axes=axes, spatial_dims=spatial_dims)
    channels_last = axis is not None and axis % array.ndim == array.ndim - 1
    if axis is None:
        array = array[None]
    elif axis % array.ndim != 0:
        array = np.moveaxis(array, axis, 0)
    image = np.ascontiguousarray(array, dtype=np.float32)
    meta: dict[str, Any] = {
        "path": str(path), "suffix": suffix, "spatial_shape": tuple(image.shape[1:]),
        "channels": int(image.shape[0]), "original_channels_last": bool(channels_last),
        "affine": None, "spacing": None, "nifti_header": None,
    }
    if nifti is not None:
        meta["affine"] = np.asarray(nifti.affine, dtype=np.float64)
        meta["spacing"] = tuple(float(z) for z in nifti.header.get_zooms()[:3])
        meta["nifti_header"] = bytes(nifti.header.binaryblock)
    return image, meta


def _as_integer_mask(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype.kind == "b":
        return array.astype(np.int64)
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        bad = ~finite | (array != np.round(np.where(finite, array, 0)))
        if bad.any():
            example = float(array[bad].flat[0])
            raise DataError(f"{path}: mask holds non-integer values (e.g. {example:g}); masks "
                            "must hold class indices 0..K-1. Re-export it as integers "
                            "(nearest-neighbour resampling, no interpolation).")
    elif array.dtype.kind not in "iu":
        raise DataError(f"{path}: mask data of type {array.dtype} is not numeric; store "
                        "class indices as integers.")
    return array.astype(np.int64)


def read_label(path: str | Path, key: str | None = None, *,
               remap_255: bool = True) -> np.ndarray:
    """Read a label mask as int64 ``(*spatial)`` class indices (see module docstring).

    ``remap_255=False`` returns 8-bit 0/255 masks as stored (validation uses it to refuse
    such masks in datasets with more than one foreground class)."""
    path = Path(path)
    suffix = _check_readable(path)
    array, axes, name, _ = _read_array(path, suffix, key, as_label=True)
    colour_axis = None
    if suffix in PIL_SUFFIXES and array.ndim == 3:
        colour_axis = -1
    elif axes and "S" in axes:
        colour_axis = axes.index("S")
    if colour_axis is not None:
        planes = np.moveaxis(array, colour_axis, 0)
        colours = planes[:3] if planes.shape[0] >= 3 else planes[:1]
        if not all(np.array_equal(colours[0], c) for c in colours[1:]):
            raise DataError(f"{path}: mask is a colour image; masks must be single-channel "
                            "class indices (0 = background, 1..K = classes).")
        array = planes[0]
    mask = _as_integer_mask(array, path)
    if name in FAIRSEG_LABEL_KEYS:
        mask = -mask
    elif remap_255 and suffix in (*PIL_SUFFIXES, *TIFF_SUFFIXES) and array.dtype == np.uint8:
        values = np.unique(mask)
        if 255 in values and np.isin(values, (0, 255)).all():
            mask = (mask == 255).astype(np.int64)
    return mask


def write_label(path: str | Path, labels: np.ndarray, meta: dict[str, Any] | None = None
                ) -> Path:
    """Write an integer mask ``(*spatial)``; the format follows ``path``'s suffix.

    ``.png`` (uint8, 2D only), ``.tif``/``.tiff`` (uint8/uint16), ``.nii``/``.nii.gz``
    (uint8/int16, with ``meta["affine"]`` and ``meta["nifti_header"]`` from
    ``read_image`` when given, so spacing and orientation survive), ``.npy``.
    Creates missing parent folders and returns the path written.
    """
    path = Path(path)
    suffix = file_suffix(path)
    mask = _as_integer_mask(np.asarray(labels), path)
    low, high = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
    if low < 0:
        raise DataError(f"{path}: refusing to write negative class index {low}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        from PIL import Image

        if mask.ndim != 2 or high > 255:
            raise DataError(f"{path}: .png holds 2D masks with classes <= 255 (got shape "
                            f"{mask.shape}, max {high}); write .tif, .nii.gz or .npy.")
        Image.fromarray(mask.astype(np.uint8), mode="L").save(path)
    elif suffix in TIFF_SUFFIXES:
        import tifffile

        tifffile.imwrite(path, mask.astype(np.uint8 if high < 256 else np.uint16))
    elif suffix in NIFTI_SUFFIXES:
        _write_nifti(path, mask.astype(np.uint8 if high < 256 else np.int16), meta)
    elif suffix == ".npy":
        np.save(path, mask.astype(np.uint8 if high < 256 else np.int32))
    else:
        raise DataError(f"{path}: cannot write masks as {suffix!r}; use .png, .tif, .nii.gz "
                        "or .npy.")
    return path


def _write_nifti(path: Path, mask: np.ndarray, meta: dict[str, Any] | None) -> None:
    import nibabel as nib

    meta = meta or {}
    raw = meta.get("nifti_header")
    affine = meta.get("affine")
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    header = None
    image_class = nib.Nifti1Image
    if raw is not None:
        if len(raw) == nib.Nifti2Header.template_dtype.itemsize:
            header, image_class = nib.Nifti2Header(binaryblock=raw), nib.Nifti2Image
        else:
            header = nib.Nifti1Header(binaryblock=raw)
    img = image_class(mask, affine, header=header)
    img.header.set_data_dtype(mask.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, float(mask.max()) if mask.size else 0
    if header is not None:
        img.set_qform(affine, code=int(header["qform_code"]) or 1)
        img.set_sform(affine, code=int(header["sform_code"]) or 1)
    nib.save(img, str(path))
