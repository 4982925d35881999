"""One separate backbone per attribute group, routed by the attribute (paper baseline).

The explainer's efficiency comparison of Oh et al. 2025 trains one model per group; here
the group models live in one module (one checkpoint file), ``backbones[g]`` for attribute
index ``g``. A sample is segmented by its group's backbone only, so each backbone is
trained on its own group's samples.

Unknown attribute (index −1: missing, unseen, or "unknown" in the plugin): the **mean of
every group model's logits** (an ensemble of the group models). It needs no extra training,
and unlike picking the majority group's model it does not silently impose one group's
contouring policy. ``attribute_dropout`` (default 0 here) would route that share of
training samples through the ensemble, training every backbone on them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..blocks.tokens import check_attribute_dropout, check_moe_mode, drop_attributes, zero_aux
from ..registry import create_model, register_model
from .output import SegmentationOutput


@register_model("separate")
class SeparateModels(nn.Module):
    """``num_attributes`` independent backbones; the attribute picks the backbone.

    Args:
        spatial_dims, in_channels, out_channels: as for every registered network.
        moe: MoE mode *inside* each backbone (``"none"`` for the paper's baseline).
        num_attributes: number of groups = number of backbones.
        backbone: registered name of the group model (``"transunet"``, ``"resunet"``).
        backbone_preset: its preset.
        backbone_kwargs: further constructor arguments of the backbone (e.g. ``img_size``).
        attribute_dropout: probability, while training, of routing a sample through the
            unknown-attribute ensemble instead of its group's backbone.
    """

    presets = {"tiny": {"backbone_preset": "tiny"}, "small": {"backbone_preset": "small"},
               "paper": {"backbone_preset": "paper"}}

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        moe: str = "none",
        num_attributes: int = 1,
        backbone: str = "transunet",
        backbone_preset: str = "tiny",
        backbone_kwargs: dict[str, Any] | None = None,
        attribute_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_moe_mode(moe)
        if backbone == "separate":
            raise ValueError("backbone cannot be 'separate' itself; use transunet or resunet")
        if num_attributes < 1:
            raise ValueError(f"num_attributes must be >= 1 (one backbone per group), got "
                             f"{num_attributes}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.moe_mode = moe
        self.num_attributes = int(num_attributes)
        self.attribute_dropout = check_attribute_dropout(attribute_dropout)
        kwargs = dict(backbone_kwargs or {})
        self.backbones = nn.ModuleList(
            create_model(backbone, preset=backbone_preset, spatial_dims=spatial_dims,
                         in_channels=in_channels, out_channels=out_channels, moe=moe,
                         num_attributes=1, **kwargs)
            for _ in range(self.num_attributes)
        )

    def forward(
        self,
        x: torch.Tensor,
        attr: torch.Tensor | None = None,
        *,
        return_routing: bool = False,
        return_aux: bool = False,
    ) -> torch.Tensor | SegmentationOutput:
        """Segment a batch with each sample's group model.

        Args:
            x: images ``(B, C_in, *spatial)``.
            attr: group indices ``(B,)``; ``-1`` (or ``None`` = all) → mean of all
                backbones' logits.
            return_routing: routing of the backbones is not reported (empty list).
            return_aux: return a :class:`SegmentationOutput` (aux loss: sum over backbones).

        Returns:
            Logits ``(B, K, *spatial)``, or a :class:`SegmentationOutput` if a flag is set.
        """
        B = x.shape[0]
        if attr is None:
            attr = torch.full((B,), -1, dtype=torch.long, device=x.device)
        attr = attr.to(x.device).long()
        if attr.shape != (B,):
            raise ValueError(f"attr must be (B,) = ({B},), got {tuple(attr.shape)}")
        if B and (attr.min() < -1 or attr.max() >= self.num_attributes):
            raise ValueError(f"attribute indices must lie in [-1, {self.num_attributes}), got "
                             f"[{int(attr.min())}, {int(attr.max())}]")
        attr = drop_attributes(attr, self.attribute_dropout, self.training)
        aux = zero_aux(x)
        logits: torch.Tensor | None = None
        unknown = attr < 0
        for g, net in enumerate(self.backbones):  # a loop over groups, not over samples
            sel = (attr == g) | unknown
            if not bool(sel.any()):
                continue
            out = net(x[sel], None, return_aux=return_aux)
            part, loss = (out.logits, out.aux_loss) if return_aux else (out, None)
            if loss is not None:
                aux = aux + loss
            if logits is None:
                logits = part.new_zeros((B, *part.shape[1:]))
            # known samples take their own model's logits; unknown ones the mean of all
            scale = torch.where(unknown[sel], 1.0 / self.num_attributes, 1.0).to(part.dtype)
            logits = logits.index_add(0, sel.nonzero()[:, 0],
                                      part * scale.view(-1, *([1] * (part.dim() - 1))))
        if logits is None:  # empty batch
            logits = x.new_zeros((0, self.out_channels, *x.shape[2:]))
        if not (return_routing or return_aux):
            return logits
        return SegmentationOutput(logits, aux, [] if return_routing else None)
