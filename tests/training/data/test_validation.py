from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from tests.training.data.conftest import write_png_manifest
from training.data import DataError, load_cases, validate_cases


@pytest.fixture
def cases(tmp_path):
    return load_cases(write_png_manifest(tmp_path, n=6))


def test_valid_dataset_returns_summary(cases):
    summary = validate_cases(cases, "race", num_classes=3, spatial_dims=2,
                             splits=("train", "val", "test"))
    assert summary == {"n_cases": 6, "splits": {"train": 3, "val": 2, "test": 1},
                       "in_channels": 1, "spatial_dims": 2, "max_label": 2}


def test_missing_files_are_listed(cases, tmp_path):
    for i in (1, 3):
        (tmp_path / "img" / f"c{i}.png").unlink()
    (tmp_path / "lab" / "c4.png").unlink()
    with pytest.raises(DataError, match=r"3 file\(s\) are missing.*\n.*case c1: image .*c1\.png"
                                        r"\n.*case c3: image.*\n.*case c4: label"):
        validate_cases(cases, "race")


def test_unknown_attribute_lists_available(cases):
    with pytest.raises(DataError, match=r"attribute column 'age_group' does not exist; "
                                        r"available columns: race"):
        validate_cases(cases, "age_group")


@pytest.mark.parametrize("split", ["val", "test"])
def test_empty_split(cases, split):
    kept = [c for c in cases if c.split != split]
    with pytest.raises(DataError, match=f"split '{split}' is empty"):
        validate_cases(kept, "race", splits=("train", "val", "test"))
    validate_cases(kept, "race", splits=("train",))


def test_shape_mismatch(cases, tmp_path):
    Image.fromarray(np.zeros((10, 24), np.uint8)).save(tmp_path / "lab" / "c2.png")
    with pytest.raises(DataError, match=r"different spatial shape.*\n.*case c2: image "
                                        r"\(20, 24\) vs mask \(10, 24\)"):
        validate_cases(cases, "race")


def test_non_integer_mask(cases, tmp_path):
    mask = np.zeros((20, 24))
    mask[3, 3] = 0.5
    np.save(tmp_path / "lab" / "half.npy", mask)
    bad = [replace(cases[0], label=tmp_path / "lab" / "half.npy"), *cases[1:]]
    with pytest.raises(DataError, match=r"case c0: .*half\.npy: mask holds non-integer "
                                        r"values \(e\.g\. 0\.5\)"):
        validate_cases(bad, "race")


def test_out_of_range_and_negative_values(cases, tmp_path):
    with pytest.raises(DataError, match=r"outside 0\.\.1.*\n.*case c0: mask values 0\.\.2"):
        validate_cases(cases, "race", num_classes=2)
    np.save(tmp_path / "lab" / "neg.npy", -np.ones((20, 24), np.int64))
    bad = [replace(cases[0], label=tmp_path / "lab" / "neg.npy")]
    with pytest.raises(DataError, match=r"case c0: mask values -1\.\.-1"):
        validate_cases(bad, "race")


def test_fairseg_codes_are_in_range_after_remapping(fairseg_dir):
    cases = load_cases(fairseg_dir)
    summary = validate_cases(cases, "race", num_classes=3, spatial_dims=2,
                             splits=("train", "test"))
    assert summary["max_label"] == 2 and summary["in_channels"] == 1


def test_unlabelled_dims_and_mixed_channels(cases, tmp_path):
    with pytest.raises(DataError, match=r"1 case\(s\) have no label.*\n.*c0"):
        validate_cases([replace(cases[0], label=None), *cases[1:]], "race")
    validate_cases([replace(cases[0], label=None)], "race", require_labels=False)
    with pytest.raises(DataError, match="are not 3D"):
        validate_cases(cases, "race", spatial_dims=3)
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(tmp_path / "img" / "c5.png")
    with pytest.raises(DataError, match=r"different channel counts.*\n.*1 channel.*\n.*3 "
                                        r"channel\(s\): e\.g\. case c5"):
        validate_cases(cases, "race")


def test_duplicate_ids(cases):
    with pytest.raises(DataError, match=r"used more than once.*\n.*c0 \(2 times\)"):
        validate_cases([*cases, cases[0]], None, check_files=False)
