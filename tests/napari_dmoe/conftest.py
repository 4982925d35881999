"""Fixtures for the plugin tests: isolated settings/cache folders and tiny checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHOTS = Path("/tmp/shots")


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory) -> Path:
    """One sample-data cache for the whole session (generated once)."""
    return tmp_path_factory.mktemp("napari_dmoe_cache")


@pytest.fixture(autouse=True)
def _isolated_dirs(monkeypatch, tmp_path, sample_cache) -> None:
    """Settings in a fresh folder per test; samples from the session cache."""
    monkeypatch.setenv("NAPARI_DMOE_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("NAPARI_DMOE_CACHE_DIR", str(sample_cache))


def _save(path: Path, model, class_names, attribute, preprocessing) -> Path:
    from training.checkpoint import save_checkpoint
    from training.data import Preprocessing

    save_checkpoint(model, path, class_names=class_names, attribute=attribute,
                    preprocessing=Preprocessing(**preprocessing).to_dict())
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Untrained tiny checkpoints: fundus (2D gray, race), skin (2D RGB), ct (3D, t_stage)."""
    import torch

    from training.networks import create_model

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    race = {"name": "race", "vocabulary": ["Asian", "Black", "White"], "unknown_router": True}
    model = create_model("transunet", preset="tiny", in_channels=1, out_channels=3,
                         moe="dmoe", num_attributes=3, img_size=64, depth=2)
    out["fundus"] = _save(root / "fundus_tiny.safetensors", model,
                          ["background", "rim", "cup"], race,
                          dict(spatial_dims=2, image_size=(64, 64), in_channels=1))
    ages = {"name": "age_group", "vocabulary": ["20-39", "40-59", "60-79", "<20", ">=80"],
            "unknown_router": True}
    model = create_model("transunet", preset="tiny", in_channels=3, out_channels=2,
                         moe="dmoe", num_attributes=5, img_size=64, depth=2)
    out["skin"] = _save(root / "skin_tiny.safetensors", model, ["background", "lesion"], ages,
                        dict(spatial_dims=2, image_size=(64, 64), in_channels=3))
    stages = {"name": "t_stage", "vocabulary": ["T1", "T2", "T3", "T4"], "unknown_router": True}
    model = create_model("resunet", preset="tiny", spatial_dims=3, in_channels=1,
                         out_channels=2, moe="dmoe", num_attributes=4, norm="batch",
                         channels=(4, 8, 8, 8, 8), final_channels=4)
    out["ct"] = _save(root / "ct_tiny.safetensors", model, ["background", "tumour"], stages,
                      dict(spatial_dims=3, patch_size=(32, 32, 32), intensity="ct_window",
                           ct_window=(-200.0, 300.0), in_channels=1))
    not_a_checkpoint = root / "notes.safetensors"
    not_a_checkpoint.write_bytes(b"this is not a checkpoint" * 10)
    out["bad"] = not_a_checkpoint
    return out


def corner_extent(layer) -> np.ndarray:
    """World bounding box ``(2, ndim)`` of a layer's pixels, edges included."""
    scale = np.asarray(layer.scale, dtype=float)
    world = np.asarray(layer.extent.world, dtype=float)
    return np.stack([world[0] - scale / 2, world[1] + scale / 2])
