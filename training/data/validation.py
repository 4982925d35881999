"""Check a dataset before training starts, and say precisely what is wrong.

``validate_cases`` raises one ``DataError`` per kind of problem, naming the cases and
files involved and what to do. Images are checked from their headers (PIL size,
tifffile series, npy mmap, npz member header, NIfTI header), then decoded (with a progress
bar) for NaN/inf values and sides too small to segment; masks are decoded because their
values are checked too. All of it before any training starts.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from training.data.cases import SPLITS, Case, attribute_names
from training.data.errors import DataError, first_lines
from training.data.geometry import affine_mismatch, affines_match, axcodes
from training.data.io import image_info, read_image, read_label


def _check_splits(cases: list[Case], splits: tuple[str, ...] | list[str]) -> Counter:
    counts = Counter(c.split for c in cases)
    bad = sorted({str(s) for s in counts if s is not None and s not in SPLITS})
    if bad:
        raise DataError(f"unknown split value(s) {', '.join(bad)}; use train, val or test.")
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"splits must be among {SPLITS}, got {split!r}")
        if counts[split] == 0:
            have = ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=str)) or "none"
            raise DataError(f"split {split!r} is empty (cases per split: {have}); give some "
                            f"cases split {split!r} in the manifest, or leave the split "
                            "column empty so a seeded split is assigned.")
    return counts


def _check_present(cases: list[Case], attribute: str | None, require_labels: bool) -> None:
    ids = Counter(c.id for c in cases)
    dupes = [f"{i} ({n} times)" for i, n in ids.items() if n > 1]
    if dupes:
        raise DataError(f"{len(dupes)} case id(s) are used more than once; ids name the "
                        f"prediction files, make them unique:\n{first_lines(dupes)}")
    if attribute is not None:
        names = attribute_names(cases)
        if attribute not in names:
            raise DataError(f"attribute column {attribute!r} does not exist; available "
                            f"columns: {', '.join(names) or '(none)'}. Pick one of these with "
                            "--attribute, or add the column to the manifest.")
    if require_labels:
        unlabelled = [c.id for c in cases if c.label is None]
        if unlabelled:
            raise DataError(f"{len(unlabelled)} case(s) have no label (mask) file; training and "
                            f"evaluation need one per case (manifest column `label`):\n"
                            f"{first_lines(unlabelled)}")


def _check_files_exist(cases: list[Case], require_labels: bool) -> None:
    missing = []
    for case in cases:
        paths = [("image", case.image)]
        if case.label is not None and case.label != case.image:
            paths.append(("label", case.label))
        missing += [f"case {case.id}: {kind} {path}" for kind, path in paths
                    if not (path.is_file() or (kind == "image" and path.is_dir()))]
    if missing:
        raise DataError(f"{len(missing)} file(s) are missing; check the paths (manifest paths "
                        f"are relative to the manifest's folder):\n{first_lines(missing)}")


MIN_IMAGE_SIDE = 8
"""Smallest image side the networks segment (``training.inference.MIN_SIDE``)."""


def is_binary_255(path: Path, label: Any) -> bool:
    """An 8-bit image mask holding only 0 and 255 (read with ``remap_255=False``)."""
    from training.data.io import PIL_SUFFIXES, TIFF_SUFFIXES, file_suffix

    if file_suffix(path) not in (*PIL_SUFFIXES, *TIFF_SUFFIXES) or not label.size:
        return False
    values = np.unique(label)
    return 255 in values and bool(np.isin(values, (0, 255)).all())


def _progress(cases: list[Case], enabled: bool):
    """``cases`` with a tqdm bar on stderr (shown on terminals only)."""
    if not enabled:
        return cases
    from tqdm import tqdm

    return tqdm(cases, desc="checking images", unit="case", leave=False, disable=None)


def _check_pixels(case: Case, spatial_dims: int | None, problems: dict[str, list[str]]
                  ) -> dict[str, Any]:
    """Decode the image: NaN/inf values and sides under ``MIN_IMAGE_SIDE``. Returns
    ``read_image``'s meta (``spatial_shape``, ``channels``, ``affine``: what
    ``image_info`` would give, without reading the header again)."""
    image, meta = read_image(case.image, case.image_key, spatial_dims=spatial_dims)
    shape = tuple(image.shape[1:])
    if shape and min(shape) < MIN_IMAGE_SIDE:
        problems["small"].append(f"case {case.id}: image {case.image.name} is "
                                 f"{'×'.join(map(str, shape))}")
    bad = int(np.count_nonzero(~np.isfinite(image)))
    if bad:
        problems["nonfinite"].append(f"case {case.id}: image {case.image.name} has {bad} "
                                     "NaN/inf value(s)")
    return meta


def validate_cases(cases: list[Case], attribute: str | None, *, num_classes: int | None = None,
                   spatial_dims: int | None = None, require_labels: bool = True,
                   check_files: bool = True, splits: tuple[str, ...] | list[str] = (),
                   check_pixels: bool = True) -> dict[str, Any]:
    """Raise ``DataError`` if the cases cannot be trained or evaluated on.

    Checks, in order: requested ``splits`` are non-empty and split values valid; case ids
    unique; the ``attribute`` column exists (None skips this); every case has a label
    (when ``require_labels``); files exist; with ``check_files``: image spatial dims match
    ``spatial_dims``, all images have the same channel count, mask shape equals the
    image's spatial shape, mask values are integers in ``0..num_classes-1``.

    Args:
        cases: cases to check (e.g. from ``load_cases`` + ``assign_splits``).
        attribute: routing attribute column, or None.
        num_classes: number of classes including background; None skips the upper bound.
        spatial_dims: 2 or 3; None accepts either (but not a mixture).
        require_labels: every case must have a mask.
        check_files: read headers and masks (False: only the manifest-level checks).
        splits: splits that must hold at least one case, e.g. ``("train", "val")``.
        check_pixels: with ``check_files``, decode every image (progress bar on a
            terminal) and refuse NaN/inf values and sides under ``MIN_IMAGE_SIDE``; 8-bit
            0/255 masks are refused when the dataset has more than one foreground class.

    Returns:
        Summary ``{"n_cases", "splits": {split: n}, "in_channels", "spatial_dims",
        "max_label"}`` (the last three None when ``check_files`` is False).
    """
    if not cases:
        raise DataError("no cases found; check the dataset path and format.")
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + classes), got {num_classes}")
    counts = _check_splits(cases, splits)
    _check_present(cases, attribute, require_labels)
    summary: dict[str, Any] = {
        "n_cases": len(cases), "splits": {s: counts[s] for s in SPLITS if counts[s]},
        "in_channels": None, "spatial_dims": None, "max_label": None,
    }
    if not check_files:
        return summary
    _check_files_exist(cases, require_labels)
    problems: dict[str, list[str]] = {"unreadable": [], "dims": [], "small": [],
                                      "nonfinite": [], "shape": [], "affine": [],
                                      "values": [], "range": [], "binary255": []}
    channels: dict[int, list[str]] = {}
    dims_seen: set[int] = set()
    max_label = 0
    masks_255: list[str] = []
    for case in _progress(cases, check_pixels):
        try:
            info = (_check_pixels(case, spatial_dims, problems) if check_pixels
                    else image_info(case.image, case.image_key, spatial_dims=spatial_dims))
        except DataError as err:
            problems["unreadable"].append(f"case {case.id}: {err}")
            continue
        ndim = len(info["spatial_shape"])
        dims_seen.add(ndim)
        channels.setdefault(info["channels"], []).append(case.id)
        if spatial_dims is not None and ndim != spatial_dims:
            problems["dims"].append(f"case {case.id}: image {case.image.name} has {ndim} "
                                    f"spatial dims {info['spatial_shape']}")
        if case.label is None:
            continue
        try:
            label = read_label(case.label, case.label_key, remap_255=False)
        except DataError as err:
            problems["values"].append(f"case {case.id}: {err}")
            continue
        if is_binary_255(case.label, label):
            masks_255.append(f"case {case.id}: {case.label.name}")
            label = (label == 255).astype(label.dtype)
        if tuple(label.shape) != tuple(info["spatial_shape"]):
            problems["shape"].append(f"case {case.id}: image {tuple(info['spatial_shape'])} vs "
                                     f"mask {tuple(label.shape)}")
            continue
        mismatch = _affine_problem(case, info.get("affine"))
        if mismatch:
            problems["affine"].append(mismatch)
            continue
        if label.size:
            low, high = int(label.min()), int(label.max())
            max_label = max(max_label, high)
            if low < 0 or (num_classes is not None and high > num_classes - 1):
                problems["range"].append(f"case {case.id}: mask values {low}..{high}")
    if masks_255 and max(max_label, (num_classes or 2) - 1) > 1:
        problems["binary255"] = masks_255
    _raise_problems(problems, num_classes, spatial_dims)
    if len(dims_seen) > 1:
        raise DataError("the dataset mixes 2D and 3D images; keep one kind per dataset.")
    if len(channels) > 1:
        examples = [f"{n} channel(s): e.g. case {ids[0]} ({len(ids)} cases)"
                    for n, ids in sorted(channels.items())]
        raise DataError("images have different channel counts; convert them all to grayscale "
                        f"or all to RGB:\n{first_lines(examples)}")
    summary.update(in_channels=next(iter(channels)), spatial_dims=dims_seen.pop(),
                   max_label=max_label)
    return summary


def _affine_problem(case: Case, image_affine: Any) -> str | None:
    """A line naming the case and both orientations if image and mask affines differ."""
    if image_affine is None:
        return None
    try:
        label_affine = image_info(case.label, case.label_key).get("affine")
    except DataError:
        return None
    if label_affine is None or affines_match(image_affine, label_affine):
        return None
    return (f"case {case.id}: image {case.image.name} is {axcodes(image_affine)}, mask "
            f"{case.label.name} is {axcodes(label_affine)} ({axcodes(image_affine)} vs "
            f"{axcodes(label_affine)}; corners/steps differ by up to "
            f"{affine_mismatch(image_affine, label_affine):.3g} mm)")


def _raise_problems(problems: dict[str, list[str]], num_classes: int | None,
                    spatial_dims: int | None) -> None:
    classes = f"0..{num_classes - 1}" if num_classes is not None else "0 or more"
    advice = {
        "unreadable": "image(s) cannot be read; re-export them in a supported format",
        "dims": f"image(s) are not {spatial_dims}D; check --spatial-dims",
        "shape": ("mask(s) have a different spatial shape than their image; resample each "
                  "mask onto its image's grid (nearest neighbour)"),
        "affine": ("mask(s) are placed differently in the scanner than their image (affines "
                   "differ); the mask would not overlap its image. Re-export each mask on its "
                   "image's grid with the image's affine"),
        "small": (f"image(s) are smaller than {MIN_IMAGE_SIDE} pixels on a side, the "
                  "smallest the networks segment; remove them or resample them"),
        "nonfinite": ("image(s) hold NaN or infinite values, which would train on garbage; "
                      "fill or remove those pixels (e.g. numpy.nan_to_num) or drop the cases"),
        "values": "mask(s) cannot be used as class indices",
        "binary255": ("mask(s) hold only 0 and 255, the binary (one-class) mask convention, "
                      "but the dataset has more than one foreground class, so 255 cannot be "
                      "mapped to a class; store class indices 0..K-1 in every mask"),
        "range": (f"mask(s) hold values outside {classes} (after remapping); fix the masks "
                  "or pass the right --classes"),
    }
    for kind, lines in problems.items():
        if lines:
            raise DataError(f"{len(lines)} {advice[kind]}:\n{first_lines(lines)}")
