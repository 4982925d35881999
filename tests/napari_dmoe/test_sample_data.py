"""Sample data: generated once into the cache, with ground truth and attributes."""

from __future__ import annotations

import numpy as np
import pytest

from napari_dmoe._reader import META
from napari_dmoe._sample_data import load_sample, sample_dataset


@pytest.mark.parametrize("kind,attribute,value,shape,rgb", [
    ("fundus", "race", "Black", (192, 192), False),
    ("skin", "age_group", "40-59", (120, 160, 3), True),
    ("ct", "t_stage", "T3", (32, 64, 64), False),
])
def test_samples_have_image_ground_truth_and_attributes(kind, attribute, value, shape, rgb):
    (image, kwargs, k1), (truth, truth_kwargs, k2) = load_sample(kind)
    assert (k1, k2) == ("image", "labels")
    assert image.shape == shape
    assert kwargs.get("rgb", False) is rgb
    assert truth.shape == (shape[:2] if rgb else shape)
    assert truth.max() >= 1  # a structure is present
    meta = kwargs["metadata"][META]
    assert meta["attributes"] == {attribute: value} and meta["kind"] == kind
    assert truth_kwargs["name"] == f"{kwargs['name']} ground truth"
    assert truth_kwargs["metadata"][META]["role"] == "ground_truth"
    assert truth_kwargs.get("scale") == kwargs.get("scale")
    assert truth_kwargs.get("translate") == kwargs.get("translate")


def test_ct_sample_keeps_spacing_and_affine():
    (image, kwargs, _), _ = load_sample("ct")
    np.testing.assert_allclose(kwargs["scale"], [2.5, 0.9, 0.9])
    affine = kwargs["metadata"][META]["affine"]
    assert affine[0, 0] < 0 and affine[2, 2] == pytest.approx(2.5)  # flipped, anisotropic
    assert kwargs["metadata"][META]["axes"] == "zyx"


def test_dataset_is_generated_once():
    folder = sample_dataset("fundus")
    stamp = (folder / "manifest.csv").stat().st_mtime_ns
    assert sample_dataset("fundus") == folder
    assert (folder / "manifest.csv").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="kind must be one of"):
        sample_dataset("mri")
