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
