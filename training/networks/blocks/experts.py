"""A bank of expert MLPs and the sparse dispatch that runs only the routed tokens.

Experts are ``C -> hidden -> C`` MLPs (hidden = 4C in the paper) with ReLU and dropout on
the hidden layer, stored as stacked weights ``(E, ...)``. Dispatch sorts the ``T*k``
(token, expert) assignments by expert so that each expert sees one contiguous run of rows,
runs every expert on its rows only (cost scales with ``top_k / num_experts``) and adds the
gate-weighted results back per token.

The forward and backward passes are fused in one autograd function that walks the sorted
rows in chunks of ``chunk_rows``: the ``(rows, hidden)`` activation of a chunk stays in
cache and is never stored; the backward pass recomputes it. Memory is therefore
``O(tokens * C)`` instead of ``O(tokens * k * hidden)``, which matters on 3D feature maps
with hundreds of thousands of tokens, and the five backward matrix products per chunk
reuse one ``dy @ W2^T`` for both the hidden gradient and the gate gradient.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_ROWS = 4096
"""Sorted assignment rows computed at once; ``rows * hidden`` floats stay live."""

KEEP_HIDDEN_BYTES = 64 * 2**20
"""Up to this size the hidden activations are stored for backward instead of recomputed."""


def _chunks(counts: list[int], chunk_rows: int):
    """Yield ``(expert, lo, hi)`` row ranges of the expert-sorted assignment list."""
    start = 0
    for e, count in enumerate(counts):
        for lo in range(start, start + count, chunk_rows):
            yield e, lo, min(lo + chunk_rows, start + count)
        start += count


def _dropout_mask(shape, p: float, seed: int, device) -> torch.Tensor:
    """Inverted-dropout mask regenerated identically in the backward pass."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    keep = torch.rand(shape, generator=gen, device=device) >= p
    return keep.to(torch.float32).mul_(1.0 / (1.0 - p))


def _unsort_sum(rows: torch.Tensor, inverse: torch.Tensor, tokens: int) -> torch.Tensor:
    """Expert-sorted rows ``(T*k, C)`` → per-token sums ``(T, C)`` (a gather, not a scatter)."""
    k = inverse.shape[0] // tokens
    unsorted = rows.index_select(0, inverse)
    return unsorted if k == 1 else unsorted.view(tokens, k, -1).sum(1)


def _accumulate(dw: torch.Tensor, db: torch.Tensor, inp: torch.Tensor, grad: torch.Tensor,
                first: bool) -> None:
    """``dw (+)= inp^T @ grad`` and ``db (+)= grad.sum(0)``, writing in place."""
    if first:
        torch.mm(inp.T, grad, out=dw)
        torch.sum(grad, 0, out=db)
    else:
        dw.addmm_(inp.T, grad)
        db += grad.sum(0)


class _SparseExperts(torch.autograd.Function):
    """``out[t] = sum_{rows r of t} gate[r] * MLP_{e(r)}(x[t])`` for expert-sorted rows."""

    @staticmethod
    def forward(ctx, x, rows_token, rows_gate, inverse, w1, b1, w2, b2, counts, chunk_rows, p,
                seed, training_graph):
        rows = rows_token.shape[0]
        y_rows = x.new_empty(rows, x.shape[1])
        # Small inputs (2D shapes) keep the hidden activations: the backward pass then
        # skips recomputing them. Large ones (3D maps) recompute, keeping memory O(T*C).
        keep = training_graph and rows * w1.shape[2] * x.element_size() <= KEEP_HIDDEN_BYTES
        kept = []
        for i, (e, lo, hi) in enumerate(_chunks(counts, chunk_rows)):
            h = torch.addmm(b1[e], x.index_select(0, rows_token[lo:hi]), w1[e]).relu_()
            if p > 0:
                h.mul_(_dropout_mask(h.shape, p, seed + i, x.device).to(h.dtype))
            y = torch.addmm(b2[e], h, w2[e], out=y_rows[lo:hi])
            y.mul_(rows_gate[lo:hi, None])
            if keep:
                kept.append(h)
        ctx.save_for_backward(x, rows_token, rows_gate, inverse, w1, b1, w2, b2, *kept)
        ctx.config = (counts, chunk_rows, p, seed, keep)
        return _unsort_sum(y_rows, inverse, x.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, rows_token, rows_gate, inverse, w1, b1, w2, b2, *kept = ctx.saved_tensors
        counts, chunk_rows, p, seed, keep = ctx.config
        need_x, _, need_gate, _, need_w1, need_b1, need_w2, need_b2 = ctx.needs_input_grad[:8]
        grad_out = grad_out.contiguous()
        dx_rows = x.new_empty(rows_token.shape[0], x.shape[1]) if need_x else None
        dgate = torch.empty_like(rows_gate) if need_gate else None
        # Weight gradients are written by the first chunk of each expert (no 4C*C zero fill,
        # which costs a tenth of the 2D backward) and accumulated by the later ones.
        dw1, db1 = torch.empty_like(w1), torch.empty_like(b1)
        dw2, db2 = torch.empty_like(w2), torch.empty_like(b2)
        started: set[int] = set()
        for i, (e, lo, hi) in enumerate(_chunks(counts, chunk_rows)):
            first = e not in started
            started.add(e)
            tok = rows_token[lo:hi]
            gate = rows_gate[lo:hi, None]
            xs = x.index_select(0, tok)
            if keep:
                h = kept[i]
            else:  # recompute the (dropped-out) hidden activations
                h = torch.addmm(b1[e], xs, w1[e]).relu_()
                if p > 0:
                    h.mul_(_dropout_mask(h.shape, p, seed + i, x.device).to(h.dtype))
            dyo = grad_out.index_select(0, tok)  # d out / d (gate * y)
            u = dyo @ w2[e].T  # (rows, hidden), shared by dgate and dh
            if need_gate:
                dgate[lo:hi] = (h * u).sum(1) + dyo @ b2[e]
            dy = dyo * gate
            _accumulate(dw2[e], db2[e], h, dy, first)
            dh = u.mul_(gate)  # = dy @ W2^T
            if p > 0:
                dh.mul_(_dropout_mask(h.shape, p, seed + i, x.device).to(dh.dtype))
            # ReLU backward: h (after dropout) is non-zero exactly where the gradient flows
            dh = torch.ops.aten.threshold_backward(dh, h, 0)
            _accumulate(dw1[e], db1[e], xs, dh, first)
            if need_x:
                torch.mm(dh, w1[e].T, out=dx_rows[lo:hi])
        for e in set(range(w1.shape[0])) - started:  # experts that received no token
            for g in (dw1, db1, dw2, db2):
                g[e].zero_()
        dx = _unsort_sum(dx_rows, inverse, x.shape[0]) if need_x else None
        return (
            dx, None, dgate, None,
            dw1 if need_w1 else None, db1 if need_b1 else None,
            dw2 if need_w2 else None, db2 if need_b2 else None,
            None, None, None, None, None,
        )  # fmt: skip


class ExpertBank(nn.Module):
    """``num_experts`` independent MLPs ``C -> hidden -> C`` (ReLU, dropout on the hidden).

    Args:
        embed_dim: token width C.
        num_experts: number of experts E.
        mlp_ratio: hidden width as a multiple of C (4 in the paper).
        dropout: dropout probability applied after the ReLU while training.
    """

    def __init__(
        self, embed_dim: int, num_experts: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.1
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
        for w, b, fan_in in ((self.w1, self.b1, self.embed_dim),
                             (self.w2, self.b2, self.hidden_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Run expert ``e`` on rows ``(R, C)`` → ``(R, C)`` (plain autograd; for reference use)."""
        h = torch.relu(torch.addmm(self.b1[e], x, self.w1[e]))
        if self.dropout and self.training:
            h = nn.functional.dropout(h, self.dropout, training=True)
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
            chunk_rows: sorted assignment rows computed at once.

        Returns:
            ``(T, C)`` with row t = ``sum_j gates[t, j] * E_{indices[t, j]}(x[t])``.
        """
        T, k = indices.shape
        flat_expert = indices.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        rows_token = torch.div(order, k, rounding_mode="floor")
        rows_gate = gates.reshape(-1)[order]
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()

        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        weights = [w.to(dtype) for w in (self.w1, self.b1, self.w2, self.b2)]
        p = self.dropout if self.training else 0.0
        seed = int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0
        with torch.autocast(x.device.type, enabled=False):
            out = _SparseExperts.apply(
                x.to(dtype).contiguous(), rows_token, rows_gate.to(dtype), inverse, *weights,
                counts, chunk_rows, p, seed, torch.is_grad_enabled(),
            )  # fmt: skip
        return out.to(x.dtype)
