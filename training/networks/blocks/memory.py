"""Activation (gradient) checkpointing for whole network stages."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_stage(stage: nn.Module, *inputs: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """``stage(*inputs)``; with ``checkpointed`` (and grad enabled) its activations are not
    stored but recomputed in the backward pass, trading compute for memory.

    The RNG state is replayed, so dropout masks match. Stages with BatchNorm would update
    their running statistics twice: use it on instance-/layer-normalised stages.
    """
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(stage, *inputs, use_reentrant=False)
    return stage(*inputs)
