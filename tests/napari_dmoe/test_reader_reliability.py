"""The plugin reader never raises inside ``napari_get_reader``; damaged files give a reader
whose error names the file (issue 12; rows of docs/reliability.md)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from napari_dmoe._reader import napari_get_reader, read_fairseg, read_nifti


def _fairseg(path: Path, image_side=64, mask_side=64) -> Path:
    np.savez(path, slo_fundus=np.zeros((image_side, image_side), np.uint8),
             disc_cup_mask=np.zeros((mask_side, mask_side), np.int8), race=np.array(2))
    return path


def _nifti(path: Path, shape=(32, 32, 16)) -> Path:
    import nibabel as nib

    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.integers(0, 1000, shape).astype(np.int16), np.eye(4)),
             str(path))
    return path


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_get_reader_never_raises_on_a_damaged_npz(tmp_path, damage):
    path = _fairseg(tmp_path / "data_00001.npz")
    raw = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 2],
                      "garbage": b"PK\x03\x04" + b"\x00" * 40}[damage])
    reader = napari_get_reader(str(path))  # must not raise
    if reader is not None:
        with pytest.raises(ValueError, match="data_00001.npz"):
            reader(str(path))


def test_fairseg_npz_with_a_mask_of_another_shape_is_refused(tmp_path):
    path = _fairseg(tmp_path / "data_00002.npz", 64, 10)
    assert napari_get_reader(str(path)) is not None
    with pytest.raises(ValueError, match=r"data_00002.npz: the mask is \(10, 10\)"):
        read_fairseg(path)


def test_truncated_nifti_names_the_file(tmp_path):
    path = _nifti(tmp_path / "ct.nii.gz")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    reader = napari_get_reader(str(path))
    assert reader is not None
    with pytest.raises(ValueError, match="ct.nii.gz.*damaged, truncated"):
        reader(str(path))


def _patch_header(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[offset:offset + len(data)] = data
    path.write_bytes(gzip.compress(bytes(raw)))


def test_nifti_with_nan_spacing_is_refused_not_shown_with_nan_scale(tmp_path):
    path = _nifti(tmp_path / "nan.nii.gz")
    _patch_header(path, 80, struct.pack("<f", float("nan")))  # pixdim[1]
    with pytest.raises(ValueError, match="nan.nii.gz.*voxel spacing"):
        read_nifti(path)


def test_nifti_header_claiming_30000_cubed_is_refused_naming_the_size(tmp_path):
    path = _nifti(tmp_path / "huge.nii.gz")
    _patch_header(path, 40, struct.pack("<8h", 3, 30000, 30000, 30000, 1, 1, 1, 1))
    with pytest.raises(ValueError, match="huge.nii.gz.*30000×30000×30000.*GiB"):
        read_nifti(path)


def test_intact_files_still_read(tmp_path):
    layers = read_nifti(_nifti(tmp_path / "ok.nii.gz"))
    assert layers[0][0].shape == (16, 32, 32)
    layers = read_fairseg(_fairseg(tmp_path / "data_00003.npz"))
    assert [layer[2] for layer in layers] == ["image", "labels"]
