"""Data for training and evaluation: readers, validation, splits, preprocessing, datasets.

Files -> ``load_cases`` (generic manifest, Harvard-FairSeg, HAM10000) -> ``assign_splits``
-> ``validate_cases`` -> ``SegmentationDataset`` with ``train_transform``/``eval_transform``
built from a ``Preprocessing`` (stored in checkpoints; ``prepare``/``restore`` serve
inference). Formats: shared/DATA_FORMATS.md.
"""


from __future__ import annotations

import importlib
from typing import Any

# Exports load on first use (PEP 562), so that importing one light submodule such as
# ``training.data.io`` (the plugin's readers) does not pull in torch and MONAI.
_EXPORTS = {
    "Case": "cases",
    "assign_splits": "cases",
    "attribute_names": "cases",
    "build_vocabulary": "cases",
    "combine_attributes": "cases",
    "split_combination": "cases",
    "COMBINATION_SEPARATOR": "cases",
    "detect_format": "cases",
    "encode_attribute": "cases",
    "load_cases": "cases",
    "read_case": "cases",
    "SegmentationDataset": "dataset",
    "seed_worker": "dataset",
    "DataError": "errors",
    "DicomError": "errors",
    "DicomVolume": "dicom",
    "find_series": "dicom",
    "read_series": "dicom",
    "write_dicom_seg": "dicom",
    "write_rtstruct": "dicom",
    "file_stem": "io",
    "image_info": "io",
    "label_suffix_for": "io",
    "read_image": "io",
    "read_label": "io",
    "write_label": "io",
    "write_manifest": "manifest",
    "make_synthetic_dataset": "synthetic",
    "Preprocessing": "transforms",
    "SampleTransform": "transforms",
    "eval_transform": "transforms",
    "train_transform": "transforms",
    "validate_cases": "validation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
