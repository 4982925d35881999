from __future__ import annotations

import numpy as np
import pytest

from tests.training.data.conftest import write_fairseg_npz, write_png_manifest
from training.data import (
    DataError,
    assign_splits,
    detect_format,
    load_cases,
    read_case,
)


def test_manifest_reader(tmp_path):
    manifest = write_png_manifest(tmp_path, n=4)
    cases = load_cases(manifest)
    assert detect_format(tmp_path) == "manifest" and load_cases(tmp_path) == cases
    assert [c.id for c in cases] == ["c0", "c1", "c2", "c3"]
    assert [c.split for c in cases] == ["train", "train", "val", "test"]
    assert cases[1].attributes == {"race": "B"} and cases[0].source == "manifest"
    assert cases[0].image == tmp_path / "img" / "c0.png"
    image, label, meta = read_case(cases[0])
    assert image.shape == (1, 20, 24) and label.shape == (20, 24) and meta["id"] == "c0"
    assert set(np.unique(label)) == {0, 1, 2}


def test_manifest_optional_columns_and_row_errors(tmp_path):
    (tmp_path / "manifest.csv").write_text("image,age_group\na.png,\nsub/b.png,<20\n")
    cases = load_cases(tmp_path / "manifest.csv")
    assert [c.id for c in cases] == ["a", "b"]
    assert cases[0].label is None and cases[0].split is None
    assert cases[0].attributes == {"age_group": ""}
    (tmp_path / "manifest.csv").write_text("image,split,id\na.png,train,x\nb.png,dev,y\n"
                                           "c.png,test,x\n")
    with pytest.raises(DataError, match=r"line 3: split 'dev'.*\n.*line 4: id 'x'"):
        load_cases(tmp_path)
    (tmp_path / "manifest.csv").write_text("path,label\na.png,b.png\n")
    with pytest.raises(DataError, match=r"no `image` column \(columns: path, label\)"):
        load_cases(tmp_path)


def test_fairseg_reader(fairseg_dir):
    assert detect_format(fairseg_dir) == "fairseg"
    cases = load_cases(fairseg_dir)
    assert [c.id for c in cases] == [f"data_{i:06d}" for i in range(6)]
    assert [c.split for c in cases] == ["train"] * 4 + ["test"] * 2
    first = cases[0]
    assert first.source == "fairseg" and first.image == first.label
    assert first.attributes["race"] == "Asian" and cases[1].attributes["race"] == "Black"
    assert cases[2].attributes["race"] == "White"
    assert first.attributes["gender"] == "Male" and first.attributes["language"] == "English"
    assert cases[1].attributes["ethnicity"] == ""
    assert cases[2].attributes["ethnicity"] == "Non-Hispanic"
    assert cases[3].attributes["ethnicity"] == "Hispanic"
    assert first.attributes["maritalstatus"] == "" and first.attributes["age"] == "61.5"
    image, label, _ = read_case(first)
    assert image.shape == (1, 16, 16) and label.max() == 2


def test_fairseg_old_keys_and_missing_listed_file(tmp_path):
    write_fairseg_npz(tmp_path / "data_000001.npz", race=2, old_keys=True)
    (tmp_path / "train.txt").write_text("data_000001.npz\n")
    (tmp_path / "test.txt").write_text("data_000002.npz\n")
    with pytest.raises(DataError, match=r"1 file\(s\) named in train.txt/test.txt are "
                                        r"missing.*\n.*data_000002.npz"):
        load_cases(tmp_path, format="fairseg")
    (tmp_path / "test.txt").unlink()
    (case,) = load_cases(tmp_path)
    _, label, _ = read_case(case)
    assert case.attributes["race"] == "White" and set(np.unique(label)) == {0, 1, 2}


def test_fairseg_val_is_carved_out_of_train(fairseg_dir):
    cases = assign_splits(load_cases(fairseg_dir), val_fraction=0.25, seed=3)
    splits = [c.split for c in cases]
    assert splits[4:] == ["test", "test"]
    assert splits[:4].count("val") == 1 and splits[:4].count("train") == 3
    assert assign_splits(load_cases(fairseg_dir), val_fraction=0.25, seed=3) == cases


def test_ham10000_reader(ham_dir):
    assert detect_format(ham_dir) == "ham10000"
    cases = load_cases(ham_dir)
    ids = [c.id for c in cases]
    assert ids == ["ISIC_0000001", "ISIC_0000002", "ISIC_0000004", "ISIC_0000005"]
    by_id = {c.id: c for c in cases}
    assert by_id["ISIC_0000004"].attributes["age_group"] == ">=80"
    assert by_id["ISIC_0000005"].attributes["age_group"] == "<20"
    assert by_id["ISIC_0000001"].attributes["age_group"] == "40-59"
    assert by_id["ISIC_0000001"].attributes["sex"] == "male"
    assert by_id["ISIC_0000001"].attributes["dx"] == "nv"
    assert by_id["ISIC_0000001"].group_key == "HAM_0000001"
    assert all(c.split is None and c.source == "ham10000" for c in cases)
    image, label, _ = read_case(cases[0])
    assert image.shape == (3, 12, 16) and label.dtype == np.int64
    assert set(np.unique(label)) == {0, 1} and label.sum() == 48


@pytest.mark.parametrize("seed", range(6))
def test_ham10000_lesion_images_share_a_split(ham_dir, seed):
    cases = assign_splits(load_cases(ham_dir), val_fraction=0.25, test_fraction=0.25,
                          seed=seed)
    by_id = {c.id: c.split for c in cases}
    assert by_id["ISIC_0000001"] == by_id["ISIC_0000002"]
    assert set(by_id.values()) == {"train", "val", "test"}


def test_detect_format_failure(tmp_path):
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        detect_format(tmp_path)
    with pytest.raises(DataError, match="no such file or folder"):
        load_cases(tmp_path / "missing")
    with pytest.raises(ValueError, match="format must be one of"):
        load_cases(tmp_path, format="nifti")
