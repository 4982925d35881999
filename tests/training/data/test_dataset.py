from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from tests.training.data.conftest import write_png_manifest
from training.data import (
    Preprocessing,
    SegmentationDataset,
    build_vocabulary,
    eval_transform,
    load_cases,
    seed_worker,
    train_transform,
)


def _dataset(tmp_path, transform, groups=("A", "B", "")):
    cases = load_cases(write_png_manifest(tmp_path, n=4, groups=groups,
                                          splits=["train", "train", "train", "val"]))
    train = [c for c in cases if c.split == "train"]
    return SegmentationDataset(train, "race", build_vocabulary(cases, "race"), transform)


def test_items_have_promised_shapes_and_types(tmp_path):
    pre = Preprocessing(spatial_dims=2, image_size=(16, 16))
    ds = _dataset(tmp_path, eval_transform(pre))
    assert len(ds) == 3 and ds.vocabulary == ["A", "B"]
    item = ds[0]
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].shape == (16, 16) and item["label"].dtype == torch.long
    assert item["attr"].dtype == torch.long and item["attr"].ndim == 0
    assert (item["attr"].item(), item["attribute_value"], item["id"]) == (0, "A", "c0")
    assert ds[1]["attr"].item() == 1 and ds[2]["attr"].item() == -1  # "" -> unknown
    assert ds.attribute_indices() == [0, 1, -1]
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["image"].shape == (3, 1, 16, 16) and batch["attr"].tolist() == [0, 1, -1]


def test_cache_holds_preprocessed_arrays_and_is_not_mutated(tmp_path):
    pre = Preprocessing(spatial_dims=2, image_size=(16, 16))
    ds = _dataset(tmp_path, eval_transform(pre))
    ds.fill_cache()
    assert set(ds._cache) == {0, 1, 2} and ds._cache[0]["image"].shape == (1, 16, 16)
    first = ds[0]["image"]
    expected = first.clone()
    first.add_(5.0)
    assert torch.equal(ds[0]["image"], expected)


def test_raw_items_without_transform(tmp_path):
    item = _dataset(tmp_path, None)[0]
    assert item["image"].shape == (1, 20, 24) and item["label"].shape == (20, 24)
    assert item["label"].max().item() == 2


def _epoch(ds, workers):
    loader = DataLoader(ds, batch_size=2, shuffle=True, num_workers=workers,
                        worker_init_fn=seed_worker)
    return [(b["id"], b["image"].clone(), b["label"].clone()) for b in loader]


def _same(a, b):
    return all(x[0] == y[0] and torch.equal(x[1], y[1]) and torch.equal(x[2], y[2])
               for x, y in zip(a, b, strict=True))


def test_seeded_augmentation_repeats_exactly(tmp_path):
    pre = Preprocessing(spatial_dims=2, image_size=(16, 16))
    ds = _dataset(tmp_path, train_transform(pre), groups=("A", "B"))
    for workers, epochs in ((0, 2), (2, 1)):
        torch.manual_seed(123)
        first = [b for _ in range(epochs) for b in _epoch(ds, workers)]
        torch.manual_seed(123)
        again = [b for _ in range(epochs) for b in _epoch(ds, workers)]
        assert _same(first, again)
        if workers == 0:
            assert not _same(first[:2], first[2:])  # epochs differ
            reference = first[:2]
    torch.manual_seed(7)
    assert not _same(_epoch(ds, 0), reference)
