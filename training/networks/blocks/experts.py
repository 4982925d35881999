"""A bank of expert MLPs and the sparse dispatch that runs only the routed tokens.

Experts are ``C -> hidden -> C`` MLPs (hidden = 4C in the paper) with ReLU and dropout,
stored as stacked weights ``(E, ...)``. Dropout sits after the ReLU (``"hidden"``, the
default) or after the second linear layer (``"output"``, as in the official dMoE code).
Dispatch sorts the ``T*k`` (token, expert) assignments by expert so that each expert sees
one contiguous run of rows, runs every expert on its rows only (cost scales with
``top_k / num_experts``) and adds the gate-weighted results back per token.

The dispatch itself (four paths, chosen by :meth:`ExpertBank.select_path`) is in
:mod:`.expert_dispatch` and, for narrow experts on CPU, :mod:`.native_experts` (C).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .expert_dispatch import (
    CHUNK_HIDDEN_UNITS,
    DEFAULT_CHUNK_ROWS,
    Plan,
    fused_experts,
    grouped_experts,
    grouped_mm,
    padded_experts,
)
from .native_experts import native_available, native_experts

DROPOUT_POSITIONS = ("hidden", "output")
"""Where expert dropout acts: after the ReLU, or after the second linear layer."""

EXPERT_PATHS = ("auto", "fused", "grouped", "padded", "native")
"""Dispatch implementations; ``auto`` = ``grouped`` on CUDA when available; on CPU in
float32 ``native`` for narrow experts (``NATIVE_MAX_WIDTH``, or ``NATIVE_FEW_MAX_WIDTH`` for
few tokens) when its kernel builds, ``padded`` for other few tokens (``PADDED_MAX_UNITS``),
else ``fused``."""

NATIVE_MAX_WIDTH = 32
"""``auto`` runs the C kernel (``native``) for experts at most this narrow (C): the 65k- and
8k-token stages of the tiny 3D U-Net (C = 8, 16). Measured fwd+bwd, training mode, 2
threads: 65,536 tokens of C = 8 17.5 -> 8.0 ms, 8,192 of C = 16 5.4 -> 3.0 ms (against
``padded``); C = 32 ties with ``fused`` (8,192 tokens: 10.5 / 10.0 ms). Wider experts with
many tokens run faster as the fused path's products (32,768 tokens of C = 64: 103 ms
against 160), where each token would read its experts' weights from L2."""

NATIVE_FEW_MAX_WIDTH = 64
"""For few tokens (the ``padded`` range) the C kernel is faster up to this width (2 threads:
128 tokens of C = 48 0.76 -> 0.51 ms, 16 of C = 64 0.54 -> 0.35 ms)."""

PADDED_MAX_UNITS = 2**20
"""``auto`` runs the batched, padded products (``padded``) when ``tokens * experts * hidden``
is at most this: the coarse stages of a 3D U-Net (16-1024 tokens per batch of 4), where
the fused path's per-expert ops cost more than the padding (128 tokens of C = 48:
2.9 -> 1.4 ms forward+backward)."""


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute ``x`` in (autocast's, when it is on)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class ExpertBank(nn.Module):
    """``num_experts`` independent MLPs ``C -> hidden -> C`` with ReLU and dropout.

    Args:
        embed_dim: token width C.
        num_experts: number of experts E.
        mlp_ratio: hidden width as a multiple of C (4 in the paper).
        dropout: dropout probability while training.
        dropout_position: ``"hidden"`` (after the ReLU) or ``"output"`` (after the second
            linear layer, as in the official dMoE code).
    """

    def __init__(
        self,
        embed_dim: int,
        num_experts: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        dropout_position: str = "hidden",
    ) -> None:
        super().__init__()
        hidden = int(round(embed_dim * mlp_ratio))
        if embed_dim < 1 or hidden < 1:
            raise ValueError(f"need embed_dim >= 1 and a non-empty hidden layer, got "
                             f"embed_dim={embed_dim}, mlp_ratio={mlp_ratio}")
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(f"dropout_position must be one of {list(DROPOUT_POSITIONS)}, "
                             f"got {dropout_position!r}")
        self.embed_dim = embed_dim
        self.hidden_dim = hidden
        self.num_experts = num_experts
        self.dropout = float(dropout)
        self.dropout_position = dropout_position
        self.w1 = nn.Parameter(torch.empty(num_experts, embed_dim, hidden))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, embed_dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, embed_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init, expert by expert."""
        for w, b, fan_in in ((self.w1, self.b1, self.embed_dim),
                             (self.w2, self.b2, self.hidden_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    @property
    def dropout_width(self) -> int:
        """Units per assignment the dropout mask covers (hidden width or C)."""
        return self.hidden_dim if self.dropout_position == "hidden" else self.embed_dim

    def expert(self, e: int, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Run expert ``e`` on rows ``(R, C)`` → ``(R, C)`` (plain autograd; for reference use).

        ``keep``: bool ``(R, dropout_width)`` dropout mask to apply (``None``: fresh
        ``nn.functional.dropout`` while training).
        """
        p = self.dropout if self.training else 0.0

        def drop(t):
            if keep is not None:
                return t * keep / (1.0 - self.dropout)
            return F.dropout(t, p, training=True) if p > 0 else t

        h = torch.relu(torch.addmm(self.b1[e], x, self.w1[e]))
        if self.dropout_position == "hidden":
            h = drop(h)
        y = torch.addmm(self.b2[e], h, self.w2[e])
        return drop(y) if self.dropout_position == "output" else y

    def select_path(self, x: torch.Tensor, path: str = "auto") -> str:
        """The dispatch path ``forward`` takes for tokens ``x`` ``(T, C)``: ``"grouped"`` on CUDA
        (when torch has it); on CPU ``"native"`` for narrow float32 experts (when the C
        kernel builds), ``"padded"`` for few tokens; else ``"fused"`` (see ``EXPERT_PATHS``)."""
        if path not in EXPERT_PATHS:
            raise ValueError(f"path must be one of {list(EXPERT_PATHS)}, got {path!r}")
        if path != "auto":
            return path
        aligned = self.embed_dim % 8 == 0 and self.hidden_dim % 8 == 0  # 16-byte bf16 rows
        if x.is_cuda and aligned and grouped_mm() is not None:
            return "grouped"
        if x.is_cuda:
            return "fused"
        few = x.shape[0] * self.num_experts * self.hidden_dim <= PADDED_MAX_UNITS
        narrow = self.embed_dim <= (NATIVE_FEW_MAX_WIDTH if few else NATIVE_MAX_WIDTH)
        if narrow and _compute_dtype(x) == torch.float32 and native_available():
            return "native"
        return "padded" if few else "fused"

    def forward(
        self,
        x: torch.Tensor,
        indices: torch.Tensor,
        gates: torch.Tensor,
        chunk_rows: int | None = None,
        dropout_mask: torch.Tensor | None = None,
        path: str = "auto",
    ) -> torch.Tensor:
        """Gate-weighted sum of the chosen experts' outputs.

        Args:
            x: tokens ``(T, C)``.
            indices: chosen experts ``(T, k)``.
            gates: their weights ``(T, k)``.
            chunk_rows: sorted assignment rows computed at once (fused path); ``None``:
                ``max(DEFAULT_CHUNK_ROWS, CHUNK_HIDDEN_UNITS // hidden)``.
            dropout_mask: bool keep mask ``(T, k, dropout_width)`` to use instead of a fresh
                draw (tests compare against a reference with it); only while training with
                ``dropout > 0``.
            path: ``"auto"``, ``"fused"``, ``"grouped"``, ``"padded"`` or ``"native"`` (see
                :meth:`select_path`).

        Returns:
            ``(T, C)`` with row t = ``sum_j gates[t, j] * E_{indices[t, j]}(x[t])``.
        """
        T, k = indices.shape
        p = self.dropout if self.training else 0.0
        if dropout_mask is not None:
            if p == 0:
                raise ValueError("dropout_mask given, but dropout is off (eval mode or "
                                 "dropout=0); pass None")
            if dropout_mask.shape != (T, k, self.dropout_width):
                raise ValueError(f"dropout_mask must have shape {(T, k, self.dropout_width)}, "
                                 f"got {tuple(dropout_mask.shape)}")
        route = self.select_path(x, path)
        dtype = _compute_dtype(x)
        if route == "native":
            if x.is_cuda or dtype != torch.float32:
                raise ValueError(f"the native path runs float32 CPU tensors, got {dtype} on "
                                 f"{x.device}")
            if not native_available():
                raise RuntimeError("the native path's C kernel could not be built here (see "
                                   "the warning above); use path='auto'")
            with torch.autocast(x.device.type, enabled=False):
                return native_experts(x, indices, gates, self.w1, self.b1, self.w2, self.b2,
                                      p, self.dropout_position, dropout_mask)
        if chunk_rows is None:
            chunk_rows = max(DEFAULT_CHUNK_ROWS, CHUNK_HIDDEN_UNITS // self.hidden_dim)
        with torch.autocast(x.device.type, enabled=False):
            if route == "padded":
                weights = [w.to(dtype) for w in (self.w1, self.b1, self.w2, self.b2)]
                out = padded_experts(x.to(dtype), indices, gates.to(dtype), *weights, p,
                                     self.dropout_position, dropout_mask)
                return out.to(x.dtype)
        plan = Plan(indices, gates, self.num_experts, chunk_rows)
        mask = plan.sort_mask(dropout_mask) if dropout_mask is not None else None
        with torch.autocast(x.device.type, enabled=False):
            if route == "grouped":
                out = grouped_experts(x, gates.to(x.dtype), self.w1, self.b1, self.w2,
                                       self.b2, plan, p, self.dropout_position, mask)
                return out.to(x.dtype)
            weights = [w.to(dtype) for w in (self.w1, self.b1, self.w2, self.b2)]
            dropped = plan.dropped_per_chunk(mask) if mask is not None else None
            out = fused_experts(
                x.to(dtype).contiguous(), gates.to(dtype), *weights, plan, p,
                self.dropout_position, dropped, torch.is_grad_enabled(),
            )  # fmt: skip
        return out.to(x.dtype)
