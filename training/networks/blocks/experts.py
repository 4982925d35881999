"""A bank of expert MLPs and the sparse dispatch that runs only the routed tokens.

Experts are ``C -> hidden -> C`` MLPs (hidden = 4C in the paper) with ReLU and dropout,
stored as stacked weights ``(E, ...)``. Dropout sits after the ReLU (``"hidden"``, the
default) or after the second linear layer (``"output"``, as in the official dMoE code).
Dispatch sorts the ``T*k`` (token, expert) assignments by expert so that each expert sees
one contiguous run of rows, runs every expert on its rows only (cost scales with
``top_k / num_experts``) and adds the gate-weighted results back per token.

Two paths compute the same function:

- ``"fused"`` (CPU, and CUDA fallback): one autograd function walks the sorted rows in
  chunks. The dropout mask is drawn once per call from the default generator (16 random
  bits per unit: drop probability quantised to ``2**-16``), stored as one byte per unit
  and reused by the backward pass; the ``1/(1-p)`` scale acts on the narrow ``(rows, C)``
  side of the second product. Products go through oneDNN where torch has it (twice
  MKL's fp32 speed on AMD CPUs), on chunks padded to a few row counts so its kernels are
  built once. Small inputs keep their hidden activations for the backward pass; large
  ones (3D maps) recompute them chunk by chunk, so memory stays ``O(T*C)`` plus the byte
  mask. The stored expert outputs give the gate gradient without a hidden-wide product.
- ``"grouped"`` (CUDA tensors, when torch has ``grouped_mm``): bf16 grouped GEMMs over
  the sorted rows with plain autograd.
- ``"dense"`` (CPU, few tokens): every expert on every token, gates zero outside the top
  k, plain autograd; no sorting or per-expert bookkeeping, which dominate below about
  ``DENSE_MAX_UNITS`` hidden units (the coarse stages of a 3D U-Net).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_ROWS = 4096
"""Sorted assignment rows computed at once (at least); ``rows * hidden`` floats stay live."""

CHUNK_HIDDEN_UNITS = 2**20
"""With ``chunk_rows=None`` a chunk holds ``max(DEFAULT_CHUNK_ROWS, this // hidden)`` rows:
narrow experts (3D stages with C = 8..32) then take few chunks, so Python work stays small."""

KEEP_HIDDEN_BYTES = 64 * 2**20
"""Up to this size the hidden activations are stored for backward instead of recomputed."""

DROPOUT_POSITIONS = ("hidden", "output")
"""Where expert dropout acts: after the ReLU, or after the second linear layer."""

EXPERT_PATHS = ("auto", "fused", "grouped", "dense")
"""Dispatch implementations; ``auto`` = ``grouped`` on CUDA when available, ``dense`` for
few tokens (``DENSE_MAX_UNITS``), else ``fused``."""

DENSE_MAX_UNITS = 2**17
"""``auto`` runs every expert on every token (``dense``) when ``tokens * experts * hidden``
is at most this: the deep, coarse stages of a 3D U-Net (16-128 tokens), where sorting and
per-expert bookkeeping cost more than the ``E/k``-fold products."""

_RANDOM_BITS = 16


def _grouped_mm():
    """torch's grouped GEMM (``F.grouped_mm`` or ``torch._grouped_mm``), or None."""
    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _onednn_linear():
    """oneDNN's fused linear (+ReLU) op for dense CPU tensors, or None if torch lacks it.

    On CPUs where MKL's fp32 GEMM takes a slower code path (AMD Zen: about half of
    oneDNN's throughput at the expert shapes here), this is the fast fp32/bf16 product.
    """
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_LINEAR = _onednn_linear()
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            relu: bool = False) -> torch.Tensor:
    """``x @ weight.T (+ bias) (then ReLU)`` for ``x (R, in)``, ``weight (out, in)``."""
    if _LINEAR is not None and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES:
        return _LINEAR(x, weight, bias, "relu" if relu else "none", [], "")
    y = x @ weight.T if bias is None else torch.addmm(bias, x, weight.T)
    return y.relu_() if relu else y



def _drop_threshold(p: float) -> int:
    """int16 threshold: a unit is kept where its 16 random bits (as int16) are ``>=`` it."""
    return round(p * 2**_RANDOM_BITS) - 2 ** (_RANDOM_BITS - 1)


def _draw_keep(out: torch.Tensor, p: float) -> torch.Tensor:
    """Fill bool ``out`` ``(R, W)`` with keep decisions (keep probability ``1-p``) in place."""
    n = out.numel()
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=out.device)
    bits.random_(-(2**63), None)  # 64 uniform bits each (the default generator)
    return torch.ge(bits.view(torch.int16)[:n].view(out.shape), _drop_threshold(p), out=out)


def _chunks(counts: list[int], chunk_rows: int) -> list[tuple[int, int, int]]:
    """``(expert, lo, hi)`` row ranges of the expert-sorted assignment list."""
    out, start = [], 0
    for e, count in enumerate(counts):
        out.extend((e, lo, min(lo + chunk_rows, start + count))
                   for lo in range(start, start + count, chunk_rows))
        start += count
    return out


def _bucket(rows: int) -> int:
    """``rows`` rounded up to at most 1/8 more, onto one of 8 values per power of two."""
    step = max(16, 2 ** (rows.bit_length() - 4))
    return -(-rows // step) * step


def _mix(y_rows: torch.Tensor, inverse: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Expert-sorted rows ``(T*k, C)`` → ``sum_j gates[t, j] * rows[t, j]`` ``(T, C)``."""
    T, k = gates.shape
    rows = y_rows.index_select(0, inverse).view(T, k, -1)
    out = rows[:, 0] * gates[:, :1]
    for j in range(1, k):
        out.addcmul_(rows[:, j], gates[:, j : j + 1])
    return out


WIDE_WEIGHT_UNITS = 2**18
"""Weight gradients with at least this many entries (ViT experts) take the contiguous path
of :func:`_weight_grad`."""


def _weight_grad(inp: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``inp^T @ grad`` ``(a, b)`` for ``inp (n, a)``, ``grad (n, b)`` (maybe a transposed view).

    The fastest formulation depends on the shape (measured on CPU, one thread): wide weights
    (ViT) run best through oneDNN on contiguous transposes; a narrow ``grad`` (``dW2``,
    ``b = C``) as ``(grad^T @ inp)^T`` with MKL (2-3x faster than oneDNN on strided
    inputs); a very narrow ``inp`` (``dW1`` of C <= 16) with MKL as is.
    """
    a, b = inp.shape[1], grad.shape[1]
    if a * b >= WIDE_WEIGHT_UNITS:
        return _linear(inp.T.contiguous(), grad.T.contiguous())
    if b < a:
        return torch.mm(grad.T, inp).T
    if a <= 16:
        return torch.mm(inp.T, grad)
    return _linear(inp.T, grad.T)


def _accumulate(dw: torch.Tensor, inp: torch.Tensor, grad: torch.Tensor, first: bool) -> None:
    """``dw (+)= inp^T @ grad`` in place."""
    prod = _weight_grad(inp, grad)
    if first:
        dw.copy_(prod)
    else:
        dw += prod


def _accumulate_bias(db: torch.Tensor, grad: torch.Tensor, first: bool) -> None:
    """``db (+)= grad.sum(0)`` in place."""
    if first:
        torch.sum(grad, 0, out=db)
    else:
        db += grad.sum(0)


class _Plan:
    """Sorted dispatch of one call: which rows go to which expert, chunked."""

    def __init__(self, indices: torch.Tensor, gates: torch.Tensor, num_experts: int,
                 chunk_rows: int) -> None:
        T, k = indices.shape
        flat = indices.reshape(-1)
        self.order = torch.argsort(flat, stable=True)
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(self.order.numel(), device=flat.device)
        self.rows_token = torch.div(self.order, k, rounding_mode="floor")
        self.rows_gate = gates.detach().reshape(-1)[self.order]
        self.counts = torch.bincount(flat, minlength=num_experts).tolist()  # one sync
        self.chunks = _chunks(self.counts, chunk_rows)
        # Token index of every chunk row, padded (with the chunk's first token) to a few
        # row counts: oneDNN builds a kernel per GEMM shape (~1 ms each), so the ragged
        # last chunk of each expert would cost a kernel build per call. Padded rows carry
        # zero gradient and their outputs are dropped.
        self.tokens = []
        for _, lo, hi in self.chunks:
            pad = _bucket(hi - lo) - (hi - lo)
            tok = self.rows_token[lo:hi]
            self.tokens.append(torch.cat([tok, tok[:1].expand(pad)]) if pad else tok)

    def sort_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A token-order mask ``(T, k, W)`` → expert-sorted ``(T*k, W)`` bool."""
        return mask.reshape(self.order.numel(), -1).index_select(0, self.order).bool()


class _SparseExperts(torch.autograd.Function):
    """``out[t] = sum_j gates[t, j] * MLP_{e(t, j)}(x[t])`` over expert-sorted rows.

    With dropout ``p`` and keep mask ``m``: ``hidden``: ``y = (relu(x W1 + b1) * m) W2 * s
    + b2``; ``output``: ``y = (relu(x W1 + b1) W2 + b2) * m * s``, ``s = 1 / (1 - p)``.
    """

    @staticmethod
    def forward(ctx, x, gates, w1, b1, w2, b2, plan, p, position, mask, training_graph):
        rows, width = plan.order.numel(), (w1.shape[2] if position == "hidden" else x.shape[1])
        scale = 1.0 / (1.0 - p) if p > 0 else 1.0
        draw = p > 0 and mask is None
        if draw:
            mask = torch.empty(rows, width, dtype=torch.bool, device=x.device)
        y_rows = x.new_empty(rows, x.shape[1])  # expert outputs before the gate
        # Small inputs (2D shapes) keep the hidden activations: the backward pass then
        # skips recomputing them. Large ones (3D maps) recompute, keeping memory O(T*C).
        keep = training_graph and rows * w1.shape[2] * x.element_size() <= KEEP_HIDDEN_BYTES
        kept = []
        for (e, lo, hi), tok in zip(plan.chunks, plan.tokens):
            n = hi - lo
            if draw:
                _draw_keep(mask[lo:hi], p)
            xs = x.index_select(0, tok)
            h = _linear(xs, w1[e].T, b1[e], relu=True)  # (padded n, H)
            y = y_rows[lo:hi]
            if p > 0 and position == "hidden":
                h[:n].mul_(mask[lo:hi].view(torch.uint8))
                torch.add(b2[e], _linear(h, w2[e].T)[:n], alpha=scale, out=y)
            else:
                torch.add(_linear(h, w2[e].T)[:n], b2[e], out=y)
            if p > 0 and position == "output":
                y.mul_(mask[lo:hi].view(torch.uint8)).mul_(scale)
            if keep:
                kept.append((xs, h))
        if keep and position == "hidden":
            mask = None  # the kept activations carry it (zero where dropped)
        ctx.save_for_backward(x, gates, w1, b1, w2, y_rows, *(t for pair in kept for t in pair))
        ctx.config = (plan, p, scale, position, keep, mask)
        return _mix(y_rows, plan.inverse, gates)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, gates, w1, b1, w2, y_rows, *kept = ctx.saved_tensors
        plan, p, scale, position, keep, mask = ctx.config
        need_x, need_gate = ctx.needs_input_grad[:2]
        grad_out = grad_out.contiguous()
        dx_rows = x.new_empty(y_rows.shape) if need_x else None
        dgate_rows = x.new_empty(y_rows.shape[0]) if need_gate else None
        # Weight gradients are written by the first chunk of each expert (no zero fill)
        # and accumulated by the later ones.
        dw1, db1 = torch.empty_like(w1), torch.empty_like(b1)
        dw2, db2 = torch.empty_like(w2), x.new_empty(w2.shape[0], w2.shape[2])
        started: set[int] = set()
        for i, ((e, lo, hi), tok) in enumerate(zip(plan.chunks, plan.tokens)):
            first = e not in started
            started.add(e)
            n = hi - lo
            if keep:
                xs, h = kept[2 * i], kept[2 * i + 1]
            else:  # recompute the (dropped-out) hidden activations
                xs = x.index_select(0, tok)
                h = _linear(xs, w1[e].T, b1[e], relu=True)
                if p > 0 and position == "hidden":
                    h[:n].mul_(mask[lo:hi].view(torch.uint8))
            dz = grad_out.index_select(0, tok)  # d out / d (gate * y), padded rows zeroed
            dz[n:] = 0
            if need_gate:
                torch.linalg.vecdot(dz[:n], y_rows[lo:hi], out=dgate_rows[lo:hi])
            gate = plan.rows_gate[lo:hi, None]
            if p > 0 and position == "hidden":  # y = s * (h W2) + b2
                dz[:n].mul_(gate)
                _accumulate_bias(db2[e], dz, first)
                dz.mul_(scale)
            else:  # y = s * m * (h W2 + b2), or s = 1 without dropout
                dz[:n].mul_(gate * scale if p > 0 else gate)
                if p > 0:
                    dz[:n].mul_(mask[lo:hi].view(torch.uint8))
                _accumulate_bias(db2[e], dz, first)
            _accumulate(dw2[e], h, dz, first)
            dh = _linear(dz, w2[e])
            # ReLU (and hidden dropout) backward: h is non-zero exactly where it flows
            torch.ops.aten.threshold_backward.grad_input(dh, h, 0, grad_input=dh)
            _accumulate(dw1[e], xs, dh, first)
            _accumulate_bias(db1[e], dh, first)
            if need_x:
                dx_rows[lo:hi] = _linear(dh, w1[e])[:n]
        for e in set(range(w1.shape[0])) - started:  # experts that received no token
            for g in (dw1, db1, dw2, db2):
                g[e].zero_()
        dx = dgates = None
        if need_x:
            T, k = gates.shape
            rows = dx_rows.index_select(0, plan.inverse).view(T, k, -1)
            dx = rows[:, 0].clone()  # a sum over the k axis by adds (sum(1) is 3x slower)
            for j in range(1, k):
                dx += rows[:, j]
        if need_gate:
            dgates = dgate_rows.index_select(0, plan.inverse).view(gates.shape)
        return dx, dgates, dw1, db1, dw2, db2, None, None, None, None, None


def _grouped_experts(x, gates, w1, b1, w2, b2, plan, p, position, mask):
    """The same function with bf16 grouped GEMMs and plain autograd (CUDA path)."""
    grouped_mm = _grouped_mm()
    counts = torch.tensor(plan.counts, device=x.device)
    offs = counts.cumsum(0).to(torch.int32)
    expert_of_row = torch.repeat_interleave(torch.arange(len(plan.counts), device=x.device),
                                            counts)
    bf = torch.bfloat16
    xs = x.to(bf).index_select(0, plan.rows_token)
    h = torch.relu(grouped_mm(xs, w1.to(bf), offs=offs) + b1.to(bf)[expert_of_row])
    if p > 0 and mask is None:
        width = h.shape[1] if position == "hidden" else x.shape[1]
        mask = _draw_keep(torch.empty(h.shape[0], width, dtype=torch.bool, device=x.device), p)
    if p > 0 and position == "hidden":
        h = h * mask * (1.0 / (1.0 - p))
    y = grouped_mm(h, w2.to(bf), offs=offs) + b2.to(bf)[expert_of_row]
    if p > 0 and position == "output":
        y = y * mask * (1.0 / (1.0 - p))
    T, k = gates.shape
    y = y.index_select(0, plan.inverse).view(T, k, -1).to(x.dtype)
    return (y * gates[..., None]).sum(1)


def _dense_experts(x, indices, gates, w1, b1, w2, b2, p, position, mask):
    """The same function with every expert on every token and a gate matrix that is zero
    outside the top k (plain autograd; for few tokens). ``mask``: bool keep mask
    ``(T, k, W)`` in token order, or None for a fresh draw while ``p > 0``."""
    T, C = x.shape
    E, _, H = w1.shape
    full = x.new_zeros(T, E).scatter(1, indices, gates)  # (T, E)
    h = torch.relu(x @ w1.permute(1, 0, 2).reshape(C, E * H) + b1.reshape(-1)).view(T, E, H)
    if p > 0:
        width = H if position == "hidden" else C
        keep = torch.ones(T, E, width, dtype=torch.bool, device=x.device)
        if mask is None:
            _draw_keep(keep, p)
        else:  # the given decisions for the chosen experts; the others are gated out
            keep.scatter_(1, indices[..., None].expand(-1, -1, width), mask)
        keep = keep.to(x.dtype) * (1.0 / (1.0 - p))
        if position == "hidden":
            h = h * keep
    y = torch.bmm(h.transpose(0, 1), w2).transpose(0, 1) + b2  # (T, E, C)
    if p > 0 and position == "output":
        y = y * keep
    return torch.bmm(full[:, None], y)[:, 0]


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
        (when torch has it), ``"dense"`` on CPU for few tokens, else ``"fused"``."""
        if path not in EXPERT_PATHS:
            raise ValueError(f"path must be one of {list(EXPERT_PATHS)}, got {path!r}")
        if path != "auto":
            return path
        aligned = self.embed_dim % 8 == 0 and self.hidden_dim % 8 == 0  # 16-byte bf16 rows
        if x.is_cuda and aligned and _grouped_mm() is not None:
            return "grouped"
        few = x.shape[0] * self.num_experts * self.hidden_dim <= DENSE_MAX_UNITS
        return "dense" if few and not x.is_cuda else "fused"

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
            path: ``"auto"``, ``"fused"`` or ``"grouped"`` (see :meth:`select_path`).

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
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        if chunk_rows is None:
            chunk_rows = max(DEFAULT_CHUNK_ROWS, CHUNK_HIDDEN_UNITS // self.hidden_dim)
        with torch.autocast(x.device.type, enabled=False):
            if route == "dense":
                weights = [w.to(dtype) for w in (self.w1, self.b1, self.w2, self.b2)]
                out = _dense_experts(x.to(dtype), indices, gates.to(dtype), *weights, p,
                                     self.dropout_position, dropout_mask)
                return out.to(x.dtype)
        plan = _Plan(indices, gates, self.num_experts, chunk_rows)
        mask = plan.sort_mask(dropout_mask) if dropout_mask is not None else None
        with torch.autocast(x.device.type, enabled=False):
            if route == "grouped":
                out = _grouped_experts(x, gates.to(x.dtype), self.w1, self.b1, self.w2,
                                       self.b2, plan, p, self.dropout_position, mask)
                return out.to(x.dtype)
            weights = [w.to(dtype) for w in (self.w1, self.b1, self.w2, self.b2)]
            out = _SparseExperts.apply(
                x.to(dtype).contiguous(), gates.to(dtype), *weights, plan, p,
                self.dropout_position, mask, torch.is_grad_enabled(),
            )  # fmt: skip
        return out.to(x.dtype)
