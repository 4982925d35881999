"""A bank of expert MLPs and the sparse dispatch that runs only the routed tokens.

Experts are ``C -> hidden -> C`` MLPs (hidden = 4C in the paper) with ReLU and dropout,
stored as stacked weight tensors ``(E, ...)``. Dispatch sorts the ``T*k`` (token, expert)
assignments by expert so that every expert sees one contiguous slice of rows, runs the
experts on those slices only (cost scales with ``top_k / num_experts``), and adds the
gate-weighted results back per token with one ``index_add``.

Large inputs (3D feature maps with hundreds of thousands of tokens) are processed in row
chunks so the ``(rows, hidden)`` activation stays small; while training, each chunk is
recomputed in the backward pass instead of being stored (activation checkpointing), which
keeps memory proportional to the tokens, not to ``tokens * hidden``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_ROWS = 8192
"""Rows of the sorted assignment list processed at once (``rows * hidden`` floats live)."""


class ExpertBank(nn.Module):
    """``num_experts`` independent MLPs ``C -> hidden -> C`` (ReLU, dropout on the hidden).

    Args:
        embed_dim: token width C.
        num_experts: number of experts E.
        mlp_ratio: hidden width as a multiple of C (4 in the paper).
        dropout: dropout probability applied after the ReLU.
    """

    def __init__(
        self, embed_dim: int, num_experts: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.1
    ) -> None:
        super().__init__()
        hidden = int(round(embed_dim * mlp_ratio))
        if hidden < 1:
            raise ValueError(f"mlp_ratio={mlp_ratio} gives an empty hidden layer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embed_dim = embed_dim
        self.hidden_dim = hidden
        self.num_experts = num_experts
        self.dropout = float(dropout)
        self.w1 = nn.Parameter(torch.empty(num_experts, embed_dim, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, embed_dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, embed_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init, expert by expert."""
        for w, b, fan_in in ((self.w1, self.b1, self.embed_dim), (self.w2, self.b2, self.hidden_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Run expert ``e`` on rows ``(R, C)`` → ``(R, C)``."""
        h = F.relu(torch.addmm(self.b1[e], x, self.w1[e]))
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout, training=True)
        return torch.addmm(self.b2[e], h, self.w2[e])

    def forward(
        self,
        x: torch.Tensor,
        indices: torch.Tensor,
        gates: torch.Tensor,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
    ) -> torch.Tensor:
        """Gate-weighted sum of the chosen experts' outputs.

        Args:
            x: tokens ``(T, C)``.
            indices: chosen experts ``(T, k)``.
            gates: their weights ``(T, k)``.
            chunk_rows: rows of the sorted assignment list run at once.

        Returns:
            ``(T, C)``: ``sum_j gates[t, j] * E_{indices[t, j]}(x[t])``.
        """
        T, k = indices.shape
        flat_expert = indices.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        token_of_row = torch.div(order, k, rounding_mode="floor")
        gate_of_row = gates.reshape(-1)[order]
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()

        use_checkpoint = torch.is_grad_enabled() and x.requires_grad or (
            torch.is_grad_enabled() and self.w1.requires_grad
        )
        pieces = []
        start = 0
        for e, count in enumerate(counts):
            for lo in range(start, start + count, chunk_rows):
                hi = min(lo + chunk_rows, start + count)
                rows = token_of_row[lo:hi]
                if use_checkpoint and count > chunk_rows:
                    y = checkpoint(self._gather_run, x, rows, e, use_reentrant=False)
                else:
                    y = self._gather_run(x, rows, e)
                pieces.append(y * gate_of_row[lo:hi, None])
            start += count
        out = torch.zeros_like(x)
        if pieces:
            out = out.index_add(0, token_of_row, torch.cat(pieces))
        return out

    def _gather_run(self, x: torch.Tensor, rows: torch.Tensor, e: int) -> torch.Tensor:
        return self.expert(e, x.index_select(0, rows))
