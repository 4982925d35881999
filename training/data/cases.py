"""Cases: one image, its mask and its patient attributes, whatever the dataset's format.

``load_cases`` reads a generic manifest, a Harvard-FairSeg folder or a HAM10000 folder
(shared/DATA_FORMATS.md §1-4) into a list of ``Case``; ``assign_splits`` gives every case
a train/val/test split; ``build_vocabulary`` and ``encode_attribute`` turn attribute
strings into router indices; ``read_case`` decodes the files. Validation before training
lives in ``training.data.validation`` (``validate_cases``).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from training.data.errors import DataError
from training.data.io import read_image, read_label

SPLITS = ("train", "val", "test")
FORMATS = ("manifest", "fairseg", "ham10000")
UNKNOWN_INDEX = -1
"""``encode_attribute`` result for an empty (unknown) or unseen attribute value."""


@dataclass(frozen=True)
class Case:
    """One segmentation case.

    Attributes:
        id: case id used in reports and prediction file names.
        image: image file.
        label: mask file, or None when the case has no ground truth.
        attributes: patient attributes as strings; ``""`` means unknown.
        split: ``"train"``, ``"val"``, ``"test"`` or None (not assigned yet).
        source: ``"manifest"``, ``"fairseg"`` or ``"ham10000"``.
        group_key: cases sharing a group key always land in the same split
            (HAM10000: the lesion_id); None = the case is its own group.
        image_key, label_key: npz array names (None = the FairSeg defaults).
    """

    id: str
    image: Path
    label: Path | None
    attributes: dict[str, str] = field(default_factory=dict)
    split: str | None = None
    source: str = "manifest"
    group_key: str | None = None
    image_key: str | None = None
    label_key: str | None = None


def detect_format(path: str | Path) -> str:
    """Guess a dataset's format from a manifest file or folder.

    A ``.csv`` file or a folder holding ``manifest.csv`` -> ``"manifest"``; a folder with
    ``HAM10000_metadata.csv`` -> ``"ham10000"``; a folder with ``*.npz`` files (FairSeg,
    usually with ``train.txt``/``test.txt``) -> ``"fairseg"``.
    """
    path = Path(path)
    if path.is_file():
        if path.name == "HAM10000_metadata.csv":
            return "ham10000"
        if path.suffix.lower() == ".csv":
            return "manifest"
        raise DataError(f"{path}: expected a manifest .csv or a dataset folder.")
    if not path.is_dir():
        raise DataError(f"{path}: no such file or folder; pass a manifest.csv or a dataset "
                        "folder.")
    if (path / "manifest.csv").is_file():
        return "manifest"
    if (path / "HAM10000_metadata.csv").is_file():
        return "ham10000"
    has_lists = (path / "train.txt").is_file() or (path / "test.txt").is_file()
    if has_lists or next(path.glob("*.npz"), None) is not None:
        return "fairseg"
    raise DataError(f"{path}: cannot tell the dataset format (no manifest.csv, "
                    "HAM10000_metadata.csv, or *.npz with train.txt/test.txt); write a "
                    "manifest.csv (shared/DATA_FORMATS.md §1) or pass --format.")


def load_cases(path: str | Path, format: str | None = None) -> list[Case]:
    """Read a dataset into cases.

    Args:
        path: a manifest ``.csv`` or a dataset folder.
        format: ``"manifest"``, ``"fairseg"``, ``"ham10000"`` or None (detect).

    Returns:
        The cases in file order. Splits come from the data where it has them (manifest
        ``split`` column, FairSeg lists); the rest are None until ``assign_splits``.
    """
    fmt = format or detect_format(path)
    if fmt == "manifest":
        from training.data.manifest import read_manifest

        return read_manifest(path)
    if fmt == "fairseg":
        from training.data.fairseg import read_fairseg

        return read_fairseg(path)
    if fmt == "ham10000":
        from training.data.ham10000 import read_ham10000

        return read_ham10000(path)
    raise ValueError(f"format must be one of {FORMATS} or None, got {format!r}")


def _seeded_split(cases: list[Case], fractions: dict[str, float], seed: int
                  ) -> dict[str, str]:
    """Map case id -> split, keeping groups together; the rest of the groups go to train."""
    counts: dict[str, int] = defaultdict(int)
    unit_of = {}
    for case in cases:
        unit = case.group_key if case.group_key else f"\0{case.id}"
        unit_of[case.id] = unit
        counts[unit] += 1
    units = sorted(counts)
    order = np.random.default_rng(seed).permutation(len(units))
    units = [units[i] for i in order]
    split_of_unit = dict.fromkeys(units, "train")
    position = 0
    for split, fraction in fractions.items():
        target = int(round(fraction * len(cases)))
        if fraction > 0 and len(units) >= 3:
            target = max(1, target)
        taken = 0
        while taken < target and position < len(units) - 1:  # train keeps >= 1 group
            split_of_unit[units[position]] = split
            taken += counts[units[position]]
            position += 1
    return {case_id: split_of_unit[unit] for case_id, unit in unit_of.items()}


def assign_splits(cases: list[Case], val_fraction: float = 0.1, test_fraction: float = 0.1,
                  seed: int = 0) -> list[Case]:
    """Give every case a split, keeping the splits the data already has.

    Cases without a split are divided test / val / train by case count, seeded, keeping
    cases with the same ``group_key`` together (HAM10000: one lesion, one split; defaults
    give the reference 80/10/10). When the data brings train and test but no val
    (FairSeg, a manifest with train/test only) and ``val_fraction > 0``, a val split of
    ``val_fraction`` of the training cases is carved out of train, by group, seeded.

    Returns:
        New ``Case`` objects in the input order.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got "
                         f"{val_fraction} + {test_fraction}")
    for case in cases:
        if case.split is not None and case.split not in SPLITS:
            raise DataError(f"case {case.id}: split {case.split!r} is not one of {SPLITS}.")
    out = list(cases)
    todo = [c for c in out if c.split is None]
    if todo:
        new = _seeded_split(todo, {"test": test_fraction, "val": val_fraction}, seed)
        out = [replace(c, split=new[c.id]) if c.split is None else c for c in out]
    if val_fraction > 0 and not any(c.split == "val" for c in out):
        train = [c for c in out if c.split == "train"]
        new = _seeded_split(train, {"val": val_fraction}, seed)
        out = [replace(c, split=new[c.id]) if c.split == "train" else c for c in out]
    return out


def attribute_names(cases: list[Case]) -> list[str]:
    """Sorted attribute columns present in any case."""
    return sorted({name for case in cases for name in case.attributes})


COMBINATION_SEPARATOR = "|"


def combine_attributes(cases: list[Case], attribute: str | None) -> list[Case]:
    """Intersectional routing: for ``attribute="race,gender"`` give every case the derived
    attribute ``"race,gender"`` = ``"Black|female"`` (its values joined by ``|``), so that
    one router serves each observed combination. A case missing any part gets ``""``
    (unknown); combinations unseen in training fall to the unknown router like any unseen
    value (with ``build_vocabulary(..., routing="sum")`` an unseen combination of seen
    values gets its own index instead). Cases are returned unchanged for a single attribute
    name.

    Raises:
        DataError: a part names no column (the available ones are listed).
    """
    if not attribute or "," not in attribute:
        return cases
    parts = [p.strip() for p in attribute.split(",")]
    names = attribute_names(cases)
    missing = [p for p in parts if p not in names]
    if missing or len(set(parts)) != len(parts) or "" in parts:
        raise DataError(f"--attribute {attribute!r}: give distinct existing columns separated "
                        f"by commas (missing {missing}); available: {', '.join(names)}.")
    out = []
    for c in cases:
        values = [c.attributes.get(p, "") for p in parts]
        known = all(v and v != "unknown" for v in values)
        combined = COMBINATION_SEPARATOR.join(values) if known else ""
        out.append(replace(c, attributes={**c.attributes, attribute: combined}))
    return out


def split_combination(attribute: str, value: str) -> dict[str, str]:
    """``("race,gender", "Black|female")`` → ``{"race": "Black", "gender": "female"}``;
    ``{}`` for an unknown (empty, "unknown" or malformed) value."""
    parts = [p.strip() for p in attribute.split(",")]
    values = str(value).split(COMBINATION_SEPARATOR)
    if len(values) != len(parts) or not all(values):
        return {}
    return dict(zip(parts, values, strict=True))


ROUTINGS = ("combination", "sum")
"""Intersectional routing (``--attribute-routing``): ``combination`` = one router per
combination observed in training; ``sum`` = one router per value of each part, summed."""


def build_vocabulary(cases: list[Case], attribute: str, routing: str = "combination"
                     ) -> list[str]:
    """The router order stored in checkpoints (shared/DATA_FORMATS.md §1).

    ``routing="combination"`` (and any single attribute): the sorted non-empty values of
    ``attribute`` in the training split. ``routing="sum"`` with ``attribute="race,gender"``:
    every combination of the parts' training values, in **mixed-radix order** — each part's
    values sorted, the first part most significant (``Asian|female, Asian|male,
    Black|female, …``); a combination absent from training still gets its index (routed by
    the sum of its parts' routers). This is ``itertools.product`` order, which is not
    always the sorted order of the joined strings. Part values are taken from training
    cases whose combination is fully known.

    Raises:
        DataError: no training case, no such column, or no known value.
        ValueError: ``routing`` not in :data:`ROUTINGS`.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    train = [c for c in cases if c.split == "train"]
    if not train:
        raise DataError("no training cases: give some cases split 'train' (manifest column "
                        "`split`, or call assign_splits) before building the vocabulary.")
    names = attribute_names(cases)
    if attribute not in names:
        raise DataError(f"attribute column {attribute!r} does not exist; available: "
                        f"{', '.join(names) or '(none)'}.")
    values = sorted({c.attributes.get(attribute, "") for c in train} - {""})
    if not values:
        raise DataError(f"attribute {attribute!r} is empty for every training case; fill "
                        "in values or pick another attribute.")
    if routing == "combination" or "," not in attribute:
        return values
    parts = [p.strip() for p in attribute.split(",")]
    known = [split_combination(attribute, v) for v in values]
    per_part = [sorted({k[p] for k in known if k}) for p in parts]
    return [COMBINATION_SEPARATOR.join(combo) for combo in itertools.product(*per_part)]


def vocabulary_parts(vocabulary: list[str]) -> tuple[int, ...]:
    """Part sizes of a summed-routing vocabulary (:func:`build_vocabulary` with
    ``routing="sum"``): ``["A|f", "A|m", "B|f", "B|m", "W|f", "W|m"]`` → ``(3, 2)``.

    Raises:
        ValueError: the vocabulary is not the full product of its parts' values in
            mixed-radix order (e.g. a ``combination`` vocabulary with a combination missing).
    """
    split = [str(v).split(COMBINATION_SEPARATOR) for v in vocabulary]
    if not split or len({len(s) for s in split}) != 1:
        raise ValueError(f"not a summed-routing vocabulary (values with different numbers of "
                         f"'{COMBINATION_SEPARATOR}'-separated parts): {vocabulary!r}")
    per_part = [list(dict.fromkeys(s[p] for s in split)) for p in range(len(split[0]))]
    product = [list(c) for c in itertools.product(*per_part)]
    if product != split:
        raise ValueError(f"not a summed-routing vocabulary (not every combination of the "
                         f"parts' values, in mixed-radix order): {vocabulary!r}; rebuild it "
                         "with build_vocabulary(..., routing='sum')")
    return tuple(len(v) for v in per_part)


def encode_attribute(value: str | None, vocabulary: list[str]) -> int:
    """Index of ``value`` in ``vocabulary``; -1 (unknown) for ``""``, None or unseen values."""
    if not value:
        return UNKNOWN_INDEX
    try:
        return vocabulary.index(value)
    except ValueError:
        return UNKNOWN_INDEX


def read_case(case: Case, *, spatial_dims: int | None = None
              ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Decode a case: image float32 ``(C, *S)``, label int64 ``(*S)`` or None, image meta.

    Hides the formats: FairSeg npz keys and -1/-2 codes, HAM10000 0/255 masks, NIfTI
    affines (in ``meta``, see ``read_image``).
    """
    image, meta = read_image(case.image, case.image_key, spatial_dims=spatial_dims)
    label = read_label(case.label, case.label_key) if case.label is not None else None
    if label is not None and label.shape != image.shape[1:]:
        raise DataError(f"case {case.id}: image spatial shape {image.shape[1:]} differs from "
                        f"mask shape {label.shape}; resample the mask onto the image grid.")
    meta["id"] = case.id
    return image, label, meta
