"""The sparse dispatch of :class:`.experts.ExpertBank`: run each routed (token, expert)
pair through its expert and add the gate-weighted results per token.

Three paths compute the same function:

- ``"fused"`` (CPU, and CUDA fallback): one autograd function walks the sorted rows in
  chunks. Dropout is drawn once per call from the default generator as the positions of
  the dropped units (the geometric gaps between them, see :func:`draw_dropped`), which
  are zeroed in place and kept for the backward pass (8 bytes per dropped unit: 0.8 bytes
  per unit at ``p = 0.1``, and no pass over a mask); the ``1/(1-p)`` scale acts on the
  narrow ``(rows, C)`` side of the second product. Products go through oneDNN where torch
  has it (twice MKL's fp32 speed on AMD CPUs), on chunks padded to a few row counts so
  its kernels are built once. Small inputs keep their hidden activations for the
  backward pass; large ones (3D maps) recompute them chunk by chunk, so memory stays
  ``O(T*C)`` plus the dropped positions. The stored expert outputs give the gate gradient
  without a hidden-wide product.
- ``"grouped"`` (CUDA tensors, when torch has ``grouped_mm``): bf16 grouped GEMMs over
  the sorted rows with plain autograd.
- ``"padded"`` (CPU, few tokens): each expert's rows padded to one count, batched
  products in one autograd function (dropout as dropped positions, as the fused path):
  ~15 ops each way in all instead of a few dozen per expert, which dominate below about
  ``experts.PADDED_MAX_UNITS`` hidden units (the coarse stages of a 3D U-Net).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import huge_pages

DEFAULT_CHUNK_ROWS = 4096
"""Sorted assignment rows computed at once (at least); ``rows * hidden`` floats stay live."""

CHUNK_HIDDEN_UNITS = 2**20
"""With ``chunk_rows=None`` a chunk holds ``max(DEFAULT_CHUNK_ROWS, this // hidden)`` rows:
narrow experts (3D stages with C = 8..32) then take few chunks, so Python work stays small."""

KEEP_HIDDEN_BYTES = 64 * 2**20
"""Up to this size the hidden activations are stored for backward instead of recomputed."""

DRAW_AT_ONCE_UNITS = 2**24
"""Dropout for up to this many units is drawn in one piece (temporaries ~1.2 bytes per unit
at ``p = 0.1``); larger layers draw per chunk."""

_RANDOM_BITS = 16


def grouped_mm():
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


def draw_keep(out: torch.Tensor, p: float) -> torch.Tensor:
    """Fill bool ``out`` ``(R, W)`` with keep decisions (keep probability ``1-p``) in place.

    On CPU (and for large masks) the units :func:`draw_dropped` picks; elsewhere 16 random
    bits per unit (``p`` quantised to ``2**-16``).
    """
    n = out.numel()
    if out.device.type == "cpu" and p < 0.5 and out.is_contiguous() and n >= 4096:
        return out.view(-1).fill_(True).index_fill_(0, draw_dropped(n, p, out.device),
                                                    False).view(out.shape)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=out.device)
    bits.random_(-(2**63), None)  # 64 uniform bits each (the default generator)
    return torch.ge(bits.view(torch.int16)[:n].view(out.shape), _drop_threshold(p), out=out)


def draw_dropped(n: int, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Each of ``n`` units dropped independently with probability ``p``: the dropped ones'
    positions, increasing, int64 ``(about p * n,)``.

    Drawn as a Bernoulli process: the gaps between dropped units are geometric,
    ``floor(log(1 - U) / log(1 - p))`` kept units before each drop, so only about ``p * n``
    uniforms are drawn (the default generator), not a random number per unit.
    """
    if p <= 0 or n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    scale = 1.0 / math.log1p(-p)
    parts, start = [], 0  # units from ``start`` on are not decided yet
    while start < n:
        expected = (n - start) * p
        draws = int(expected + 8 * math.sqrt(expected) + 16)  # enough but ~1e-15 of the time
        # 1 - U in (0, 1], exact in float32; log, not log1p (not vectorised on CPU: 10x)
        log_u = torch.rand(draws, device=device).neg_().add_(1).log_()
        # kept units before each drop: >= 0, so the cast's truncation is the floor
        gaps = log_u.mul_(scale).to(torch.int64)
        dropped = gaps.add_(1).cumsum_(0).add_(start - 1)
        last = int(dropped[-1])
        if last >= n:
            dropped = dropped[: int(torch.searchsorted(dropped, n))]
        parts.append(dropped)
        start = last + 1
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _zero_at(t: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Zero the units of a contiguous ``t`` at flat positions ``dropped``, in place."""
    return t.view(-1).index_fill_(0, dropped, 0).view(t.shape)


def _chunks(counts: list[int], chunk_rows: int) -> list[tuple[int, int, int]]:
    """``(expert, lo, hi)`` row ranges of the expert-sorted assignment list."""
    out, start = [], 0
    for e, count in enumerate(counts):
        out.extend((e, lo, min(lo + chunk_rows, start + count))
                   for lo in range(start, start + count, chunk_rows))
        start += count
    return out


def _bucket(rows: int) -> int:
    """``rows`` rounded up to at most 1/32 more (a multiple of 8), onto one of 32 values per
    power of two: padded rows are wasted products (ViT experts: 1/16 of the layer's time at
    1/8), and each distinct row count costs one kernel build."""
    step = max(8, 2 ** (rows.bit_length() - 6))
    return -(-rows // step) * step


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x.index_select(0, index)`` for a contiguous ``(R, C)`` ``x``, bit for bit.

    Rows whose byte size is a multiple of 8 are copied as int64 words: on CPU, torch's
    float32 gather of 8-float rows (the 3D stage with C = 8) is about 4x slower than the
    same bytes as 4 int64 words; other widths run as fast either way.
    """
    row_bytes = x.shape[1] * x.element_size()
    if x.device.type != "cpu" or row_bytes % 8 or not x.is_contiguous():
        return x.index_select(0, index)
    return x.view(torch.int64).index_select(0, index).view(x.dtype)


def _mix(y_rows: torch.Tensor, inverse: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Expert-sorted rows ``(T*k, C)`` → ``sum_j gates[t, j] * rows[t, j]`` ``(T, C)``."""
    T, k = gates.shape
    rows = _rows(y_rows, inverse).view(T, k, -1)
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
    (ViT) run best through oneDNN with ``inp^T`` copied contiguous and ``grad`` as its
    transposed weight view (5 % faster than copying both); a narrow ``grad`` (``dW2``,
    ``b = C``) as ``(grad^T @ inp)^T`` with MKL (2-3x faster than oneDNN on strided
    inputs); a very narrow ``inp`` (``dW1`` of C <= 16) with MKL as is.
    """
    a, b = inp.shape[1], grad.shape[1]
    if a * b >= WIDE_WEIGHT_UNITS:  # grad as oneDNN's (transposed) weight: no copy of it
        return _linear(inp.T.contiguous(), grad.T)
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


def token_of(assignment: torch.Tensor, k: int) -> torch.Tensor:
    """The token of each flat assignment index ``t * k + j``: ``assignment // k``, as a shift
    when ``k`` is a power of two (int64 division is ~10x slower than a shift on CPU)."""
    if k & (k - 1) == 0:
        return assignment >> (k.bit_length() - 1)
    return torch.div(assignment, k, rounding_mode="floor")


RADIX_SORT_MIN = 32768
"""From this many elements torch sorts 1-D integer keys on CPU by radix sort (ATen's
``GRAIN_SIZE``), below it by comparisons (5x slower at 16k keys)."""


def sort_by_expert(indices: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flattened assignments ``indices (T, k)`` in expert order: the stable sorting
    permutation ``(T*k,)`` and the rows per expert ``(E,)``.

    On CPU with at most 255 experts and at least 4096 assignments the keys are sorted as
    uint8, padded with 255 (after every expert) to ``RADIX_SORT_MIN`` keys, so that torch
    takes its one-pass radix sort: 16k keys 0.51 -> 0.10 ms, 131k 1.15 -> 0.44 ms (int32
    keys). Otherwise int32 keys (twice as fast as int64).
    """
    flat = indices.reshape(-1)
    n = flat.numel()
    if flat.device.type == "cpu" and num_experts < 256 and n >= 4096:
        if n >= RADIX_SORT_MIN:
            key = flat.to(torch.uint8)
        else:
            key = torch.full((RADIX_SORT_MIN,), 255, dtype=torch.uint8)
            key[:n] = flat
        order = torch.argsort(key, stable=True)[:n]
    else:
        order = torch.argsort(flat.to(torch.int32), stable=True)
    return order, torch.bincount(flat, minlength=num_experts)


class Plan:
    """Sorted dispatch of one call: which rows go to which expert, chunked."""

    def __init__(self, indices: torch.Tensor, gates: torch.Tensor, num_experts: int,
                 chunk_rows: int) -> None:
        T, k = indices.shape
        self.order, counts = sort_by_expert(indices, num_experts)
        self.inverse = torch.empty_like(self.order).index_copy_(
            0, self.order, torch.arange(self.order.numel(), device=indices.device))
        self.rows_token = token_of(self.order, k)
        self.rows_gate = gates.detach().reshape(-1).index_select(0, self.order)
        self.counts = counts.tolist()  # one sync
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

    def dropped_per_chunk(self, keep: torch.Tensor) -> list[torch.Tensor]:
        """An expert-sorted keep mask ``(T*k, W)`` → each chunk's dropped units as flat
        positions into its ``(rows, W)`` block (the form the fused path draws)."""
        return [(~keep[lo:hi]).reshape(-1).nonzero().view(-1) for _, lo, hi in self.chunks]

    def draw_dropped(self, width: int, p: float, device: torch.device) -> list[torch.Tensor] | None:
        """Fresh dropout for ``(T*k, width)`` units as in :meth:`dropped_per_chunk`, drawn in
        one piece (a few dozen ops, not a few dozen per chunk); None above
        ``DRAW_AT_ONCE_UNITS`` (the caller draws chunk by chunk: smaller temporaries)."""
        units = self.order.numel() * width
        if units > DRAW_AT_ONCE_UNITS:
            return None
        dropped = draw_dropped(units, p, device)
        starts = [lo * width for _, lo, _ in self.chunks]
        cuts = torch.searchsorted(dropped, torch.tensor([*starts, units], device=device))
        cuts = cuts.tolist()
        return [dropped[a:b] - start for start, a, b in zip(starts, cuts, cuts[1:])]


class _SparseExperts(torch.autograd.Function):
    """``out[t] = sum_j gates[t, j] * MLP_{e(t, j)}(x[t])`` over expert-sorted rows.

    With dropout ``p`` and keep mask ``m``: ``hidden``: ``y = (relu(x W1 + b1) * m) W2 * s
    + b2``; ``output``: ``y = (relu(x W1 + b1) W2 + b2) * m * s``, ``s = 1 / (1 - p)``.
    """

    @staticmethod
    def forward(ctx, x, gates, w1, b1, w2, b2, plan, p, position, dropped, training_graph):
        C, H = x.shape[1], w1.shape[2]
        width = H if position == "hidden" else C
        scale = 1.0 / (1.0 - p) if p > 0 else 1.0
        draw = p > 0 and dropped is None
        if draw:  # for many units, drawn chunk by chunk below: smaller temporaries
            dropped = plan.draw_dropped(width, p, x.device)
            draw = dropped is None
            if draw:
                dropped = []
        y_rows = x.new_empty(plan.order.numel(), C)  # expert outputs before the gate
        # Small inputs keep the hidden activations: the backward pass then skips
        # recomputing them. Large ones (3D maps) recompute, keeping memory O(T*C).
        keep = training_graph and plan.order.numel() * H * x.element_size() <= KEEP_HIDDEN_BYTES
        kept = []
        for i, ((e, lo, hi), tok) in enumerate(zip(plan.chunks, plan.tokens)):
            n = hi - lo
            if draw:
                dropped.append(draw_dropped(n * width, p, x.device))
            xs = _rows(x, tok)
            h = _linear(xs, w1[e].T, b1[e], relu=True)  # (padded n, H)
            y = y_rows[lo:hi]
            if p > 0 and position == "hidden":
                _zero_at(h[:n], dropped[i])
                torch.add(b2[e], _linear(h, w2[e].T)[:n], alpha=scale, out=y)
            else:
                torch.add(_linear(h, w2[e].T)[:n], b2[e], out=y)
            if p > 0 and position == "output":
                _zero_at(y, dropped[i]).mul_(scale)
            if keep:
                kept.append((xs, h))
        if keep and position == "hidden":
            dropped = None  # the kept activations carry it (zero where dropped)
        ctx.save_for_backward(x, gates, w1, b1, w2, y_rows, *(t for pair in kept for t in pair))
        ctx.config = (plan, p, scale, position, keep, dropped)
        return _mix(y_rows, plan.inverse, gates)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, gates, w1, b1, w2, y_rows, *kept = ctx.saved_tensors
        plan, p, scale, position, keep, dropped = ctx.config
        need_x, need_gate = ctx.needs_input_grad[:2]
        grad_out = grad_out.contiguous()
        dx_rows = x.new_empty(y_rows.shape) if need_x else None
        dgate_rows = x.new_empty(y_rows.shape[0]) if need_gate else None
        # Weight gradients are written by the first chunk of each expert (no zero fill)
        # and accumulated by the later ones.
        dw1, db1 = huge_pages.empty_like(w1), torch.empty_like(b1)
        dw2, db2 = huge_pages.empty_like(w2), x.new_empty(w2.shape[0], w2.shape[2])
        started: set[int] = set()
        for i, ((e, lo, hi), tok) in enumerate(zip(plan.chunks, plan.tokens)):
            first = e not in started
            started.add(e)
            n = hi - lo
            if keep:
                xs, h = kept[2 * i], kept[2 * i + 1]
            else:  # recompute the (dropped-out) hidden activations
                xs = _rows(x, tok)
                h = _linear(xs, w1[e].T, b1[e], relu=True)
                if p > 0 and position == "hidden":
                    _zero_at(h[:n], dropped[i])
            dz = _rows(grad_out, tok)  # d out / d (gate * y), padded rows zeroed
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
                    _zero_at(dz[:n], dropped[i])
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
            rows = _rows(dx_rows, plan.inverse).view(T, k, -1)
            dx = rows[:, 0].clone()  # a sum over the k axis by adds (sum(1) is 3x slower)
            for j in range(1, k):
                dx += rows[:, j]
        if need_gate:
            dgates = dgate_rows.index_select(0, plan.inverse).view(gates.shape)
        return dx, dgates, dw1, db1, dw2, db2, None, None, None, None, None


def grouped_experts(x, gates, w1, b1, w2, b2, plan, p, position, mask):
    """The same function with bf16 grouped GEMMs and plain autograd (CUDA path); ``mask``:
    bool keep mask in sorted order or None (drawn here while ``p > 0``)."""
    gemm = grouped_mm()
    counts = torch.tensor(plan.counts, device=x.device)
    offs = counts.cumsum(0).to(torch.int32)
    expert_of_row = torch.repeat_interleave(torch.arange(len(plan.counts), device=x.device),
                                            counts)
    bf = torch.bfloat16
    xs = x.to(bf).index_select(0, plan.rows_token)
    h = torch.relu(gemm(xs, w1.to(bf), offs=offs) + b1.to(bf)[expert_of_row])
    if p > 0 and mask is None:
        width = h.shape[1] if position == "hidden" else x.shape[1]
        mask = draw_keep(torch.empty(h.shape[0], width, dtype=torch.bool, device=x.device), p)
    if p > 0 and position == "hidden":
        h = h * mask * (1.0 / (1.0 - p))
    y = gemm(h, w2.to(bf), offs=offs) + b2.to(bf)[expert_of_row]
    if p > 0 and position == "output":
        y = y * mask * (1.0 / (1.0 - p))
    T, k = gates.shape
    y = y.index_select(0, plan.inverse).view(T, k, -1).to(x.dtype)
    return (y * gates[..., None]).sum(1)


class _PaddedGrid:
    """Where each (token, expert) assignment sits in the padded ``(E, R)`` grid of rows:
    each expert's rows in token order, padded to ``R`` (the largest count, bucketed)."""

    def __init__(self, indices: torch.Tensor, num_experts: int) -> None:
        T, k = indices.shape
        order, counts = sort_by_expert(indices, num_experts)
        self.rows = _bucket(int(counts.max()))  # R
        expert_sorted = indices.reshape(-1).index_select(0, order)
        first_row = counts.cumsum(0) - counts  # each expert's first sorted row
        rank = torch.arange(T * k, device=indices.device) - first_row[expert_sorted]
        self.slot = torch.empty_like(order).index_copy_(0, order, expert_sorted * self.rows + rank)
        token = token_of(torch.arange(T * k, device=indices.device), k)
        # (E * R,) token of each grid row; padding rows read token 0 and are never read back
        self.token = torch.zeros(num_experts * self.rows, dtype=torch.long,
                                 device=indices.device).index_copy_(0, self.slot, token)

    def dropped(self, mask: torch.Tensor) -> torch.Tensor:
        """A token-order keep mask ``(T, k, W)`` → the grid's dropped units as flat positions
        into ``(E * R, W)`` (padding rows kept)."""
        T, k, W = mask.shape
        keep = torch.ones(self.token.numel(), W, dtype=torch.bool, device=mask.device)
        keep.index_copy_(0, self.slot, mask.reshape(T * k, W).bool())
        return (~keep).view(-1).nonzero().view(-1)


class _PaddedExperts(torch.autograd.Function):
    """The function of :class:`_SparseExperts` as batched products over the padded grid of
    :class:`_PaddedGrid`, with a hand-written backward: ~15 ops each way, where plain
    autograd ran ~40 forward plus a node per op (for few tokens, per-op cost is the time)."""

    @staticmethod
    def forward(ctx, x, gates, w1, b1, w2, b2, grid, p, position, dropped):
        T, C = x.shape
        E = w1.shape[0]
        scale = 1.0 / (1.0 - p) if p > 0 else 1.0
        xs = _rows(x, grid.token).view(E, grid.rows, C)
        h = torch.baddbmm(b1[:, None], xs, w1).relu_()  # (E, R, H)
        if p > 0 and position == "hidden":
            y = torch.baddbmm(b2[:, None], _zero_at(h, dropped), w2, alpha=scale)
        else:
            y = torch.baddbmm(b2[:, None], h, w2)  # (E, R, C)
            if p > 0:
                _zero_at(y, dropped).mul_(scale)
        rows = _rows(y.view(-1, C), grid.slot).view(T, -1, C)  # (T, k, C)
        ctx.save_for_backward(gates, w1, w2, xs, h, rows)
        ctx.config = (grid, p, scale, position, dropped)
        return torch.bmm(gates.unsqueeze(1), rows).view(T, C)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        gates, w1, w2, xs, h, rows = ctx.saved_tensors
        grid, p, scale, position, dropped = ctx.config
        T, k, C = rows.shape
        E, R, _ = xs.shape
        grad_out = grad_out.contiguous()
        dgates = torch.bmm(rows, grad_out.unsqueeze(2)).view(T, k)
        # d (E, R, C) grid outputs: each assignment's gate times grad_out, padding rows zero
        dy = grad_out.new_zeros(E * R, C).index_copy_(
            0, grid.slot, (gates.unsqueeze(2) * grad_out.unsqueeze(1)).view(T * k, C))
        dy = dy.view(E, R, C)
        if p > 0 and position == "output":
            _zero_at(dy, dropped).mul_(scale)
        db2 = dy.sum(1)
        if p > 0 and position == "hidden":
            dy_h = dy * scale  # y = s * (h W2) + b2
        else:
            dy_h = dy
        dw2 = torch.bmm(h.transpose(1, 2), dy_h)
        dh = torch.bmm(dy_h, w2.transpose(1, 2))
        # ReLU (and hidden dropout) backward: h is non-zero exactly where it flows
        torch.ops.aten.threshold_backward.grad_input(dh, h, 0, grad_input=dh)
        db1 = dh.sum(1)
        dw1 = torch.bmm(xs.transpose(1, 2), dh)
        dx = None
        if ctx.needs_input_grad[0]:
            dx_rows = _rows(torch.bmm(dh, w1.transpose(1, 2)).view(E * R, C), grid.slot)
            dx = dx_rows.view(T, k, C).sum(1)
        return dx, dgates, dw1, db1, dw2, db2, None, None, None, None


def padded_experts(x, indices, gates, w1, b1, w2, b2, p, position, mask):
    """The same function as :func:`fused_experts` over a padded ``(E, R, ·)`` grid of rows
    (each expert's rows, padded to the largest count ``R``): batched products, about 15 ops
    each way whatever the number of experts, where the fused path runs ~30 per expert (for
    few tokens, per-op overhead is the cost). ``mask``: bool keep mask ``(T, k, W)`` in token
    order, or None for a fresh draw while ``p > 0``. Padding rows read token 0, are never
    gathered back, and so get zero gradient."""
    T, C = x.shape
    if T == 0:
        return x.new_zeros(0, C)
    grid = _PaddedGrid(indices, w1.shape[0])
    dropped = None
    if p > 0:
        width = w1.shape[2] if position == "hidden" else C
        dropped = (grid.dropped(mask) if mask is not None
                   else draw_dropped(grid.token.numel() * width, p, x.device))
    return _PaddedExperts.apply(x.contiguous(), gates, w1, b1, w2, b2, grid, p, position,
                                dropped)


def fused_experts(x, gates, w1, b1, w2, b2, plan: Plan, p: float, position: str,
                  dropped: list[torch.Tensor] | None, training_graph: bool) -> torch.Tensor:
    """``sum_j gates[t, j] * MLP_{e(t, j)}(x[t])`` ``(T, C)`` over ``plan``'s expert-sorted rows
    (see :class:`_SparseExperts`); ``dropped``: each chunk's dropped units
    (:meth:`Plan.dropped_per_chunk`) or None (drawn here while ``p > 0``);
    ``training_graph``: autograd will run backward (keep activations)."""
    return _SparseExperts.apply(x, gates, w1, b1, w2, b2, plan, p, position, dropped,
                                training_graph)
