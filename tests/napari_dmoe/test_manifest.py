"""The npe2 manifest: valid, shipped in the package, every python_name importable."""

from __future__ import annotations

import importlib
from pathlib import Path

from npe2 import PluginManifest

import napari_dmoe

ROOT = Path(__file__).resolve().parents[2]


def test_manifest_is_valid_and_shipped():
    manifest = PluginManifest.from_file(ROOT / "napari.yaml")
    assert manifest.name == "napari-dmoe"
    packaged = Path(napari_dmoe.__file__).parent / "napari.yaml"
    assert packaged.read_text() == (ROOT / "napari.yaml").read_text()
    contributions = manifest.contributions
    assert {w.display_name for w in contributions.widgets} == {"dMoE segmentation"}
    assert {s.key for s in contributions.sample_data} == {"fundus", "skin", "ct"}
    assert {tuple(w.layer_types) for w in contributions.writers} == {("labels",)}
    patterns = contributions.readers[0].filename_patterns
    assert {"*.nii", "*.nii.gz", "*.tif", "*.tiff", "*.npz"} <= set(patterns)


def test_every_python_name_imports():
    manifest = PluginManifest.from_file(ROOT / "napari.yaml")
    names = [c.python_name for c in manifest.contributions.commands]
    assert len(names) == 9  # reader, 4 writers (NIfTI, TIFF, DICOM-SEG, RTSTRUCT), 3 samples, UI
    for name in names:
        module, attr = name.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), name
