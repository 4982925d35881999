"""A deliberately plain dMoE forward (per-sample router loop, masked per-expert dispatch).

Used as ground truth for the optimised layer; it reads the layer's own parameters.
"""

from __future__ import annotations

import torch


def reference_dmoe(layer, x: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
    """Noise-free dMoE output ``(B, N, C)`` computed the slow, obvious way."""
    router, experts = layer.router, layer.experts
    out = []
    for b in range(x.shape[0]):
        a = int(attr[b])
        if router.num_attributes == 1:
            w = router.w_gate[0]
        elif a >= 0:
            w = router.w_gate[a]
        elif router.unknown_router:
            w = router.w_gate[router.num_attributes]
        else:
            w = router.w_gate[: router.num_attributes].mean(0)
        logits = x[b] @ w
        top, idx = logits.topk(router.top_k, dim=-1)
        gates = torch.softmax(top, dim=-1)
        y = torch.zeros_like(x[b])
        for e in range(experts.num_experts):
            chosen = idx == e  # (N, k)
            rows = chosen.any(-1)
            if rows.any():
                g = (gates * chosen).sum(-1)[rows]
                y = y.index_put((rows.nonzero()[:, 0],), g[:, None] * experts.expert(e, x[b][rows]),
                                accumulate=True)
        out.append(x[b] + y)
    return torch.stack(out)


def reference_experts(bank, x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor,
                      keep: torch.Tensor | None = None) -> torch.Tensor:
    """Expert mixture ``(T, C)`` with a boolean-mask loop over experts and slots, plain autograd.

    ``keep``: bool dropout mask ``(T, k, W)`` (W = hidden width for ``dropout_position``
    ``"hidden"``, C for ``"output"``), applied with the ``1/(1-p)`` scale; None = no dropout.
    """
    out = torch.zeros_like(x)
    scale = 1.0 / (1.0 - bank.dropout)
    for e in range(bank.num_experts):
        for j in range(indices.shape[1]):
            rows = (indices[:, j] == e).nonzero()[:, 0]
            if rows.numel() == 0:
                continue
            h = torch.relu(x[rows] @ bank.w1[e] + bank.b1[e])
            if keep is not None and bank.dropout_position == "hidden":
                h = h * keep[rows, j] * scale
            y = h @ bank.w2[e] + bank.b2[e]
            if keep is not None and bank.dropout_position == "output":
                y = y * keep[rows, j] * scale
            out = out.index_add(0, rows, gates[rows, j, None] * y)
    return out
