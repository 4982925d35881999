"""Torch dataset over cases: decoded, preprocessed, cached, augmented, attribute-encoded.

Determinism: the random part of a ``SampleTransform`` is reseeded for every item from
torch's RNG (one ``torch.randint`` draw per item). In the main process that RNG follows
``torch.manual_seed``; in DataLoader workers torch seeds each worker from the loader's
base seed, so a seeded CPU run repeats exactly with any number of workers and workers
never duplicate each other's augmentations (``seed_worker`` also seeds numpy and
``random`` for any third-party code).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data.cases import Case, encode_attribute, read_case
from training.data.transforms import SampleTransform


def seed_worker(worker_id: int) -> None:
    """``DataLoader(worker_init_fn=seed_worker)``: seed numpy/random from torch's worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class SegmentationDataset(Dataset):
    """Items ``{"image": FloatTensor (C, *S), "label": LongTensor (*S), "attr": LongTensor
    scalar (-1 = unknown), "attribute_value": str, "id": str}``.

    ``label`` is left out for cases without a mask. Decoded arrays (after the
    deterministic preprocessing of a ``SampleTransform``, before random augmentation) are
    cached in memory when ``cache`` is true; ``fill_cache`` fills it up front, e.g. before
    DataLoader workers fork so they share it.

    Args:
        cases: the cases (already filtered to one split).
        attribute: routing attribute column, or None (every item gets -1).
        vocabulary: ordered attribute values (``build_vocabulary``).
        transform: a ``SampleTransform`` (``train_transform``/``eval_transform``), any
            callable on dict samples, or None (raw float image / long label tensors).
        cache: keep decoded samples in memory.
        spatial_dims: passed to ``read_image`` for ambiguous raw arrays.
    """

    def __init__(self, cases: list[Case], attribute: str | None, vocabulary: list[str],
                 transform: SampleTransform | Callable[[dict], dict] | None = None,
                 cache: bool = True, spatial_dims: int | None = None):
        self.cases = list(cases)
        self.attribute = attribute
        self.vocabulary = list(vocabulary)
        self.transform = transform
        self.cache = cache
        self.spatial_dims = spatial_dims
        self._cache: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def attribute_value(self, index: int) -> str:
        """Raw attribute string of case ``index`` (``""`` = unknown)."""
        if self.attribute is None:
            return ""
        return self.cases[index].attributes.get(self.attribute, "")

    def attribute_indices(self) -> list[int]:
        """Encoded attribute of every case, without reading any image (for samplers)."""
        return [encode_attribute(self.attribute_value(i), self.vocabulary)
                for i in range(len(self))]

    def _load(self, index: int) -> dict[str, Any]:
        if index in self._cache:
            return self._cache[index]
        image, label, meta = read_case(self.cases[index], spatial_dims=self.spatial_dims)
        sample: dict[str, Any] = {"image": image}
        if label is not None:
            sample["label"] = label
        if isinstance(self.transform, SampleTransform):
            if meta.get("affine") is not None:  # 3D: canonical orientation and spacing
                sample["affine"] = meta["affine"]
            sample = self.transform.deterministic(sample)
        if self.cache:
            self._cache[index] = sample
        return sample

    def fill_cache(self, progress: Callable[[int, int], None] | None = None) -> None:
        """Decode every case now (no-op without ``cache``); ``progress(done, total)``."""
        if not self.cache:
            return
        for i in range(len(self)):
            self._load(i)
            if progress is not None:
                progress(i + 1, len(self))

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} cases")
        index %= len(self)
        sample = self._load(index)
        if isinstance(self.transform, SampleTransform):
            self.transform.set_random_state(int(torch.randint(0, 2**31 - 1, (1,)).item()))
            item = self.transform.augment(sample)
        elif self.transform is not None:
            item = self.transform({k: np.array(v, copy=True) for k, v in sample.items()})
        else:
            item = {"image": torch.from_numpy(np.array(sample["image"], dtype=np.float32))}
            if "label" in sample:
                item["label"] = torch.from_numpy(np.array(sample["label"], dtype=np.int64))
        value = self.attribute_value(index)
        item["attr"] = torch.tensor(encode_attribute(value, self.vocabulary), dtype=torch.long)
        item["attribute_value"] = value
        item["id"] = self.cases[index].id
        return item
