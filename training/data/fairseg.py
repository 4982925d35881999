"""Harvard-FairSeg: one ``.npz`` per patient, split lists ``train.txt`` / ``test.txt``.

Keys (shared/DATA_FORMATS.md §2, FairSeg README): image ``slo_fundus`` (old copies:
``fundus_slo``), mask ``disc_cup_mask`` (old: ``disc_cup``) with 0 = background,
-1 = rim, -2 = cup (``read_label`` remaps to 0/1/2), and integer attributes mapped to
names here. Code -1 means unknown and becomes ``""``; a code missing from the tables
below is kept as its number (e.g. ``"7"``) so nothing is silently merged.

The lists name one file per line (``data_000113.npz``, with or without ``.npz``); files
are looked up in the folder and its sub-folders, and npz files not listed are ignored.
Without lists every npz in the folder is a case with no split (``assign_splits``
decides). FairSeg has no val split: ``assign_splits`` carves one out of train.
The reference code's older copies used other race codes (2/3/7); those stay as numbers.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

from training.data.cases import Case
from training.data.errors import DataError, first_lines

ATTRIBUTE_CODES: dict[str, dict[int, str]] = {
    "race": {0: "Asian", 1: "Black", 2: "White"},
    "gender": {0: "Female", 1: "Male"},
    "ethnicity": {0: "Non-Hispanic", 1: "Hispanic", -1: ""},
    "language": {0: "English", 1: "Spanish", 2: "Others", -1: ""},
    "maritalstatus": {0: "Married or Partnered", 1: "Single", 2: "Divorced", 3: "Widowed",
                      4: "Legally Separated", -1: ""},
}
RAW_ATTRIBUTES = ("age",)
"""Attributes kept as their stored number, as a string."""


def _scalar_text(value: np.ndarray) -> str:
    item = np.asarray(value).reshape(-1)
    if item.size != 1:
        return ""
    x = item[0].item()
    if isinstance(x, bytes):
        x = x.decode()
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return str(x)


def _member(npz: np.lib.npyio.NpzFile, name: str) -> np.ndarray:
    """One npz member; pickled (object) members are never unpickled and read as unknown."""
    try:
        return npz[name]
    except ValueError:
        return np.array("")


def fairseg_attributes(npz: np.lib.npyio.NpzFile) -> dict[str, str]:
    """Attribute names -> values of one FairSeg npz (codes mapped per ``ATTRIBUTE_CODES``)."""
    out: dict[str, str] = {}
    for name, table in ATTRIBUTE_CODES.items():
        if name not in npz.files:
            continue
        text = _scalar_text(_member(npz, name))
        try:
            out[name] = table.get(int(float(text)), text)
        except ValueError:
            out[name] = text
    for name in RAW_ATTRIBUTES:
        if name in npz.files:
            out[name] = _scalar_text(_member(npz, name))
    return out


def _read_list(path: Path) -> list[str]:
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name = line.strip()
        if name:
            names.append(name if name.endswith(".npz") else f"{name}.npz")
    return names


def read_fairseg(folder: str | Path) -> list[Case]:
    """Read a FairSeg folder into cases (train list first, then test, in list order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder; pass the FairSeg folder holding the npz "
                        "files and train.txt/test.txt.")
    index: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.npz")):
        index.setdefault(path.name, path)
        index.setdefault(path.relative_to(folder).as_posix(), path)
    wanted: list[tuple[str, str | None]] = []
    for split in ("train", "test"):
        list_file = folder / f"{split}.txt"
        if list_file.is_file():
            wanted += [(name, split) for name in _read_list(list_file)]
    if not wanted:
        wanted = [(p.name, None) for p in sorted(folder.glob("*.npz"))]
    if not wanted:
        raise DataError(f"{folder}: no .npz files and no train.txt/test.txt; is this the "
                        "FairSeg folder?")
    missing = [name for name, _ in wanted if name not in index]
    if missing:
        raise DataError(f"{folder}: {len(missing)} file(s) named in train.txt/test.txt are "
                        f"missing; download them or remove them from the lists:\n"
                        f"{first_lines(missing)}")
    cases, seen = [], set()
    for name, split in wanted:
        path = index[name]
        if path in seen:
            raise DataError(f"{folder}: {name} is listed twice (train.txt and test.txt must "
                            "not overlap).")
        seen.add(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                attributes = fairseg_attributes(npz)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise DataError(f"{path}: cannot read the npz ({err or type(err).__name__}); it is "
                            "empty, truncated or damaged. Re-download it.") from None
        cases.append(Case(id=path.name[: -len(".npz")], image=path, label=path,
                          attributes=attributes, split=split, source="fairseg"))
    return cases
