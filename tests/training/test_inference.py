"""training.inference: fit checks, 2D/3D segmentation, progress, cancel, routing maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.checkpoint import save_checkpoint
from training.data import Preprocessing
from training.inference import (
    Cancelled,
    RoutingMap,
    Segmenter,
    available_devices,
    expert_usage,
    resolve_device,
)
from training.networks import create_model


@pytest.fixture(scope="module")
def seg2d(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("transunet", preset="tiny", in_channels=1, out_channels=3, moe="dmoe",
                         num_attributes=3, embed_dim=32, depth=2, num_heads=2, img_size=64)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("ck") / "m2.safetensors"
    save_checkpoint(model, path, class_names=["background", "rim", "cup"],
                    attribute={"name": "race", "vocabulary": ["Asian", "Black", "White"],
                               "unknown_router": True},
                    preprocessing=Preprocessing(2, image_size=64, center_crop=80).to_dict())
    return Segmenter.from_checkpoint(path, device="cpu")


@pytest.fixture(scope="module")
def seg3d(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("resunet", preset="tiny", spatial_dims=3, out_channels=2, moe="dmoe",
                         num_attributes=2)
    path = tmp_path_factory.mktemp("ck") / "m3.safetensors"
    save_checkpoint(model, path, class_names=["background", "tumour"],
                    attribute={"name": "t_stage", "vocabulary": ["T1", "T2"],
                               "unknown_router": True},
                    preprocessing=Preprocessing(3, patch_size=(64, 32, 32), intensity="ct_window",
                                                ct_window=(-150, 250)).to_dict())
    return Segmenter.from_checkpoint(path, device="cpu")


def test_devices():
    devices = available_devices()
    assert devices[0] == "auto" and devices[-1] == "cpu"
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cuda", "mps", "cpu"}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available"):
            resolve_device("cuda")


def test_2d_labels_on_original_grid_with_crop_outside_background(seg2d):
    image = np.random.default_rng(0).random((100, 120)).astype(np.float32)
    res = seg2d.segment(image, "Black", return_routing=True, return_probabilities=True)
    assert res.labels.shape == (100, 120)
    assert res.attribute_value == "Black"
    assert res.probabilities.shape == (3, 100, 120)
    # centre crop 80: pixels outside it are background
    assert (res.labels[:10] == 0).all() and (res.labels[:, :20] == 0).all()
    assert len(res.routing) == 2  # one shared dMoE applied after each of 2 blocks
    r = res.routing[0]
    assert r.expert_gates.shape == (8, 4, 4)
    np.testing.assert_allclose(r.expert_gates.sum(0), 1.0, atol=1e-5)
    assert ((r.expert_gates > 0).sum(0) == 2).all()  # top-2 per cell
    # the 4x4 grid covers the 80x80 crop at offset (10, 20): 20 image pixels per cell
    assert r.grid_stride == (20.0, 20.0) and r.grid_offset == (10.0, 20.0)


def test_attribute_changes_result_and_unknown_values(seg2d):
    image = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    a = seg2d.segment(image, "Asian", return_probabilities=True)
    w = seg2d.segment(image, "White", return_probabilities=True)
    assert not np.allclose(a.probabilities, w.probabilities)
    assert seg2d.segment(image, "Martian").attribute_value == "unknown"
    assert seg2d.segment(image, None).attribute_value == "unknown"


@pytest.mark.parametrize(
    "image, message",
    [(np.zeros((16, 64, 64)), "looks like a 3D volume"),
     (np.zeros((64, 64, 2)), "expects 1 channel"),  # RGB is converted (test_inference_geometry)
     (np.full((64, 64), np.nan), "NaN"),
     (np.zeros((1, 1)), "too small"),
     (np.zeros((2, 3, 4, 5)), "has shape")],
)
def test_bad_images_are_refused_with_a_reason(seg2d, image, message):
    with pytest.raises(ValueError, match=message):
        seg2d.segment(image, "Asian")


def test_3d_sliding_window_progress_and_routing(seg3d):
    volume = np.random.default_rng(0).normal(0, 200, (80, 40, 40)).astype(np.float32)
    calls = []
    res = seg3d.segment(volume, "T2", return_routing=True,
                        progress=lambda done, total: calls.append((done, total)))
    assert res.labels.shape == volume.shape
    total = calls[-1][1]
    assert total > 1 and calls[-1][0] == total and len(calls) == total
    assert [r.name for r in res.routing] == [f"encoder.stage{i}" for i in range(5)]
    for r in res.routing:  # every map spans the whole volume
        extent = [n * s for n, s in zip(r.expert_gates.shape[1:], r.grid_stride)]
        np.testing.assert_allclose(extent, volume.shape)


def test_3d_cancel_stops_between_windows(seg3d):
    volume = np.zeros((128, 64, 64), np.float32)
    seen = []
    with pytest.raises(Cancelled):
        seg3d.segment(volume, "T1", progress=lambda d, t: seen.append(d),
                      should_cancel=lambda: len(seen) >= 2)
    assert len(seen) == 2


def test_3d_model_refuses_2d_image(seg3d):
    with pytest.raises(ValueError, match="3D volumes"):
        seg3d.segment(np.zeros((64, 64)), "T1")


def test_expert_usage_counts_cells_by_class():
    gates = np.zeros((3, 2, 2))
    gates[0, 0, :] = 1.0  # top row: expert 0
    gates[2, 1, :] = 1.0  # bottom row: expert 2
    routing = RoutingMap("x", gates, grid_stride=(2.0, 2.0), grid_offset=(0.0, 0.0))
    labels = np.zeros((4, 4), int)
    labels[2:, :2] = 1  # bottom-left cell is class 1
    usage = expert_usage(routing, labels, num_classes=2)
    np.testing.assert_allclose(usage, [[2 / 3, 0, 1 / 3], [0, 0, 1]])
