"""Residual U-Net (2D or 3D) with a layer-wise dMoE after every encoder stage.

Encoder: five stride-2 MONAI ``ResidualUnit`` stages (paper Table 5: 48, 48, 96, 192, 384
channels), each followed by its own dMoE (Oh et al. 2025, Eq. 2-5) applied to every
position of the stage's feature map, i.e. at strides 2, 4, 8, 16 and 32. Decoder: four ×2
transposed-convolution stages with skip connections to the encoder stages, a fifth back to
full resolution (``final_channels`` wide) that concatenates the input image, and a 1×1
convolution head.

Input size: every spatial side must be a multiple of 32 (five halvings); other sizes raise
a ValueError instead of being padded silently, so pad or crop before calling (MONAI
``DivisiblePad(k=32)``; sliding-window inference with a multiple-of-32 ROI does this).
With instance norm (the default) at least one side must be >= 64, so that the 1/32
bottleneck holds more than one voxel.

Attribute dropout: with ``moe="dmoe"`` and in training mode, each sample's attribute is
replaced by -1 ("unknown") with probability ``attribute_dropout`` before the first dMoE
layer, the same for all layers of that sample; this trains the unknown-attribute router.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..blocks.memory import run_stage
from ..blocks.resblocks import (
    ResidualDownStage,
    ResidualUpStage,
    check_norm,
    check_spatial_dims,
    conv_head,
)
from ..blocks.spec import MoESpec
from ..blocks.tokens import (
    apply_moe_to_feature_map,
    build_moe,
    check_moe_mode,
    prepare_attributes,
    zero_aux,
)
from ..registry import register_model
from .output import LayerRouting, SegmentationOutput, finish_output

NUM_STAGES = 5
DIVISOR = 2**NUM_STAGES


@register_model("resunet")
class ResUNet(nn.Module):
    """2D/3D residual U-Net with layer-wise dMoE.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: classes K.
        moe: ``"none"``, ``"moe"`` (attribute-blind) or ``"dmoe"``.
        num_attributes: attribute values (dMoE routers, plus one for unknown).
        channels: the five encoder stages' channels (``paper``: 48, 48, 96, 192, 384).
        final_channels: channels of the full-resolution stage before the head (kept small:
            it is the most expensive map in 3D).
        num_res_units: convolutions per encoder residual unit (decoder units use one).
        norm: ``"instance"`` or ``"batch"``.
        dropout: dropout inside the residual units.
        moe_spec: what every (d)MoE layer is made of (:class:`MoESpec`, or a dict of
            its fields; experts, top-k, expert dropout, balancing losses, attribute dropout).
        grad_checkpoint: recompute encoder/decoder stage activations in the backward pass
            instead of storing them (less memory for 3D paper-size patches; not stored in
            checkpoints).
    """

    transient_kwargs = {"grad_checkpoint": False}
    presets = {
        "paper": dict(channels=(48, 48, 96, 192, 384), final_channels=16),
        "small": dict(channels=(16, 32, 64, 128, 256), final_channels=16),
        "tiny": dict(channels=(8, 16, 32, 48, 64), final_channels=8),
    }

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        moe: str = "dmoe",
        num_attributes: int = 1,
        channels: Sequence[int] = (48, 48, 96, 192, 384),
        final_channels: int = 16,
        num_res_units: int = 2,
        norm: str = "instance",
        dropout: float = 0.0,
        moe_spec: MoESpec | Mapping[str, Any] | None = None,
        grad_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_moe_mode(moe)
        check_norm(norm)
        if in_channels < 1 or out_channels < 1 or num_attributes < 1:
            raise ValueError(
                f"in_channels, out_channels and num_attributes must be >= 1, got "
                f"{in_channels}, {out_channels}, {num_attributes}"
            )
        channels = tuple(int(c) for c in channels)
        if len(channels) != NUM_STAGES or min(channels) < 1 or final_channels < 1:
            raise ValueError(
                f"channels must be {NUM_STAGES} positive ints (one per stage) and final_channels "
                f">= 1, got {channels} and {final_channels}"
            )
        self.spatial_dims = spatial_dims
        self.norm = norm
        self.in_channels, self.out_channels = in_channels, out_channels
        self.moe_mode = moe
        self.moe_spec = spec = MoESpec.of(moe_spec)
        self.attribute_dropout = spec.attribute_dropout
        self.grad_checkpoint = bool(grad_checkpoint)
        unit = dict(norm=norm, dropout=dropout)

        self.encoder = nn.ModuleList()
        prev = in_channels
        for ch in channels:
            self.encoder.append(
                ResidualDownStage(spatial_dims, prev, ch, num_res_units=num_res_units, **unit)
            )
            prev = ch
        self.encoder_moe = nn.ModuleList(
            m for ch in channels if (m := build_moe(moe, ch, spec, num_attributes)) is not None
        )
        # decoder[j] brings stride 2^(j+2) back to 2^(j+1), fusing encoder stage j.
        self.decoder = nn.ModuleList(
            ResidualUpStage(spatial_dims, channels[j + 1], channels[j], channels[j], **unit)
            for j in range(NUM_STAGES - 1)
        )
        self.final_up = ResidualUpStage(
            spatial_dims, channels[0], in_channels, final_channels, **unit
        )
        self.head = conv_head(spatial_dims, final_channels, out_channels)

    def forward(
        self,
        x: torch.Tensor,
        attr: torch.Tensor | None = None,
        *,
        return_routing: bool = False,
        return_aux: bool = False,
    ) -> torch.Tensor | SegmentationOutput:
        """Segment a batch.

        Args:
            x: images ``(B, C_in, H, W[, D])``, every side a multiple of 32.
            attr: attribute indices ``(B,)`` long, ``-1`` = unknown; ``None`` = all unknown.
                Ignored unless ``moe="dmoe"``.
            return_routing: also return routing of each stage's dMoE ("encoder.stage{i}",
                grid stride ``2**(i+1)``).
            return_aux: return a :class:`SegmentationOutput` with the summed aux loss.

        Returns:
            Logits ``(B, K, H, W[, D])``, or a :class:`SegmentationOutput` if a flag is set.
        """
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            axes = "H, W" if self.spatial_dims == 2 else "H, W, D"
            raise ValueError(
                f"expected images (B, {self.in_channels}, {axes}), got {tuple(x.shape)}"
            )
        if any(s % DIVISOR for s in x.shape[2:]):
            raise ValueError(
                f"resunet needs every spatial size to be a multiple of {DIVISOR}, got "
                f"{tuple(x.shape[2:])}; pad or crop the input "
                f"(e.g. monai DivisiblePad(k={DIVISOR}))"
            )
        if self.norm == "instance" and math.prod(s // DIVISOR for s in x.shape[2:]) == 1:
            raise ValueError(
                f"input {tuple(x.shape[2:])} leaves a single voxel at the 1/{DIVISOR} bottleneck, "
                f"which instance norm cannot normalise; make one side >= {2 * DIVISOR} or "
                "build the model with norm='batch'"
            )
        attr = prepare_attributes(attr, x, self.moe_mode, self.attribute_dropout, self.training)
        aux = zero_aux(x)
        routing: list[LayerRouting] = []
        skips = []
        feat = x
        for i, stage in enumerate(self.encoder):
            feat = run_stage(stage, feat, checkpointed=self.grad_checkpoint and self.training)
            if self.encoder_moe:
                feat, loss, grid_info = apply_moe_to_feature_map(
                    self.encoder_moe[i], feat, attr, return_routing
                )
                aux = aux + loss
                if grid_info is not None:
                    stride = (2 ** (i + 1),) * self.spatial_dims
                    routing.append(LayerRouting(f"encoder.stage{i}", *grid_info, stride))
            skips.append(feat)
        feat = skips.pop()
        for j in reversed(range(NUM_STAGES - 1)):
            feat = run_stage(self.decoder[j], feat, skips[j],
                             checkpointed=self.grad_checkpoint and self.training)
        feat = self.final_up(feat, x)
        return finish_output(self.head(feat), aux, routing, return_routing, return_aux)
