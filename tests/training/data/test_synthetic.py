from __future__ import annotations

import csv
import json
from collections import Counter

import nibabel as nib
import numpy as np
import pytest

from training.data import (
    load_cases,
    make_synthetic_dataset,
    read_case,
    read_image,
    validate_cases,
)
from training.data.synthetic import GROUPS, ct_affine, group_counts


def _rows(manifest):
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("kind, n, expected", [
    ("fundus", 400, {"Asian": 36, "Black": 60, "White": 304}),
    ("skin", 400, {"<20": 12, "20-39": 60, "40-59": 152, "60-79": 148, ">=80": 28}),
    ("ct", 60, {"T1": 3, "T2": 19, "T3": 34, "T4": 4}),
    ("ct", 12, {"T1": 3, "T2": 3, "T3": 3, "T4": 3}),
])
def test_group_counts_follow_the_promised_shares(kind, n, expected):
    assert group_counts(kind, n) == expected


def test_too_small_n_is_refused(tmp_path):
    with pytest.raises(ValueError, match="n must be at least 15 for kind 'skin'"):
        make_synthetic_dataset("skin", tmp_path, n=10)
    with pytest.raises(ValueError, match="kind must be one of"):
        make_synthetic_dataset("mri", tmp_path)


def test_fundus_manifest_splits_and_determinism(tmp_path):
    manifest = make_synthetic_dataset("fundus", tmp_path / "a", n=18, seed=3)
    rows = _rows(manifest)
    assert list(rows[0]) == ["image", "label", "split", "id", "race"]
    counts = Counter(r["race"] for r in rows)
    assert counts == group_counts("fundus", 18) == {"Asian": 3, "Black": 3, "White": 12}
    for race in GROUPS["fundus"]:
        assert {r["split"] for r in rows if r["race"] == race} == {"train", "val", "test"}
    again = make_synthetic_dataset("fundus", tmp_path / "b", n=18, seed=3)
    for name in ["manifest.csv", "dataset.json", rows[0]["image"], rows[0]["label"],
                 rows[-1]["image"]]:
        assert (manifest.parent / name).read_bytes() == (again.parent / name).read_bytes()
    other = make_synthetic_dataset("fundus", tmp_path / "c", n=9, seed=4)
    assert (other.parent / rows[0]["image"]).read_bytes() != \
        (manifest.parent / rows[0]["image"]).read_bytes()
    cases = load_cases(manifest)
    summary = validate_cases(cases, "race", num_classes=3, spatial_dims=2,
                             splits=("train", "val", "test"))
    assert summary["in_channels"] == 1 and summary["max_label"] == 2
    image, label, _ = read_case(cases[0])
    assert image.shape == (1, 192, 192)
    assert 0 <= image.min() < 60 < image.mean() < image.max() <= 255
    assert (label == 2).sum() > 50 and (label == 1).sum() > 50


def _mean_fraction(root, rows, group, column):
    cases = {c.id: c for c in load_cases(root / "manifest.csv")}
    return np.mean([read_case(cases[r["id"]])[1].mean() for r in rows if r[column] == group])


def test_contouring_policies_differ_between_groups(tmp_path):
    manifest = make_synthetic_dataset("skin", tmp_path, n=30, seed=0)
    rows = _rows(manifest)
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["attribute"] == "age_group" and info["classes"] == ["background", "lesion"]
    assert info["policies"]["<20"]["lesion"] < 1.0 < info["policies"][">=80"]["lesion"]
    young = _mean_fraction(tmp_path, rows, "<20", "age_group")
    old = _mean_fraction(tmp_path, rows, ">=80", "age_group")
    assert old > 1.5 * young  # >=80 contoured generously, <20 tight
    image, meta = read_image(tmp_path / rows[0]["image"])
    assert image.shape == (3, 120, 160) and meta["suffix"] == ".jpg"


def test_ct_is_nifti_with_anisotropic_affine(tmp_path):
    manifest = make_synthetic_dataset("ct", tmp_path, n=12, seed=1)
    rows = _rows(manifest)
    assert Counter(r["t_stage"] for r in rows) == {"T1": 3, "T2": 3, "T3": 3, "T4": 3}
    image = nib.load(tmp_path / rows[0]["image"])
    label = nib.load(tmp_path / rows[0]["label"])
    assert image.shape == (64, 64, 32) and image.get_data_dtype() == np.int16
    np.testing.assert_allclose(image.affine, ct_affine())
    np.testing.assert_allclose(label.affine, ct_affine())
    assert image.header.get_zooms() == pytest.approx((0.9, 0.9, 2.5))
    data = np.asarray(image.dataobj)
    assert data.min() <= -990 and data.max() >= 300  # air and bone in HU
    cases = load_cases(manifest)
    summary = validate_cases(cases[:4], "t_stage", num_classes=2, spatial_dims=3)
    assert summary["spatial_dims"] == 3 and summary["max_label"] == 1
