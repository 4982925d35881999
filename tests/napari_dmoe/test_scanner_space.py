"""The widget's path for a CT stored in another voxel order: the plugin reader, the
voxel affine handed to the model, and the NIfTI writer give the same scanner-space contour
as the file in its original order (issue 8: 'Dice 0.000 in scanner space')."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

import napari_dmoe
from napari_dmoe import _tasks
from napari_dmoe._reader import read_nifti
from napari_dmoe._writer import write_labels_nifti

CT_MODEL = Path(napari_dmoe.__file__).parent / "models" / "ct_tstage_dmoe.safetensors"


@pytest.fixture(scope="module")
def ct_case(tmp_path_factory):
    from training.data import load_cases, make_synthetic_dataset

    manifest = make_synthetic_dataset("ct", tmp_path_factory.mktemp("ct"), n=12, seed=3)
    case = next(c for c in load_cases(manifest) if c.attributes["t_stage"] == "T3")
    return Path(case.image), case.attributes["t_stage"]


@pytest.fixture(scope="module")
def segmenter():
    from training.inference import Segmenter

    return Segmenter.from_checkpoint(CT_MODEL, device="cpu")


def _segment_like_the_widget(segmenter, path: Path, value: str, out: Path) -> nib.Nifti1Image:
    (data, kwargs, _), = read_nifti(path)
    layer = SimpleNamespace(data=data, rgb=False, metadata=kwargs["metadata"])
    affine = _tasks.voxel_affine(layer)
    assert affine is not None
    array, channel_axis = _tasks.model_input(data, rgb=False)
    result = _tasks.segment_one(segmenter, array, value,
                                _tasks.RunOptions(channel_axis=channel_axis, affine=affine))
    labels = _tasks.layer_labels(result.labels)
    assert labels.shape == np.shape(data)
    written, = write_labels_nifti(str(out), labels, {"metadata": kwargs["metadata"]})
    return nib.load(written)


def test_widget_path_gives_the_same_scanner_space_mask_for_a_permuted_ct(ct_case, segmenter,
                                                                         tmp_path):
    image, value = ct_case
    source = nib.load(str(image))
    stored = source.as_reoriented(ornt_transform(io_orientation(source.affine),
                                                 axcodes2ornt(("S", "R", "A"))))
    permuted = tmp_path / "ct_SRA.nii.gz"
    nib.save(stored, str(permuted))

    original = _segment_like_the_widget(segmenter, image, value, tmp_path / "a.nii.gz")
    mask = _segment_like_the_widget(segmenter, permuted, value, tmp_path / "b.nii.gz")
    assert mask.shape == stored.shape
    np.testing.assert_allclose(mask.affine, stored.affine, atol=1e-5)
    back = mask.as_reoriented(ornt_transform(io_orientation(mask.affine),
                                             io_orientation(source.affine)))
    expected = np.asarray(original.dataobj)
    assert expected.sum() > 50  # the tumour was found
    np.testing.assert_array_equal(np.asarray(back.dataobj), expected)


def test_voxel_affine_from_layer_placement_and_none_for_plain_arrays():
    from napari.layers import Image

    plain = Image(np.zeros((4, 5, 6), np.float32))
    assert _tasks.voxel_affine(plain) is None
    placed = Image(np.zeros((4, 5, 6), np.float32), scale=(2.5, 0.8, 0.9),
                   translate=(-10.0, 20.0, 30.0))
    affine = _tasks.voxel_affine(placed)
    # model input (x, y, z) -> RAS: x along R at 0.9 mm, y along A at 0.8, z along S at 2.5
    np.testing.assert_allclose(affine, [[0.9, 0, 0, 30.0], [0, 0.8, 0, 20.0],
                                        [0, 0, 2.5, -10.0], [0, 0, 0, 1]])
    rgb = Image(np.zeros((5, 6, 3), np.uint8), rgb=True)
    assert _tasks.voxel_affine(rgb) is None
