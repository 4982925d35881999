"""What the segmentation networks return when asked for more than logits.

A network's ``forward(x, attr)`` returns plain logits ``(B, K, *spatial)``. With
``return_routing=True`` or ``return_aux=True`` it returns a :class:`SegmentationOutput`
instead, whose ``routing`` lists one :class:`LayerRouting` per application of a MoE layer,
reshaped onto that layer's token grid so that it can be drawn as an image.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LayerRouting(NamedTuple):
    """Routing decisions of one MoE application, on its token grid.

    name: where the layer was applied, e.g. ``"encoder.block3"`` or ``"encoder.stage0"``.
    indices: ``(B, *grid, k)`` chosen experts per grid cell, best first.
    gates: ``(B, *grid, k)`` their softmax weights (sum to 1 over ``k``).
    grid_stride: input pixels (voxels) per grid cell along each spatial axis, e.g.
        ``(16, 16)`` for a ViT/16 token grid; multiply a grid index by it to get the
        input coordinate of the cell's corner.
    """

    name: str
    indices: torch.Tensor
    gates: torch.Tensor
    grid_stride: tuple[int, ...]


class SegmentationOutput(NamedTuple):
    """Full output of a segmentation network.

    logits: ``(B, K, *spatial)`` at the input's resolution.
    aux_loss: scalar, the sum of every MoE application's auxiliary (load-balancing) loss;
        zero when the balancing weights are zero (the default) or the network has no MoE.
    routing: one :class:`LayerRouting` per MoE application (in forward order) when
        ``return_routing=True``, otherwise ``None``. Empty for ``moe="none"``.
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor
    routing: list[LayerRouting] | None


def finish_output(
    logits: torch.Tensor,
    aux_loss: torch.Tensor,
    routing: list[LayerRouting],
    return_routing: bool,
    return_aux: bool,
) -> torch.Tensor | SegmentationOutput:
    """Return what the caller asked ``forward`` for (logits alone or the full tuple)."""
    if not (return_routing or return_aux):
        return logits
    return SegmentationOutput(logits, aux_loss, routing if return_routing else None)
