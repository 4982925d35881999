"""Preprocessing shared by training and inference, and the training augmentations.

``Preprocessing`` is stored in checkpoints (``to_dict``/``from_dict``) so inference
repeats exactly what training saw:

- 2D (reference FairSeg/HAM10000 protocol): centre crop of ``center_crop`` pixels
  (None: no crop; a side larger than the image is clamped to it), resize to
  ``image_size`` (image bicubic with antialiasing, mask nearest; None: keep the size),
  then intensities to [0, 1].
- 3D: with an affine (NIfTI, DICOM), the volume is first brought to the canonical
  ``orientation`` (axis codes, ``"RAS"``) and voxel ``spacing`` (mm) by
  ``training.data.geometry`` (images trilinear, labels nearest; None keeps the stored
  order/spacing, as checkpoints from before geometry did); then intensities
  (``ct_window``: clip to (lo, hi) HU and scale to [0, 1]); training samples random
  ``patch_size`` patches, inference runs on the whole volume by sliding window and maps
  the class probabilities back onto the stored grid (``training.inference``).
- Channels: ``channels`` records what the model was trained on (``"gray"`` or ``"rgb"``;
  derived from ``in_channels``); ``gray_from`` says how inference turns an RGB image into
  gray for a grayscale model (``"luminance"`` = ITU-R 601 weights as PIL's "L", or one
  channel ``"red"|"green"|"blue"``, e.g. green for fundus photographs).

Intensity modes: ``"minmax"`` (per image, all channels together, to [0, 1]; constant
images become 0), ``"ct_window"``, ``"none"``.

Training augmentation (MONAI): 2D random rot90 (square sizes only, so batch shapes stay
fixed) + flips + rotation within +-20 deg (mask nearest); 3D foreground-biased random
patches (``RandCropByPosNegLabeld``, 1:1 positive/negative centres, volumes smaller than
the patch are zero-padded first) + flips on every axis.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from training.data.errors import DataError

INTENSITY_MODES = ("minmax", "ct_window", "scale255", "none")
CHANNEL_KINDS = ("gray", "rgb")
GRAY_FROM = ("luminance", "red", "green", "blue")
GEOMETRY_KEYS = ("orientation", "spacing")
"""Preprocessing keys that checkpoints written before scanner geometry do not have."""
_FG, _BG = "label_fg_indices", "label_bg_indices"


def _size(value: Any, n: int, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int | np.integer):
        value = (int(value),) * n
    value = tuple(int(v) for v in value)
    if len(value) != n or min(value) < 1:
        raise ValueError(f"{name} must be {n} positive integers, got {value}")
    return value


@dataclass
class Preprocessing:
    """How images are turned into model inputs (and predictions back into image space).

    Args:
        spatial_dims: 2 or 3.
        image_size: 2D model input size ``(H, W)`` (an int means square); None keeps the
            (cropped) size.
        patch_size: 3D training patch ``(X, Y, Z)`` (an int means a cube).
        center_crop: 2D centre-crop side in pixels before resizing; None = no crop.
        intensity: ``"minmax"``, ``"ct_window"``, ``"scale255"`` (fixed /255, the FairSeg
            reference) or ``"none"``.
        ct_window: ``(lo, hi)`` in HU, required for ``"ct_window"``.
        in_channels: channels the model expects; other counts raise ``DataError``.
        orientation: 3D canonical axis codes (``"RAS"``) or None (stored voxel order).
        spacing: 3D target voxel size ``(x, y, z)`` in mm (canonical axes) or None.
        channels: ``"gray"``/``"rgb"`` the model was trained on (None: from in_channels).
        gray_from: how an RGB input becomes gray for a gray model (see module docstring).
    """

    spatial_dims: int
    image_size: tuple[int, ...] | None = None
    patch_size: tuple[int, int, int] | None = None
    center_crop: int | None = None
    intensity: str = "minmax"
    ct_window: tuple[float, float] | None = None
    in_channels: int = 1
    orientation: str | None = None
    spacing: tuple[float, float, float] | None = None
    channels: str | None = None
    gray_from: str = "luminance"

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        self.image_size = _size(self.image_size, 2, "image_size")
        self.patch_size = _size(self.patch_size, 3, "patch_size")
        if self.spatial_dims == 3 and (self.image_size or self.center_crop):
            raise ValueError("image_size and center_crop are 2D options; 3D models work at "
                             "native resolution (use patch_size)")
        if self.spatial_dims == 2 and self.patch_size is not None:
            raise ValueError(f"patch_size is a 3D option, got {self.patch_size} for 2D")
        if self.center_crop is not None and int(self.center_crop) < 1:
            raise ValueError(f"center_crop must be a positive int or None, got "
                             f"{self.center_crop}")
        if self.intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got "
                             f"{self.intensity!r}")
        if self.ct_window is not None:
            lo, hi = (float(v) for v in self.ct_window)
            if not lo < hi:
                raise ValueError(f"ct_window must be (lo, hi) with lo < hi, got "
                                 f"{self.ct_window}")
            self.ct_window = (lo, hi)
        if self.intensity == "ct_window" and self.ct_window is None:
            raise ValueError("intensity='ct_window' needs ct_window=(lo, hi), e.g. "
                             "(-1000, 1000)")
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        self._post_init_geometry()

    def _post_init_geometry(self) -> None:
        if self.spatial_dims == 2 and (self.orientation or self.spacing):
            raise ValueError(f"orientation/spacing are 3D options, got {self.orientation!r}, "
                             f"{self.spacing} for 2D")
        if self.orientation is not None:
            self.orientation = str(self.orientation).upper()
            from training.data.geometry import plan_geometry

            plan_geometry((1, 1, 1), np.eye(4), self.orientation)  # validates the codes
        if self.spacing is not None:
            spacing = tuple(float(v) for v in self.spacing)
            if len(spacing) != 3 or min(spacing) <= 0:
                raise ValueError(f"spacing must be three positive voxel sizes in mm, got "
                                 f"{self.spacing}")
            self.spacing = spacing
        if self.channels is None:
            self.channels = {1: "gray", 3: "rgb"}.get(self.in_channels)
        if self.channels is not None and self.channels not in CHANNEL_KINDS:
            raise ValueError(f"channels must be one of {CHANNEL_KINDS} or None, got "
                             f"{self.channels!r}")
        if self.channels is not None and self.in_channels != {"gray": 1, "rgb": 3}[self.channels]:
            raise ValueError(f"channels={self.channels!r} does not fit in_channels="
                             f"{self.in_channels}")
        if self.gray_from not in GRAY_FROM:
            raise ValueError(f"gray_from must be one of {GRAY_FROM}, got {self.gray_from!r}")

    @property
    def uses_geometry(self) -> bool:
        """True if 3D volumes are reoriented or resampled (needs their affine)."""
        return self.spatial_dims == 3 and (self.orientation is not None
                                           or self.spacing is not None)

    def plan(self, shape: tuple[int, ...], affine: Any):
        """``CanonicalGeometry`` of a stored 3D grid, or None (no geometry or no affine)."""
        if not self.uses_geometry or affine is None:
            return None
        from training.data.geometry import plan_geometry

        return plan_geometry(shape, affine, self.orientation, self.spacing)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples as lists) for checkpoints."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """Inverse of ``to_dict``; unknown keys raise ``ValueError``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown preprocessing keys {unknown}; known: {sorted(names)}")
        return cls(**data)

    # -- shared building blocks -------------------------------------------------------
    def _check_channels(self, image: torch.Tensor) -> None:
        if image.ndim != self.spatial_dims + 1:
            raise DataError(f"expected a {self.spatial_dims}D image (C, *spatial) but got "
                            f"shape {tuple(image.shape)}; check --spatial-dims.")
        if image.shape[0] != self.in_channels:
            raise DataError(f"image has {image.shape[0]} channel(s) but the model expects "
                            f"{self.in_channels}; convert the images (grayscale vs RGB) or "
                            "use a model trained on this kind of image.")

    def _intensity(self, image: torch.Tensor) -> torch.Tensor:
        if self.intensity == "minmax":
            lo, hi = image.min(), image.max()
            return (image - lo) / (hi - lo) if hi > lo else torch.zeros_like(image)
        if self.intensity == "ct_window":
            lo, hi = self.ct_window
            return (image.clamp(lo, hi) - lo) / (hi - lo)
        if self.intensity == "scale255":  # the reference code's fixed /255 (8-bit images)
            return image / 255.0
        return image

    def _crop_box(self, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
        height, width = shape
        side_h = min(self.center_crop, height) if self.center_crop else height
        side_w = min(self.center_crop, width) if self.center_crop else width
        return (height - side_h) // 2, (width - side_w) // 2, side_h, side_w

    def _resize_2d(self, x: torch.Tensor, size: tuple[int, int], nearest: bool
                   ) -> torch.Tensor:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        if nearest:
            return F.interpolate(x[None].float(), size=size, mode="nearest-exact")[0]
        down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        return F.interpolate(x[None], size=size, mode="bicubic", align_corners=False,
                             antialias=down)[0]

    def _apply(self, image: torch.Tensor, label: torch.Tensor | None, affine: Any = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """Deterministic part: image ``(C, *S)``, label ``(1, *S)`` -> model space.

        3D with an ``affine`` and geometry options: canonical orientation and spacing first
        (``geometry["canonical"]`` holds the ``CanonicalGeometry``, else None).
        """
        self._check_channels(image)
        canonical = self.plan(tuple(image.shape[1:]), affine) if image.ndim == 4 else None
        if canonical is not None:
            from training.data.geometry import to_canonical

            image = torch.from_numpy(to_canonical(image.numpy(), canonical))
            if label is not None:
                label = torch.from_numpy(to_canonical(label.numpy(), canonical, nearest=True))
        geometry: dict[str, Any] = {"spatial_dims": self.spatial_dims,
                                    "original_shape": list(image.shape[1:]),
                                    "canonical": canonical}
        if self.spatial_dims == 2:
            top, left, h, w = self._crop_box(tuple(image.shape[1:]))
            image = image[:, top:top + h, left:left + w]
            label = None if label is None else label[:, top:top + h, left:left + w]
            size = self.image_size or (h, w)
            image = self._resize_2d(image, size, nearest=False)
            label = None if label is None else self._resize_2d(label, size, nearest=True)
            geometry.update(crop_box=[top, left, h, w], size=list(size))
        return self._intensity(image.float()), label, geometry

    # -- inference ------------------------------------------------------------------------
    def prepare(self, image: np.ndarray | torch.Tensor, affine: Any = None
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Image ``(C, *S)`` (3D: with its 4x4 ``affine`` when known) -> model input
        ``(C, *S')`` and the geometry to undo it (see ``restore``, and
        ``training.data.geometry.labels_from_canonical`` for ``geometry["canonical"]``)."""
        tensor = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))
        out, _, geometry = self._apply(tensor, None, affine)
        return out.contiguous(), geometry

    def restore(self, logits: torch.Tensor, geometry: dict[str, Any]) -> torch.Tensor:
        """Logits ``([B,] K, *S')`` in model space -> ``([B,] K, *original_spatial)``.

        2D: bilinear resize back to the crop, then the cropped-away border is filled with
        background logits (class 0 high, others low) so that argmax gives 0 there.
        3D: returned as they are (model grid; with ``geometry["canonical"]`` the caller
        maps probabilities back with ``training.data.geometry``).
        """
        batched = logits.ndim == self.spatial_dims + 2
        x = logits if batched else logits[None]
        original = tuple(int(s) for s in geometry["original_shape"])
        if self.spatial_dims == 3:
            if tuple(x.shape[2:]) != original:
                raise ValueError(f"3D logits have shape {tuple(x.shape[2:])}, expected the "
                                 f"original {original}")
            return logits
        top, left, h, w = (int(v) for v in geometry["crop_box"])
        if tuple(x.shape[2:]) != (h, w):
            x = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False)
        if (h, w) != original:
            big = 1e4
            out = x.new_full((x.shape[0], x.shape[1], *original), -big)
            out[:, 0] = big
            out[:, :, top:top + h, left:left + w] = x
            x = out
        return x if batched else x[0]


class SampleTransform:
    """Dict-sample transform: a cacheable deterministic part, then a seeded random part.

    Input ``{"image": (C, *S), "label": (*S) or (1, *S), ...}`` (numpy or torch; the label
    is optional); output ``{"image": FloatTensor (C, *S'), "label": LongTensor (*S'), ...}``
    with other keys passed through. ``SegmentationDataset`` caches ``deterministic`` and
    reseeds ``random`` per item from torch's RNG, so seeded runs repeat exactly.
    """

    def __init__(self, preprocessing: Preprocessing, train: bool, seed: int | None = None):
        self.preprocessing = preprocessing
        self.train = train
        self.random = _random_part(preprocessing) if train else None
        if self.random is not None and seed is not None:
            self.random.set_random_state(seed)

    def deterministic(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = dict(sample)
        affine = out.pop("affine", None)
        image = torch.as_tensor(np.ascontiguousarray(sample["image"], dtype=np.float32))
        label = sample.get("label")
        if label is not None:
            label = torch.as_tensor(np.ascontiguousarray(label)).float()
            label = label if label.ndim == image.ndim else label[None]
        out["image"], label, _ = self.preprocessing._apply(image, label, affine)
        if label is None:
            out.pop("label", None)
            return out
        out["label"] = label
        pre = self.preprocessing
        if self.train and pre.spatial_dims == 3 and pre.patch_size is not None:
            from monai.transforms import FgBgToIndicesd, SpatialPadd

            out = SpatialPadd(("image", "label"), spatial_size=pre.patch_size)(out)
            out = FgBgToIndicesd("label")(out)
        return out

    def set_random_state(self, seed: int) -> None:
        if self.random is not None:
            self.random.set_random_state(seed)

    def augment(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Random part plus final conversion (works on a copy; the input is not changed)."""
        out = dict(sample)
        if self.random is not None:
            if "label" not in out:
                raise DataError("training samples need a label (mask).")
            with warnings.catch_warnings():  # masks without foreground: background crops
                warnings.filterwarnings("ignore", "Num foregrounds 0", UserWarning)
                out = self.random(out)
            out = out[0] if isinstance(out, list) else out
        return _finish(out)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return self.augment(self.deterministic(sample))


def _random_part(pre: Preprocessing):
    from monai.transforms import (
        Compose,
        RandCropByPosNegLabeld,
        RandFlipd,
        RandRotate90d,
        RandRotated,
    )

    keys = ("image", "label")
    if pre.spatial_dims == 2:
        steps = []
        if pre.image_size is None or pre.image_size[0] == pre.image_size[1]:
            steps.append(RandRotate90d(keys, prob=0.5, max_k=3))
        steps += [RandFlipd(keys, prob=0.5, spatial_axis=0),
                  RandFlipd(keys, prob=0.5, spatial_axis=1),
                  RandRotated(keys, range_x=math.radians(20), prob=0.5,
                              mode=("bilinear", "nearest"), padding_mode="zeros")]
        return Compose(steps)
    steps = []
    if pre.patch_size is not None:
        steps.append(RandCropByPosNegLabeld(keys, label_key="label", spatial_size=pre.patch_size,
                                            pos=1.0, neg=1.0, num_samples=1,
                                            fg_indices_key=_FG, bg_indices_key=_BG))
    steps += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
    return Compose(steps)


def _plain(x: Any) -> torch.Tensor:
    """Plain tensor (MONAI returns MetaTensors, which carry metadata through collation)."""
    return torch.as_tensor(x).as_subclass(torch.Tensor)


def _finish(sample: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in sample.items() if k not in (_FG, _BG)}
    out["image"] = _plain(out["image"]).float().clone()
    if "label" in out:
        label = _plain(out["label"])
        label = label[0] if label.ndim == out["image"].ndim else label
        out["label"] = label.round().long().clone()
    return out


def train_transform(preprocessing: Preprocessing, seed: int | None = None) -> SampleTransform:
    """Training transform: preprocessing + augmentation (see module docstring)."""
    return SampleTransform(preprocessing, train=True, seed=seed)


def eval_transform(preprocessing: Preprocessing) -> SampleTransform:
    """Evaluation transform: preprocessing only (3D: the whole volume)."""
    return SampleTransform(preprocessing, train=False)
