from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.data import DataError, Preprocessing, eval_transform, train_transform


def _onehot_logits(mask: torch.Tensor, k: int) -> torch.Tensor:
    """(*S) int -> (K, *S) logits whose argmax is the mask."""
    return F.one_hot(mask, k).movedim(-1, 0).float() * 10.0


def test_preprocessing_validates_arguments():
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3, got 4"):
        Preprocessing(spatial_dims=4)
    with pytest.raises(ValueError, match="needs ct_window"):
        Preprocessing(spatial_dims=3, intensity="ct_window")
    with pytest.raises(ValueError, match="lo < hi"):
        Preprocessing(spatial_dims=3, intensity="ct_window", ct_window=(100, -100))
    with pytest.raises(ValueError, match="intensity must be one of"):
        Preprocessing(spatial_dims=2, intensity="zscore")
    with pytest.raises(ValueError, match="image_size must be 2 positive integers"):
        Preprocessing(spatial_dims=2, image_size=(0, 4))
    with pytest.raises(ValueError, match="2D options"):
        Preprocessing(spatial_dims=3, image_size=64)
    assert Preprocessing(spatial_dims=2, image_size=64).image_size == (64, 64)
    assert Preprocessing(spatial_dims=3, patch_size=[8, 8, 4]).patch_size == (8, 8, 4)


def test_dict_round_trip_is_json_safe():
    pre = Preprocessing(spatial_dims=3, patch_size=(16, 16, 8), intensity="ct_window",
                        ct_window=(-1000, 1000), in_channels=1)
    data = json.loads(json.dumps(pre.to_dict()))
    assert data["patch_size"] == [16, 16, 8] and data["ct_window"] == [-1000.0, 1000.0]
    assert Preprocessing.from_dict(data) == pre
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        Preprocessing.from_dict({**data, "zoom": 2})


def test_prepare_2d_crop_resize_minmax():
    pre = Preprocessing(spatial_dims=2, image_size=(16, 16), center_crop=32, in_channels=1)
    image = np.random.default_rng(0).uniform(10, 200, (1, 40, 50)).astype(np.float32)
    x, geometry = pre.prepare(image)
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == pytest.approx(1.0)
    assert geometry["crop_box"] == [4, 9, 32, 32] and geometry["original_shape"] == [40, 50]


def test_restore_maps_a_known_mask_back():
    pre = Preprocessing(spatial_dims=2, image_size=(24, 24), center_crop=48, in_channels=1)
    mask = np.zeros((60, 80), np.int64)
    mask[20:44, 30:54] = 1  # inside the 48x48 centre crop (rows 6..54, cols 16..64)
    mask[28:36, 38:46] = 2
    _, geometry = pre.prepare(np.zeros((1, 60, 80), np.float32))
    sample = eval_transform(pre)({"image": np.zeros((1, 60, 80), np.float32), "label": mask})
    assert sample["label"].shape == (24, 24)
    logits = _onehot_logits(sample["label"], 3)
    restored = pre.restore(logits, geometry)
    assert restored.shape == (3, 60, 80)
    pred = restored.argmax(0).numpy()
    assert (pred[:6] == 0).all() and (pred[:, :16] == 0).all()  # cropped border -> background
    assert (pred == mask).mean() > 0.98
    batched = pre.restore(logits[None].repeat(2, 1, 1, 1), geometry)
    assert batched.shape == (2, 3, 60, 80)


def test_restore_without_crop_or_resize_is_identity():
    pre = Preprocessing(spatial_dims=2, in_channels=3)
    x, geometry = pre.prepare(np.random.default_rng(0).random((3, 10, 12)))
    assert x.shape == (3, 10, 12)
    logits = torch.randn(2, 10, 12)
    assert torch.equal(pre.restore(logits, geometry), logits)


def test_channel_mismatch_is_a_data_error():
    pre = Preprocessing(spatial_dims=2, image_size=(8, 8), in_channels=3)
    with pytest.raises(DataError, match="image has 1 channel.*model expects 3"):
        pre.prepare(np.zeros((1, 10, 10), np.float32))
    with pytest.raises(DataError, match="expected a 2D image"):
        pre.prepare(np.zeros((3, 4, 10, 10), np.float32))


def test_ct_window_3d_prepare_and_restore():
    pre = Preprocessing(spatial_dims=3, patch_size=(8, 8, 4), intensity="ct_window",
                        ct_window=(-1000, 1000))
    volume = np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0]).reshape(1, 5, 1, 1)
    x, geometry = pre.prepare(np.broadcast_to(volume, (1, 5, 3, 2)))
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [0, 0, 0.5, 1, 1])
    logits = torch.randn(2, 5, 3, 2)
    assert torch.equal(pre.restore(logits, geometry), logits)


def test_train_transform_2d_shapes_values_and_seed():
    pre = Preprocessing(spatial_dims=2, image_size=(16, 16), in_channels=3)
    rng = np.random.default_rng(0)
    sample = {"image": rng.uniform(0, 255, (3, 30, 20)).astype(np.float32),
              "label": (rng.random((30, 20)) > 0.5).astype(np.int64) * 2, "id": "x"}
    outs = [train_transform(pre, seed=5)(sample) for _ in range(2)]
    for out in outs:
        assert out["image"].shape == (3, 16, 16) and out["image"].dtype == torch.float32
        assert out["label"].shape == (16, 16) and out["label"].dtype == torch.long
        assert set(out["label"].unique().tolist()) <= {0, 2} and out["id"] == "x"
        assert float(out["image"].min()) >= -1e-6 and float(out["image"].max()) <= 1 + 1e-6
    assert torch.equal(outs[0]["image"], outs[1]["image"])
    assert torch.equal(outs[0]["label"], outs[1]["label"])
    varied = {train_transform(pre, seed=s)(sample)["label"].sum().item() for s in range(8)}
    assert len(varied) > 1


def test_train_transform_3d_patches_pad_and_foreground():
    pre = Preprocessing(spatial_dims=3, patch_size=(8, 8, 6), intensity="ct_window",
                        ct_window=(-100, 100))
    image = np.zeros((1, 12, 10, 4), np.float32)
    label = np.zeros((12, 10, 4), np.int64)
    label[5:7, 4:6, 1:3] = 1
    transform = train_transform(pre)
    hits = 0
    for seed in range(10):
        transform.set_random_state(seed)
        out = transform({"image": image, "label": label})
        assert out["image"].shape == (1, 8, 8, 6) and out["label"].shape == (8, 8, 6)
        assert "label_fg_indices" not in out
        hits += int(out["label"].sum() > 0)
    assert hits >= 3  # foreground-biased crops
    whole = eval_transform(pre)({"image": image, "label": label})
    assert whole["image"].shape == (1, 12, 10, 4) and whole["label"].sum() == 8
