"""2D/3D residual encoder and decoder stages built from MONAI blocks.

One code path for both dimensionalities: every block takes ``spatial_dims`` (MONAI's
``ResidualUnit``, ``Convolution`` and ``UpSample``). Feature maps are ``(B, C, H, W[, D])``.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from torch import nn

NORMS = {"instance": "INSTANCE", "batch": "BATCH"}
"""Normalisation names accepted by the networks, mapped to MONAI's ``Norm`` factory."""


def check_norm(norm: str) -> str:
    """MONAI name of ``norm`` (``"instance"`` or ``"batch"``); ValueError otherwise."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {norm!r}")
    return NORMS[norm]


def check_spatial_dims(spatial_dims: int, allowed: tuple[int, ...] = (2, 3)) -> int:
    if spatial_dims not in allowed:
        raise ValueError(f"spatial_dims must be one of {list(allowed)}, got {spatial_dims!r}")
    return spatial_dims


class ResidualDownStage(nn.Module):
    """Stride-2 residual stage: ``(B, C_in, *S)`` → ``(B, C_out, *S/2)``.

    A MONAI ``ResidualUnit`` whose first convolution has stride 2 and whose residual path
    is a strided convolution (as in MONAI's ``UNet`` with ``num_res_units > 0``).

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: channel counts.
        num_res_units: convolutions in the unit (>= 1).
        norm: ``"instance"`` or ``"batch"``.
        dropout: dropout probability inside the unit.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        num_res_units: int = 2,
        norm: str = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if num_res_units < 1:
            raise ValueError(f"num_res_units must be >= 1, got {num_res_units}")
        self.unit = ResidualUnit(
            spatial_dims, in_channels, out_channels, strides=2, kernel_size=3,
            subunits=num_res_units, act="PRELU", norm=check_norm(norm), dropout=dropout or None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W[, D])`` → ``(B, C_out, H/2, W/2[, D/2])``."""
        return self.unit(x)


class ResidualUpStage(nn.Module):
    """×2 transposed-convolution upsampling, concatenation with a skip, residual fusion.

    ``(B, C_in, *S)`` and skip ``(B, C_skip, *2S)`` → ``(B, C_out, *2S)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the coarser map.
        skip_channels: channels of the skip connection (0 = no skip).
        out_channels: output channels.
        num_res_units: convolutions in the fusing unit (>= 1).
        norm: ``"instance"`` or ``"batch"``.
        dropout: dropout probability inside the unit.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        num_res_units: int = 1,
        norm: str = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        self.up = UpSample(
            spatial_dims, in_channels, out_channels, scale_factor=2, kernel_size=2, mode="deconv"
        )
        self.skip_channels = skip_channels
        self.fuse = ResidualUnit(
            spatial_dims, out_channels + skip_channels, out_channels, strides=1, kernel_size=3,
            subunits=max(num_res_units, 1), act="PRELU", norm=check_norm(norm),
            dropout=dropout or None,
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``(B, C_in, *S)``, ``skip`` ``(B, C_skip, *2S)`` → ``(B, C_out, *2S)``."""
        y = self.up(x)
        if skip is not None:
            y = torch.cat([y, skip], dim=1)
        return self.fuse(y)


def conv_norm_act(
    spatial_dims: int, in_channels: int, out_channels: int, norm: str = "batch", act: str = "RELU"
) -> Convolution:
    """3×3 convolution + normalisation + activation (TransUNet's ``Conv2dReLU``)."""
    return Convolution(
        spatial_dims, in_channels, out_channels, kernel_size=3, act=act, norm=check_norm(norm),
        bias=False,
    )


def conv_head(spatial_dims: int, in_channels: int, out_channels: int) -> Convolution:
    """1×1 convolution producing logits (no normalisation or activation)."""
    return Convolution(spatial_dims, in_channels, out_channels, kernel_size=1, conv_only=True)
