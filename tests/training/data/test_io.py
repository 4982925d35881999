from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.training.data.conftest import AFFINE, write_fairseg_npz
from training.data import (
    DataError,
    image_info,
    label_suffix_for,
    read_image,
    read_label,
    write_label,
)


def test_png_gray_and_rgb_are_channel_first(tmp_path):
    gray = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)
    rgb = np.stack([gray, gray // 2, gray // 3], -1)
    Image.fromarray(gray).save(tmp_path / "g.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    image, meta = read_image(tmp_path / "g.png")
    assert image.shape == (1, 12, 16) and image.dtype == np.float32
    assert image[0, 2, 3] == gray[2, 3]
    assert meta["spatial_shape"] == (12, 16) and meta["affine"] is None
    assert meta["original_channels_last"] is False and meta["suffix"] == ".png"
    image, meta = read_image(tmp_path / "c.png")
    assert image.shape == (3, 12, 16) and meta["original_channels_last"] is True
    np.testing.assert_array_equal(image[1], gray // 2)
    assert image_info(tmp_path / "c.png") == {"channels": 3, "spatial_shape": (12, 16),
                                              "suffix": ".png"}


@pytest.mark.parametrize("shape, spatial_dims, expected", [
    ((12, 16), None, (1, 12, 16)),
    ((12, 16, 3), None, (3, 12, 16)),
    ((3, 12, 16), None, (3, 12, 16)),
    ((10, 12, 16), None, (1, 10, 12, 16)),
    ((3, 12, 16), 3, (1, 3, 12, 16)),
    ((2, 10, 12, 16), None, (2, 10, 12, 16)),
])
def test_npy_channel_layout(tmp_path, shape, spatial_dims, expected):
    array = np.random.default_rng(0).random(shape).astype(np.float32)
    np.save(tmp_path / "a.npy", array)
    image, _ = read_image(tmp_path / "a.npy", spatial_dims=spatial_dims)
    assert image.shape == expected
    info = image_info(tmp_path / "a.npy", spatial_dims=spatial_dims)
    assert (info["channels"], *info["spatial_shape"]) == expected


def test_tif_rgb_and_volume(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    volume = np.random.default_rng(1).random((5, 12, 16)).astype(np.float32)
    tifffile.imwrite(tmp_path / "vol.tif", volume)
    image, meta = read_image(tmp_path / "rgb.tif")
    assert image.shape == (3, 12, 16) and meta["original_channels_last"]
    np.testing.assert_array_equal(image[2], rgb[..., 2])
    image, _ = read_image(tmp_path / "vol.tif")
    assert image.shape == (1, 5, 12, 16)
    assert image_info(tmp_path / "vol.tif")["spatial_shape"] == (5, 12, 16)


@pytest.mark.parametrize("old_keys", [False, True])
def test_fairseg_npz_keys_and_mask_codes(tmp_path, old_keys):
    path = tmp_path / "data_000001.npz"
    write_fairseg_npz(path, race=1, old_keys=old_keys)
    image, meta = read_image(path)
    assert image.shape == (1, 16, 16) and meta["suffix"] == ".npz"
    mask = read_label(path)
    assert mask.dtype == np.int64 and mask.shape == (16, 16)
    assert mask[0, 0] == 0 and mask[5, 5] == 1 and mask[7, 7] == 2  # rim 1, cup 2
    assert set(np.unique(mask)) == {0, 1, 2}
    assert image_info(path)["spatial_shape"] == (16, 16)


def test_npz_without_known_key_lists_keys(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros((4, 4)), b=np.zeros((4, 4)))
    with pytest.raises(DataError, match=r"slo_fundus.*holds a, b"):
        read_image(tmp_path / "x.npz")


def test_ham_mask_0_255_becomes_0_1_and_plain_masks_kept(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 255
    Image.fromarray(mask).save(tmp_path / "m_segmentation.png")
    out = read_label(tmp_path / "m_segmentation.png")
    assert out.dtype == np.int64 and out.max() == 1 and out.sum() == 9
    mask[2:5, 2:5] = 2
    Image.fromarray(mask).save(tmp_path / "k.png")
    assert read_label(tmp_path / "k.png").max() == 2


def test_colour_mask_and_non_integer_mask_raise(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[1, 1] = [255, 0, 0]
    Image.fromarray(rgb).save(tmp_path / "col.png")
    with pytest.raises(DataError, match="colour image"):
        read_label(tmp_path / "col.png")
    np.save(tmp_path / "half.npy", np.array([[0.0, 0.5], [1.0, 1.0]]))
    with pytest.raises(DataError, match=r"half\.npy.*non-integer.*0\.5"):
        read_label(tmp_path / "half.npy")
    np.save(tmp_path / "whole.npy", np.array([[0.0, 2.0], [1.0, 1.0]]))
    np.testing.assert_array_equal(read_label(tmp_path / "whole.npy"), [[0, 2], [1, 1]])


def test_nifti_round_trip_keeps_affine_header_and_values(tmp_path, nifti_pair):
    image_path, label_path, label = nifti_pair
    image, meta = read_image(image_path)
    assert image.shape == (1, 10, 12, 6)
    np.testing.assert_allclose(meta["affine"], AFFINE)
    assert meta["spacing"] == pytest.approx((0.8, 0.8, np.hypot(0.1, 2.5)), abs=1e-5)
    np.testing.assert_array_equal(read_label(label_path), label)
    out = write_label(tmp_path / "pred" / "ct.nii.gz", label.astype(np.int64) * 2, meta)
    back = nib.load(out)
    np.testing.assert_allclose(back.affine, AFFINE)
    assert int(back.header["sform_code"]) == 1 and int(back.header["qform_code"]) == 1
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(read_label(out), label * 2)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".npy", ".nii.gz"])
def test_write_label_round_trip(tmp_path, suffix):
    labels = np.zeros((9, 7), np.int64)
    labels[2:6, 1:4] = 3
    path = write_label(tmp_path / f"p{suffix}", labels)
    np.testing.assert_array_equal(read_label(path), labels)


def test_write_label_refuses_bad_values(tmp_path):
    with pytest.raises(DataError, match="negative"):
        write_label(tmp_path / "a.png", np.array([[0, -1]]))
    with pytest.raises(DataError, match=r"\.tif, \.nii\.gz or \.npy"):
        write_label(tmp_path / "a.png", np.array([[0, 300]]))


@pytest.mark.parametrize("name, suffix", [
    ("a.png", ".png"), ("a.JPG", ".png"), ("a.jpeg", ".png"), ("a.tiff", ".tif"),
    ("a.nii", ".nii.gz"), ("a.nii.gz", ".nii.gz"), ("a.npy", ".npy"), ("data_1.npz", ".png"),
])
def test_label_suffix_for(name, suffix):
    assert label_suffix_for(name) == suffix


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "a.bmp").write_bytes(b"x")
    with pytest.raises(DataError, match="unsupported file type '.bmp'"):
        read_image(tmp_path / "a.bmp")
