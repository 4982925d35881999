"""Sample data: one synthetic fundus, skin-lesion and pelvic-CT case with ground truth.

The cases come from ``training.data.make_synthetic_dataset`` (the same generator as the
demo models' training data, with another seed, so the samples are unseen images). A small
dataset per kind is generated once into the user cache folder
(``platformdirs.user_cache_dir("napari-dmoe")/samples``; override with the environment
variable ``NAPARI_DMOE_CACHE_DIR``) and reused on later launches.

Each sample gives an Image layer (attributes in ``metadata["napari_dmoe"]["attributes"]``,
e.g. ``{"race": "Black"}``, and ``"kind"``) and a Labels layer "<case> ground truth".
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ._reader import META, LayerData, ground_truth_layer, read_nifti

SAMPLE_SEED = 7
SAMPLE_N = {"fundus": 9, "skin": 15, "ct": 12}
SAMPLE_GROUP = {"fundus": "Black", "skin": "40-59", "ct": "T3"}
_VERSION = "v1"


def cache_dir() -> Path:
    """Folder for generated sample datasets (``NAPARI_DMOE_CACHE_DIR`` overrides)."""
    override = os.environ.get("NAPARI_DMOE_CACHE_DIR")
    if override:
        return Path(override)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-dmoe"))


def sample_dataset(kind: str) -> Path:
    """The cached synthetic dataset folder of ``kind``, generating it on first use."""
    if kind not in SAMPLE_N:
        raise ValueError(f"kind must be one of {sorted(SAMPLE_N)}, got {kind!r}")
    folder = cache_dir() / "samples" / f"{kind}-n{SAMPLE_N[kind]}-s{SAMPLE_SEED}-{_VERSION}"
    if (folder / "manifest.csv").is_file():
        return folder
    from ._compat import prepare_torch

    prepare_torch()
    from training.data import make_synthetic_dataset

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=folder.parent))
    try:
        make_synthetic_dataset(kind, tmp, n=SAMPLE_N[kind], seed=SAMPLE_SEED)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: use its copy
            if not (folder / "manifest.csv").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _pick_case(folder: Path, kind: str) -> dict[str, str]:
    with open(folder / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    info = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    attribute = info["attribute"]
    wanted = SAMPLE_GROUP[kind]
    for split in ("test", "val", "train"):
        for row in rows:
            if row[attribute] == wanted and row["split"] == split:
                return row
    return rows[0]


def load_sample(kind: str) -> list[LayerData]:
    """Image and ground-truth layers of the ``kind`` sample (``fundus``, ``skin``, ``ct``)."""
    folder = sample_dataset(kind)
    row = _pick_case(folder, kind)
    info = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    attribute, classes = info["attribute"], list(info["classes"])
    name = row["id"]
    extra = {"attributes": {attribute: row[attribute] or "unknown"}, "kind": kind,
             "case_id": row["id"]}
    if kind == "ct":
        (image, kwargs, _), = read_nifti(folder / row["image"])
        (labels, gt_kwargs, _), = read_nifti(folder / row["label"])
        kwargs["name"] = name
        kwargs["metadata"][META].update(extra)
        kwargs.update(contrast_limits=(-250.0, 350.0), colormap="gray")
        geometry = {k: gt_kwargs[k] for k in ("scale", "translate", "units", "affine")}
        gt = ground_truth_layer(labels.astype(np.uint8), name, classes,
                                {**gt_kwargs["metadata"][META], **extra}, **geometry)
        return [(image, kwargs, "image"), gt]
    image = _read_pil(folder / row["image"])
    labels = _read_pil(folder / row["label"]).astype(np.uint8)
    meta: dict[str, Any] = {"source": str(folder / row["image"]), **extra}
    kwargs = {"name": name, "rgb": image.ndim == 3, "metadata": {META: meta}}
    return [(image, kwargs, "image"), ground_truth_layer(labels, name, classes, dict(meta))]


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def fundus_sample() -> list[LayerData]:
    """Synthetic SLO fundus (grayscale), rim/cup ground truth, attribute ``race``."""
    return load_sample("fundus")


def skin_sample() -> list[LayerData]:
    """Synthetic dermoscopy image (RGB), lesion ground truth, attribute ``age_group``."""
    return load_sample("skin")


def ct_sample() -> list[LayerData]:
    """Synthetic pelvic CT (NIfTI, anisotropic), tumour ground truth, attribute ``t_stage``."""
    return load_sample("ct")
