"""HAM10000: dermoscopy images, Tschandl's lesion masks and the metadata CSV.

Layout (shared/DATA_FORMATS.md §3)::

    HAM10000_metadata.csv        lesion_id,image_id,dx,dx_type,age,sex,localization
    HAM10000_images/ISIC_XXXXXXX.jpg        (or HAM10000_images_part_1/, _part_2/)
    HAM10000_segmentations_lesion_tschandl/ISIC_XXXXXXX_segmentation.png   (0/255)

Rows with a missing age or sex (empty, ``nan`` or ``unknown``) are dropped. Every CSV
column becomes an attribute (``age`` as written, ``sex``, ``dx``, ...) plus ``age_group``
(``<20``, ``20-39``, ``40-59``, ``60-79``, ``>=80``). ``group_key`` is the lesion_id, so
``assign_splits`` keeps every image of a lesion in one split (80/10/10 by default).
"""

from __future__ import annotations

import csv
from pathlib import Path

from training.data.cases import Case
from training.data.errors import DataError

METADATA = "HAM10000_metadata.csv"
MASK_FOLDER = "HAM10000_segmentations_lesion_tschandl"
AGE_GROUPS = ("<20", "20-39", "40-59", "60-79", ">=80")
_MISSING = ("", "nan", "none", "unknown", "na")


def age_group(age: float) -> str:
    """HAM10000 reference age group of an age in years."""
    if age < 20:
        return "<20"
    if age < 40:
        return "20-39"
    if age < 60:
        return "40-59"
    if age < 80:
        return "60-79"
    return ">=80"


def _index(folders: list[Path], pattern: str, strip: str = "") -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.rglob(pattern)):
                found.setdefault(path.stem[: len(path.stem) - len(strip)], path)
    return found


def read_ham10000(folder: str | Path) -> list[Case]:
    """Read a HAM10000 folder (or its metadata CSV's folder) into cases, in CSV order."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    meta_path = folder / METADATA
    if not meta_path.is_file():
        raise DataError(f"{folder}: {METADATA} not found; pass the HAM10000 folder.")
    with meta_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    needed = ("lesion_id", "image_id", "age", "sex")
    absent = [c for c in needed if c not in columns]
    if absent:
        raise DataError(f"{meta_path}: missing column(s) {', '.join(absent)} (columns: "
                        f"{', '.join(columns)}); is this the HAM10000 metadata file?")
    image_folders = [folder, *sorted(p for p in folder.glob("HAM10000_images*") if p.is_dir())]
    images = {}
    for suffix in ("jpg", "jpeg", "png"):
        for stem, path in _index(image_folders[1:], f"*.{suffix}").items():
            images.setdefault(stem, path)
        for path in sorted(folder.glob(f"*.{suffix}")):
            images.setdefault(path.stem, path)
    mask_folder = folder / MASK_FOLDER
    masks = _index([mask_folder], "*_segmentation.png", strip="_segmentation")
    cases = []
    for row in rows:
        age_text, sex = row["age"], row["sex"]
        if age_text.lower() in _MISSING or sex.lower() in _MISSING:
            continue
        try:
            age = float(age_text)
        except ValueError as err:
            raise DataError(f"{meta_path}: image {row['image_id']}: age {age_text!r} is not a "
                            "number; fix or empty the cell.") from err
        image_id = row["image_id"]
        label = masks.get(image_id)
        if label is None and mask_folder.is_dir():
            label = mask_folder / f"{image_id}_segmentation.png"
        attributes = {c: row.get(c, "") for c in columns if c not in ("image_id", "lesion_id")}
        attributes["age_group"] = age_group(age)
        cases.append(Case(
            id=image_id,
            image=images.get(image_id, folder / "HAM10000_images" / f"{image_id}.jpg"),
            label=label, attributes=attributes, split=None, source="ham10000",
            group_key=row["lesion_id"] or None,
        ))
    if not cases:
        raise DataError(f"{meta_path}: no rows with both age and sex; nothing to train on.")
    return cases
