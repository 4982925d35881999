"""Small format-faithful dataset fixtures (FairSeg npz, HAM10000 layout, NIfTI, manifest)."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

AFFINE = np.array([[-0.8, 0.0, 0.1, 30.0],
                   [0.0, 0.8, 0.0, -12.0],
                   [0.0, 0.0, 2.5, 7.5],
                   [0.0, 0.0, 0.0, 1.0]])


def fairseg_mask(size: int = 16) -> np.ndarray:
    """0 background, -1 rim, -2 cup (FairSeg coding)."""
    mask = np.zeros((size, size), np.int8)
    mask[4:12, 4:12] = -1
    mask[6:10, 6:10] = -2
    return mask


def write_fairseg_npz(path: Path, race: int, *, old_keys: bool = False, ethnicity: int = 0,
                      language: int = 0, size: int = 16) -> None:
    image = (np.arange(size * size).reshape(size, size) % 251).astype(np.uint8)
    keys = ("fundus_slo", "disc_cup") if old_keys else ("slo_fundus", "disc_cup_mask")
    np.savez(path, **{keys[0]: image, keys[1]: fairseg_mask(size)}, race=np.array(race),
             gender=np.array(1), ethnicity=np.array(ethnicity), language=np.array(language),
             maritalstatus=np.array(-1), age=np.array(61.5))


@pytest.fixture
def fairseg_dir(tmp_path: Path) -> Path:
    """6 cases: 4 train (races 0, 1, 2, 2), 2 test; one unknown ethnicity."""
    root = tmp_path / "fairseg"
    root.mkdir()
    races = [0, 1, 2, 2, 2, 0]
    for i, race in enumerate(races):
        write_fairseg_npz(root / f"data_{i:06d}.npz", race, ethnicity=-1 if i == 1 else i % 2)
    (root / "train.txt").write_text("".join(f"data_{i:06d}.npz\n" for i in range(4)))
    (root / "test.txt").write_text("data_000004.npz\ndata_000005\n")
    return root


@pytest.fixture
def ham_dir(tmp_path: Path) -> Path:
    """HAM10000 layout: 6 metadata rows, one with missing age; ISIC_0000001/2 = one lesion."""
    root = tmp_path / "ham"
    (root / "HAM10000_images").mkdir(parents=True)
    (root / "HAM10000_segmentations_lesion_tschandl").mkdir()
    rows = [
        ("HAM_0000001", "ISIC_0000001", "nv", "histo", "45.0", "male", "back"),
        ("HAM_0000001", "ISIC_0000002", "nv", "histo", "45.0", "male", "back"),
        ("HAM_0000002", "ISIC_0000003", "mel", "histo", "", "female", "face"),
        ("HAM_0000003", "ISIC_0000004", "bkl", "consensus", "85.0", "female", "trunk"),
        ("HAM_0000004", "ISIC_0000005", "nv", "follow_up", "15.0", "male", "lower extremity"),
        ("HAM_0000005", "ISIC_0000006", "bcc", "histo", "60.0", "unknown", "neck"),
    ]
    with (root / "HAM10000_metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex",
                         "localization"])
        writer.writerows(rows)
    rng = np.random.default_rng(0)
    for _, image_id, *_ in rows:
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(
            root / "HAM10000_images" / f"{image_id}.jpg")
        mask = np.zeros((12, 16), np.uint8)
        mask[3:9, 4:12] = 255
        Image.fromarray(mask).save(root / "HAM10000_segmentations_lesion_tschandl"
                                   / f"{image_id}_segmentation.png")
    return root


@pytest.fixture
def nifti_pair(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A 3D CT-like image with a non-identity affine, its label file and label array."""
    rng = np.random.default_rng(1)
    volume = rng.integers(-1000, 1000, (10, 12, 6)).astype(np.int16)
    img = nib.Nifti1Image(volume, AFFINE)
    img.set_qform(AFFINE, code=1)
    img.set_sform(AFFINE, code=1)
    image_path = tmp_path / "ct.nii.gz"
    nib.save(img, image_path)
    label = np.zeros((10, 12, 6), np.uint8)
    label[3:7, 4:9, 2:5] = 1
    label_path = tmp_path / "ct_label.nii.gz"
    nib.save(nib.Nifti1Image(label, AFFINE), label_path)
    return image_path, label_path, label


def write_png_manifest(root: Path, n: int = 6, *, splits: list[str] | None = None,
                       groups: tuple[str, ...] = ("A", "B")) -> Path:
    """Grayscale 20x24 PNG images with 0/1/2 masks and a manifest; returns manifest path."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "lab").mkdir(exist_ok=True)
    splits = splits or ["train", "train", "val", "test", "train", "val"][:n]
    rows = []
    for i in range(n):
        image = np.full((20, 24), 40, np.uint8)
        image[5:15, 6:18] = 200
        mask = np.zeros((20, 24), np.uint8)
        mask[5:15, 6:18] = 1
        mask[8:12, 9:15] = 2
        Image.fromarray(image).save(root / "img" / f"c{i}.png")
        Image.fromarray(mask).save(root / "lab" / f"c{i}.png")
        rows.append([f"img/c{i}.png", f"lab/c{i}.png", splits[i], groups[i % len(groups)]])
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "split", "race"])
        writer.writerows(rows)
    return root / "manifest.csv"
