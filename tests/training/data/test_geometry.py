"""Scanner geometry: canonical orientation/spacing, the exact way back, affine checks."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from training.data import DataError, Preprocessing, load_cases, validate_cases, write_manifest
from training.data.geometry import (
    affines_match,
    axcodes,
    from_canonical,
    labels_from_canonical,
    median_spacing,
    plan_geometry,
    to_canonical,
    to_source_grid_cells,
    voxel_spacing,
)

AFFINE = np.array([[-0.9, 0, 0, 30.0], [0, -0.9, 0, 25.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
ORIENTATIONS = ["LPS", "RAS", "SRA", "ILP", "PIR"]


def _volume(shape=(20, 16, 12), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _stored_as(volume: np.ndarray, affine: np.ndarray, codes: str) -> nib.Nifti1Image:
    """The same scanner geometry stored in another voxel order (nibabel as_reoriented)."""
    img = nib.Nifti1Image(volume, affine)
    return img.as_reoriented(ornt_transform(io_orientation(affine), axcodes2ornt(tuple(codes))))


def _oblique(affine: np.ndarray, degrees: float = 12.0) -> np.ndarray:
    t = np.radians(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot @ affine


@pytest.mark.parametrize("codes", ORIENTATIONS)
def test_every_storage_order_gives_the_same_canonical_volume_and_grid(codes):
    volume = _volume()
    reference = plan_geometry(volume.shape, AFFINE, "RAS")
    img = _stored_as(volume, AFFINE, codes)
    data = np.asarray(img.dataobj)
    geometry = plan_geometry(data.shape, img.affine, "RAS")
    assert axcodes(img.affine) == codes and axcodes(geometry.canonical_affine) == "RAS"
    np.testing.assert_array_equal(to_canonical(data[None], geometry),
                                  to_canonical(volume[None], reference))
    np.testing.assert_allclose(geometry.target_affine, reference.target_affine, atol=1e-9)


@pytest.mark.parametrize("codes", ORIENTATIONS)
def test_probabilities_go_back_voxel_exact_for_flips_and_permutations(codes):
    img = _stored_as(_volume(), AFFINE, codes)
    data = np.asarray(img.dataobj)
    geometry = plan_geometry(data.shape, img.affine, "RAS")
    canonical = to_canonical(data[None], geometry)[0]
    probs = np.stack([np.exp(-canonical), np.exp(canonical)])
    probs /= probs.sum(0)
    labels = labels_from_canonical(probs, geometry)
    assert labels.shape == data.shape
    np.testing.assert_array_equal(labels, (data > 0).astype(np.int32))
    np.testing.assert_allclose(from_canonical(probs, geometry)[1], 1 / (1 + np.exp(-2 * data)),
                               rtol=1e-5)


def test_oblique_keeps_its_rotation_in_the_affine_and_goes_back_exactly():
    affine = _oblique(AFFINE)
    volume = _volume()
    geometry = plan_geometry(volume.shape, affine, "RAS")
    assert axcodes(affine) == "LPS" and geometry.reorients
    # the canonical grid places every voxel where the stored grid placed it
    i, j, k = 3, 5, 7
    stored_mm = affine @ [i, j, k, 1]
    canonical = to_canonical(volume[None], geometry)[0]
    inverse = np.linalg.inv(geometry.canonical_affine) @ stored_mm
    ci, cj, ck = np.rint(inverse[:3]).astype(int)
    assert canonical[ci, cj, ck] == volume[i, j, k]
    rotation = geometry.canonical_affine[:3, :3] / voxel_spacing(geometry.canonical_affine)
    assert not np.allclose(rotation, np.eye(3))  # residual 12 degrees kept
    np.testing.assert_array_equal(
        labels_from_canonical(np.stack([-canonical, canonical]), geometry),
        (volume > 0).astype(np.int32))


def test_spacing_resamples_same_field_of_view_and_maps_back_to_the_source_shape():
    volume = np.zeros((40, 40, 16), np.float32)
    volume[10:30, 12:28, 4:12] = 1.0
    geometry = plan_geometry(volume.shape, AFFINE, "RAS", spacing=(1.8, 1.8, 1.25))
    assert geometry.target_shape == (20, 20, 32)
    np.testing.assert_allclose(geometry.target_spacing, (1.8, 1.8, 1.25))
    # same field of view: the first target voxel's corner is the source grid's corner
    corner = geometry.target_affine @ [-0.5, -0.5, -0.5, 1]
    flipped = geometry.canonical_affine @ [-0.5, -0.5, -0.5, 1]
    np.testing.assert_allclose(corner, flipped, atol=1e-9)
    canonical = to_canonical(volume[None], geometry)[0]
    back = labels_from_canonical(np.stack([1 - canonical, canonical]), geometry)
    assert back.shape == volume.shape
    dice = 2 * np.sum((back == 1) & (volume == 1)) / (np.sum(back == 1) + np.sum(volume == 1))
    assert dice > 0.95


def test_labels_use_nearest_and_stay_integers():
    label = np.zeros((9, 9, 9), np.float32)
    label[2:7, 2:7, 2:7] = 2
    geometry = plan_geometry(label.shape, np.eye(4), "RAS", spacing=(0.5, 0.5, 0.5))
    out = to_canonical(label[None], geometry, nearest=True)
    assert set(np.unique(out)) == {0.0, 2.0}


def test_routing_cells_go_back_to_the_stored_axis_order():
    img = _stored_as(_volume(), AFFINE, "SRA")
    geometry = plan_geometry(img.shape, img.affine, "RAS")
    cells = np.arange(2 * 5 * 4 * 3, dtype=np.float32).reshape(2, 5, 4, 3)  # canonical grid
    back = to_source_grid_cells(cells, geometry)
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(to_source_grid_cells(torch.from_numpy(cells), geometry).numpy(),
                                  back)
    assert back.shape == (2, 3, 5, 4)  # S, R, A order of the stored grid


def test_median_spacing_is_taken_per_canonical_axis():
    permuted = _stored_as(_volume(), AFFINE, "SRA").affine  # columns 2.5, 0.9, 0.9
    other = np.diag([1.0, 1.2, 3.0, 1.0])
    assert median_spacing([AFFINE, permuted, other]) == (0.9, 0.9, 2.5)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="orientation"):
        plan_geometry((4, 4, 4), np.eye(4), "RAX")
    with pytest.raises(ValueError, match="spacing"):
        plan_geometry((4, 4, 4), np.eye(4), "RAS", spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="singular"):
        plan_geometry((4, 4, 4), np.zeros((4, 4)), "RAS")
    with pytest.raises(ValueError, match="3D options"):
        Preprocessing(spatial_dims=2, orientation="RAS")


def test_preprocessing_round_trip_and_old_dicts():
    pre = Preprocessing(spatial_dims=3, patch_size=8, orientation="ras", spacing=(1, 1, 2))
    again = Preprocessing.from_dict(pre.to_dict())
    assert again == pre and again.orientation == "RAS" and again.spacing == (1.0, 1.0, 2.0)
    old = Preprocessing.from_dict({"spatial_dims": 3, "patch_size": [8, 8, 8],
                                   "intensity": "minmax", "in_channels": 1})
    assert old.orientation is None and old.spacing is None and not old.uses_geometry
    assert Preprocessing(spatial_dims=2, in_channels=3).channels == "rgb"


def test_affines_match_tolerates_float32_rounding_only():
    rounded = AFFINE.astype(np.float32).astype(np.float64)
    assert affines_match(AFFINE, rounded)
    shifted = AFFINE.copy()
    shifted[0, 3] += 0.5
    assert not affines_match(AFFINE, shifted)


def _write_pair(folder, name, image_affine, label_affine):
    volume = np.zeros((12, 10, 8), np.int16)
    label = np.zeros((12, 10, 8), np.uint8)
    label[3:6, 3:6, 2:5] = 1
    nib.save(nib.Nifti1Image(volume, image_affine), str(folder / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(label, label_affine), str(folder / f"{name}_seg.nii.gz"))
    return {"image": f"{name}.nii.gz", "label": f"{name}_seg.nii.gz", "split": "train",
            "id": name}


def test_validation_refuses_a_mask_stored_flipped_naming_case_and_orientations(tmp_path):
    flipped = AFFINE @ np.diag([-1.0, 1, 1, 1])
    flipped[0, 3] = AFFINE[0, 3] + 11 * AFFINE[0, 0]  # same field of view, x reversed
    rows = [_write_pair(tmp_path, "good", AFFINE, AFFINE),
            _write_pair(tmp_path, "bad", AFFINE, flipped)]
    write_manifest(tmp_path / "manifest.csv", rows)
    cases = load_cases(tmp_path / "manifest.csv")
    with pytest.raises(DataError, match=r"case bad: .*LPS vs RPS"):
        validate_cases(cases, None, spatial_dims=3)
    validate_cases(cases[:1], None, spatial_dims=3)


@pytest.mark.parametrize("codes", ["LPS", "SRA"])
def test_training_samples_and_labels_are_canonicalised_together(codes):
    from training.data import eval_transform

    label = np.zeros((20, 16, 12), np.int64)
    label[4:9, 3:12, 2:6] = 1
    img = _stored_as(label.astype(np.float32) * 100, AFFINE, codes)
    stored = np.asarray(img.dataobj)
    pre = Preprocessing(3, intensity="none", orientation="RAS", spacing=(0.9, 0.9, 1.25))
    sample = eval_transform(pre).deterministic(
        {"image": stored[None], "label": (stored > 0).astype(np.int64), "affine": img.affine})
    assert "affine" not in sample
    assert tuple(sample["image"].shape) == (1, 20, 16, 24)  # RAS order, z resampled x2
    reference = to_canonical(label[None].astype(np.float32),
                             plan_geometry(label.shape, AFFINE, "RAS", (0.9, 0.9, 1.25)),
                             nearest=True)
    np.testing.assert_array_equal(sample["label"].numpy(), reference)
    assert set(np.unique(sample["label"].numpy())) == {0.0, 1.0}
