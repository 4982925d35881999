"""Parameter and FLOP counts of the segmentation networks, without running them for real.

Conventions (as in the paper's Table 7): one multiply-add = 2 FLOPs; batch size 1;
inference mode (no router noise, no dropout).

* The backbone is counted by :class:`torch.utils.flop_counter.FlopCounterMode` on a
  ``meta``-device copy of the model, so even the 3D paper preset at 384×384×128 costs
  nothing to "run" (shapes only; convolutions, matmuls and attention are counted, norms and
  element-wise ops are not).
* MoE layers cannot run on meta tensors (their dispatch depends on the routing), so while
  counting every :class:`DMoE` is replaced by the identity and its FLOPs are added
  analytically per application: ``tokens × (router + top_k × expert)`` with
  ``router = 2·C·E`` (clean logits only) and ``expert = 2·C·H + 2·H·C``; only the ``top_k``
  experts a token is routed to are counted.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .networks.blocks.moe import DMoE, MoEOutput


class FlopCount(NamedTuple):
    """FLOPs of one forward pass: ``total = backbone + moe``."""

    backbone: int
    moe: int

    @property
    def total(self) -> int:
        return self.backbone + self.moe


def count_params(model: nn.Module) -> int:
    """Number of parameters (works on ``meta`` models)."""
    return sum(p.numel() for p in model.parameters())


def moe_flops_per_token(layer: DMoE) -> int:
    """Inference FLOPs of one token through ``layer``: router + its ``top_k`` experts."""
    C, H = layer.experts.embed_dim, layer.experts.hidden_dim
    router = 2 * C * layer.num_experts
    expert = 2 * C * H + 2 * H * C
    return router + layer.top_k * expert


@contextmanager
def _moe_as_identity(model: nn.Module, tokens: list[tuple[DMoE, int]]) -> Iterator[None]:
    """Make every DMoE in ``model`` an identity that logs ``(layer, B*N)`` per call."""
    layers = [m for m in model.modules() if isinstance(m, DMoE)]

    def stub(layer: DMoE):
        def forward(x: torch.Tensor, attr=None, return_routing: bool = False) -> MoEOutput:
            tokens.append((layer, x.shape[0] * x.shape[1]))
            return MoEOutput(x, x.new_zeros((), dtype=torch.float32), None)

        return forward

    for layer in layers:
        layer.forward = stub(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> FlopCount:
    """FLOPs of one inference forward pass of ``model`` on an input of ``input_shape``.

    Args:
        model: a segmentation network, ideally built on the ``meta`` device
            (``with torch.device("meta"): model = create_model(...)``).
        input_shape: ``(B, C_in, H, W[, D])``.
    """
    device = next(model.parameters()).device
    x = torch.empty(tuple(input_shape), device=device)
    calls: list[tuple[DMoE, int]] = []
    was_training = model.training
    model.eval()
    try:
        with _moe_as_identity(model, calls), FlopCounterMode(display=False) as counter:
            with torch.no_grad():
                model(x)
    finally:
        model.train(was_training)
    moe = sum(n * moe_flops_per_token(layer) for layer, n in calls)
    return FlopCount(int(counter.get_total_flops()), int(moe))
