"""Data for training and evaluation: readers, validation, splits, preprocessing, datasets.

Files -> ``load_cases`` (generic manifest, Harvard-FairSeg, HAM10000) -> ``assign_splits``
-> ``validate_cases`` -> ``SegmentationDataset`` with ``train_transform``/``eval_transform``
built from a ``Preprocessing`` (stored in checkpoints; ``prepare``/``restore`` serve
inference). Formats: shared/DATA_FORMATS.md.
"""

from training.data.cases import (
    Case,
    assign_splits,
    attribute_names,
    build_vocabulary,
    detect_format,
    encode_attribute,
    load_cases,
    read_case,
)
from training.data.dataset import SegmentationDataset, seed_worker
from training.data.errors import DataError
from training.data.io import (
    file_stem,
    image_info,
    label_suffix_for,
    read_image,
    read_label,
    write_label,
)
from training.data.manifest import write_manifest
from training.data.synthetic import make_synthetic_dataset
from training.data.transforms import (
    Preprocessing,
    SampleTransform,
    eval_transform,
    train_transform,
)
from training.data.validation import validate_cases

__all__ = [
    "Case",
    "DataError",
    "Preprocessing",
    "SampleTransform",
    "SegmentationDataset",
    "assign_splits",
    "attribute_names",
    "build_vocabulary",
    "detect_format",
    "encode_attribute",
    "eval_transform",
    "file_stem",
    "image_info",
    "label_suffix_for",
    "load_cases",
    "make_synthetic_dataset",
    "read_case",
    "read_image",
    "read_label",
    "seed_worker",
    "train_transform",
    "validate_cases",
    "write_label",
    "write_manifest",
]
