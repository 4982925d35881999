"""The generic manifest: ``manifest.csv`` naming images, masks, splits, ids and attributes.

Columns (shared/DATA_FORMATS.md §1): ``image`` (required), ``label``, ``split``, ``id``,
and any other column is a patient attribute read as a string (empty = unknown). Paths are
relative to the manifest's folder (absolute paths are kept as they are).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from pathlib import Path

from training.data.cases import SPLITS, Case
from training.data.errors import DataError, first_lines
from training.data.io import file_stem

RESERVED_COLUMNS = ("image", "label", "split", "id")


def _resolve(root: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else root / path


def read_manifest(path: str | Path) -> list[Case]:
    """Read ``manifest.csv`` (or a folder holding one) into cases, in row order."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.csv"
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; create a manifest.csv with at least an "
                        "`image` column (shared/DATA_FORMATS.md §1).")
    root = path.parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = list(reader)
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line "
                        f"{line} cannot be decoded; the file was probably saved as Latin-1 / "
                        "Windows-1252). Save it as UTF-8 (spreadsheet: 'CSV UTF-8'; shell: "
                        "iconv -f latin1 -t utf-8) and retry.") from None
    if "image" not in columns:
        raise DataError(f"{path}: no `image` column (columns: {', '.join(columns) or 'none'}); "
                        "the manifest needs image,label,split,id,<attributes>.")
    attributes = [c for c in columns if c not in RESERVED_COLUMNS and c]
    cases, problems, seen = [], [], {}
    for line, raw in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        if not row.get("image"):
            problems.append(f"line {line}: empty `image` cell")
            continue
        image = _resolve(root, row["image"])
        split = row.get("split", "").lower() or None
        if split is not None and split not in SPLITS:
            problems.append(f"line {line}: split {row['split']!r} is not train, val or test")
            continue
        case_id = row.get("id") or file_stem(image)
        if case_id in seen:
            problems.append(f"line {line}: id {case_id!r} already used on line {seen[case_id]}")
            continue
        seen[case_id] = line
        cases.append(Case(
            id=case_id, image=image,
            label=_resolve(root, row["label"]) if row.get("label") else None,
            attributes={name: row.get(name, "") for name in attributes},
            split=split, source="manifest",
        ))
    if problems:
        raise DataError(f"{path}: {len(problems)} bad row(s); fix them and retry:\n"
                        f"{first_lines(problems)}")
    return cases


def write_manifest(path: str | Path, rows: Iterable[Mapping[str, str]],
                   attributes: Iterable[str] = ()) -> Path:
    """Write ``manifest.csv`` with columns ``image,label,split,id,<attributes>``.

    ``rows`` map column names to strings; paths should already be relative to the
    manifest's folder. Output is deterministic (fixed column order, ``\\n`` line ends).
    Written under a temporary name and renamed when complete
    (``training.checkpoint.atomic_write_text``): an earlier manifest is replaced whole or
    not at all.
    """
    from training.checkpoint import atomic_write_text

    columns = [*RESERVED_COLUMNS, *attributes]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n", extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    return atomic_write_text(path, text.getvalue(), newline="")
