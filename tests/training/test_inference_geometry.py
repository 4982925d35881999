"""Scanner geometry through inference: the bundled CT model gives the same contour in
scanner space whatever the file's voxel order; other spacings agree; old checkpoints
warn; RGB/gray photographs are converted for the model they meet."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

import napari_dmoe
from training.checkpoint import load_checkpoint, save_checkpoint
from training.inference import Segmenter
from training.predict import predict

MODELS = Path(napari_dmoe.__file__).parent / "models"
CT_MODEL = MODELS / "ct_tstage_dmoe.safetensors"
ORIENTATIONS = ["RAS", "SRA", "ILP", "PIR"]  # the synthetic CT is stored LPS


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


@pytest.fixture(scope="module")
def ct_case(tmp_path_factory) -> tuple[Path, str]:
    """One synthetic CT (stored LPS, 0.9x0.9x2.5 mm) and its T-stage."""
    from training.data import load_cases, make_synthetic_dataset

    manifest = make_synthetic_dataset("ct", tmp_path_factory.mktemp("ct"), n=12, seed=3)
    case = next(c for c in load_cases(manifest) if c.attributes["t_stage"] == "T3")
    return case.image, case.attributes["t_stage"]


def _predict(tmp: Path, image: Path, value: str, name: str) -> nib.Nifti1Image:
    rows = predict(CT_MODEL, tmp / name, image=image, attribute_value=value, device="cpu")
    return nib.load(str(tmp / name / rows[0]["file"]))


@pytest.fixture(scope="module")
def original_mask(ct_case, tmp_path_factory) -> nib.Nifti1Image:
    image, value = ct_case
    return _predict(tmp_path_factory.mktemp("pred"), image, value, "original")


@pytest.mark.parametrize("codes", [  # one permutation in the default run, the rest slow
    pytest.param(c, marks=() if c == "SRA" else pytest.mark.slow) for c in ORIENTATIONS])
def test_same_scanner_space_mask_whatever_the_storage_order(ct_case, original_mask, tmp_path,
                                                            codes):
    image, value = ct_case
    source = nib.load(str(image))
    stored = source.as_reoriented(ornt_transform(io_orientation(source.affine),
                                                 axcodes2ornt(tuple(codes))))
    assert "".join(nib.aff2axcodes(stored.affine)) == codes
    path = tmp_path / f"ct_{codes}.nii.gz"
    nib.save(stored, str(path))
    mask = _predict(tmp_path, path, value, codes)
    assert mask.shape == stored.shape
    np.testing.assert_allclose(mask.affine, stored.affine, atol=1e-5)  # the input's grid
    # back in the original voxel order (a pure flip/permutation: exact), voxel for voxel
    back = mask.as_reoriented(ornt_transform(io_orientation(mask.affine),
                                             io_orientation(source.affine)))
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-5)
    expected = np.asarray(original_mask.dataobj)
    assert expected.any()
    np.testing.assert_array_equal(np.asarray(back.dataobj), expected)


@pytest.mark.slow
def test_oblique_storage_keeps_the_contour_on_the_anatomy(ct_case, original_mask, tmp_path):
    image, value = ct_case
    source = nib.load(str(image))
    theta = np.radians(10)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    oblique = nib.Nifti1Image(np.asarray(source.dataobj), rotation @ source.affine)
    path = tmp_path / "ct_oblique.nii.gz"
    nib.save(oblique, str(path))
    mask = _predict(tmp_path, path, value, "oblique")
    np.testing.assert_allclose(mask.affine, oblique.affine, atol=1e-5)
    # the scanner rotates with the patient: the contour sits on the same voxels
    np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(original_mask.dataobj))


@pytest.mark.slow
def test_a_copy_at_another_spacing_agrees(ct_case, original_mask, tmp_path):
    from nibabel.processing import resample_from_to, resample_to_output

    image, value = ct_case
    source = nib.load(str(image))
    # a finer copy (0.9x0.9x2.5 -> 0.7x0.7x1.5 mm); a coarser one (1.2x1.2x1.8) loses
    # detail the comparison on the original grid cannot give back (Dice ~0.91 on average)
    copy = resample_to_output(source, voxel_sizes=(0.7, 0.7, 1.5), order=1)
    path = tmp_path / "ct_resampled.nii.gz"
    nib.save(copy, str(path))
    mask = _predict(tmp_path, path, value, "resampled")
    assert mask.shape == copy.shape
    back = resample_from_to(mask, source, order=0)
    dice = _dice(np.asarray(back.dataobj), np.asarray(original_mask.dataobj))
    assert dice >= 0.9, dice


def _without_geometry(tmp_path: Path) -> Path:
    model, meta = load_checkpoint(CT_MODEL)
    meta = {k: v for k, v in meta.items()
            if k not in ("model", "format_version", "spatial_dims", "in_channels")}
    pre = dict(meta["preprocessing"])
    for key in ("orientation", "spacing"):
        pre.pop(key, None)
    meta["preprocessing"] = pre
    return save_checkpoint(model, tmp_path / "old.safetensors", **meta)


def test_old_checkpoint_warns_once_and_runs_as_before(tmp_path, recwarn):
    seg = Segmenter.from_checkpoint(_without_geometry(tmp_path), device="cpu")
    warned = [w for w in recwarn.list if "predates scanner geometry" in str(w.message)]
    assert len(warned) == 1
    volume = np.random.default_rng(0).normal(0, 100, (40, 36, 20)).astype(np.float32)
    flipped = np.diag([-2.0, 1, 1, 1])
    plain = seg.segment(volume, "T2")
    with_affine = seg.segment(volume, "T2", affine=flipped)  # ignored: stored order as before
    np.testing.assert_array_equal(plain.labels, with_affine.labels)
    assert plain.notices == []
    assert len([w for w in recwarn.list if "predates scanner geometry" in str(w.message)]) == 1


def test_geometry_checkpoint_without_affine_says_so():
    seg = Segmenter.from_checkpoint(CT_MODEL, device="cpu")
    assert seg.preprocessing.orientation == "RAS" and seg.preprocessing.spacing is not None
    result = seg.segment(np.zeros((40, 36, 20), np.float32), "T2")
    assert result.labels.shape == (40, 36, 20)
    assert any("no affine" in line for line in result.notices)


def test_rgb_into_the_grayscale_fundus_model_is_converted_with_a_notice():
    seg = Segmenter.from_checkpoint(MODELS / "fundus_race_dmoe.safetensors", device="cpu")
    rgb = np.random.default_rng(0).integers(0, 255, (96, 96, 3)).astype(np.float32)
    result = seg.segment(rgb, "White")
    assert len(result.notices) == 1 and "grayscale" in result.notices[0]
    gray = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_array_equal(result.labels, seg.segment(gray, "White").labels)
    seg.preprocessing.gray_from = "green"  # as a checkpoint trained on green channels says
    green = seg.segment(rgb, "White")
    assert "green channel" in green.notices[0]
    np.testing.assert_array_equal(green.labels, seg.segment(rgb[..., 1], "White").labels)


def test_grayscale_into_the_rgb_skin_model_is_replicated_with_a_notice():
    seg = Segmenter.from_checkpoint(MODELS / "skin_age_dmoe.safetensors", device="cpu")
    gray = np.random.default_rng(1).integers(0, 255, (80, 96)).astype(np.float32)
    result = seg.segment(gray, None)
    assert len(result.notices) == 1 and "replicated" in result.notices[0]
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    np.testing.assert_array_equal(result.labels, seg.segment(rgb, None).labels)
    assert seg.segment(rgb, None).notices == []


def test_predict_prints_the_notices(tmp_path, capsys):
    from PIL import Image

    from training.predict import main

    rgb = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    main(["--checkpoint", str(MODELS / "fundus_race_dmoe.safetensors"), "--image",
          str(tmp_path / "photo.png"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert "photo: RGB image converted to grayscale" in capsys.readouterr().out


def test_fit_records_which_channel_makes_rgb_gray(tmp_path):
    from training.data import make_synthetic_dataset
    from training.fit import FitConfig, prepare_data

    manifest = make_synthetic_dataset("fundus", tmp_path / "fundus", n=20, seed=1)
    default = prepare_data(FitConfig(data=str(manifest), attribute="race", image_size=32))[4]
    green = prepare_data(FitConfig(data=str(manifest), attribute="race", image_size=32,
                                   gray_from="green"))[4]
    assert default.gray_from == "luminance" and green.gray_from == "green"
    assert green.to_dict()["gray_from"] == "green"  # what the checkpoint stores
    with pytest.raises(ValueError, match="gray_from"):
        prepare_data(FitConfig(data=str(manifest), attribute="race", gray_from="purple"))


def test_probabilities_on_the_source_grid_agree_with_the_labels(ct_case):
    image, value = ct_case
    source = nib.load(str(image))
    seg = Segmenter.from_checkpoint(CT_MODEL, device="cpu")
    volume = np.asarray(source.dataobj, dtype=np.float32)
    plain = seg.segment(volume, value, affine=source.affine)
    with_probs = seg.segment(volume, value, affine=source.affine, return_probabilities=True)
    probs = with_probs.probabilities
    assert probs.shape == (2, *volume.shape)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(with_probs.labels, plain.labels)
    np.testing.assert_array_equal(probs.argmax(0), plain.labels)
    assert plain.labels.any()
