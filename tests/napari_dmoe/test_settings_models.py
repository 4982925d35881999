"""Remembered settings and model discovery/loading."""

from __future__ import annotations

import json
import shutil

import pytest

from napari_dmoe import _models
from napari_dmoe._settings import (
    DEFAULTS,
    MAX_RECENT,
    load_settings,
    remember_checkpoint,
    save_settings,
    settings_path,
)


def test_settings_round_trip_and_defaults(tmp_path):
    assert load_settings() == DEFAULTS  # nothing saved yet
    settings = load_settings()
    settings.update(device="cpu", show_routing=True, junk="ignored")
    for i in range(MAX_RECENT + 2):
        remember_checkpoint(settings, tmp_path / f"m{i}.safetensors")
    path = save_settings(settings)
    assert path == settings_path() and path.is_file()
    again = load_settings()
    assert again["device"] == "cpu" and again["show_routing"] is True
    assert "junk" not in again
    assert len(again["recent_checkpoints"]) == MAX_RECENT
    assert again["recent_checkpoints"][0].endswith(f"m{MAX_RECENT + 1}.safetensors")
    assert again["last_dir"] == str(tmp_path)


def test_corrupt_or_mistyped_settings_fall_back_to_defaults():
    path = settings_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert load_settings() == DEFAULTS
    path.write_text(json.dumps({"device": 3, "show_routing": "yes", "model": "/x.safetensors"}))
    loaded = load_settings()
    assert loaded["device"] == "auto" and loaded["show_routing"] is False
    assert loaded["model"] == "/x.safetensors"


def test_bundled_models_recent_and_suggestions(tmp_path, checkpoints):
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(checkpoints["fundus"], folder / "fundus_race.safetensors")
    shutil.copy(checkpoints["ct"], folder / "ct_t_stage_demo.safetensors")
    (folder / "readme.txt").write_text("not a model")
    entries = _models.model_choices([str(checkpoints["skin"]), str(tmp_path / "gone.x")],
                                    folder=folder)
    assert [e.name for e in entries] == ["ct_t_stage_demo", "fundus_race (demo)", "skin_tiny"]
    assert [e.bundled for e in entries] == [True, True, False]
    assert _models.suggest_model(entries, "ct").path.name == "ct_t_stage_demo.safetensors"
    assert _models.suggest_model(entries, "skin") is None  # only bundled models are suggested
    assert _models.suggest_model(entries, None) is None


def test_load_segmenter_caches_and_explains_bad_files(checkpoints, tmp_path):
    seg = _models.load_segmenter(checkpoints["fundus"], "cpu")
    assert seg.class_names == ["background", "rim", "cup"]
    assert seg.attribute_name == "race" and seg.spatial_dims == 2
    assert _models.load_segmenter(checkpoints["fundus"], "cpu") is seg
    with pytest.raises(ValueError, match="not a valid safetensors"):
        _models.load_segmenter(checkpoints["bad"], "cpu")
    with pytest.raises(ValueError, match="No checkpoint"):
        _models.load_segmenter(tmp_path / "missing.safetensors", "cpu")
    assert _models.available_devices()[0] == "auto"
    assert "cpu" in _models.available_devices()
