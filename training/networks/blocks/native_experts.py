"""The ``"native"`` dispatch path of :class:`.experts.ExpertBank`: narrow experts on CPU,
token by token, in C (``native_experts.c``, built on first use by :mod:`.native_build`).

For the wide, shallow feature maps of a 3D U-Net (65k tokens of C = 8 per batch) the
sorted, chunked products of the fused path are memory-bound products with an inner size
of 8, plus sorts, gathers and a few hundred small ops; here every token runs its k
experts straight from cache (the experts' weights are a few kB to 1 MB), with dropout
as the dropped units' positions, drawn by torch's default generator as on the fused path.
The function and its gradients are those of :class:`.expert_dispatch._SparseExperts`.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from .native_build import forget_builds, load_kernel, pointers, require_cpu, run_kernel

SOURCE = Path(__file__).with_name("native_experts.c")

_POSITIONS = {"hidden": 0, "output": 1}
_INTS = ("T", "k", "C", "H", "E", "threads", "position")
_UINTS = ("seed", "drop_threshold")
_FLOATS = ("x", "gates", "w1", "b1", "w2", "b2", "w1t", "w2t", "grad_out")
_OUTPUTS = ("out", "y_rows", "dx", "dgates", "dw1", "db1", "dw2", "db2")


class _Args(ctypes.Structure):
    """The C ``Args`` struct: sizes, then pointers (all 8 bytes: no padding)."""

    _fields_ = (
        [(name, ctypes.c_int64) for name in _INTS]
        + [(name, ctypes.c_uint64) for name in _UINTS]
        + [("scale", ctypes.c_double)]
        + [(name, ctypes.c_void_p) for name in _FLOATS]
        + [("idx", ctypes.c_void_p), ("dropped_bits", ctypes.c_void_p)]
        + [(name, ctypes.c_void_p) for name in _OUTPUTS]
    )


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    lib = load_kernel(SOURCE, _Args, "dmoe_experts",
                      ("dmoe_experts_forward", "dmoe_experts_backward"))
    if lib is None:
        return None
    lib.dmoe_experts_lanes.restype = ctypes.c_int64
    lib.dmoe_mark_dropped.restype = None
    lib.dmoe_mark_dropped.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.dmoe_hashed_mask.restype = None
    lib.dmoe_hashed_mask.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_void_p]
    return lib


def native_available() -> bool:
    """True when the native kernel is built (or can be) and loaded."""
    return _kernel() is not None


def forget_kernel() -> None:
    """Forget the loaded kernel: the next call loads (or builds) it again, e.g. after
    ``NAPARI_DMOE_NATIVE_FLAGS`` or ``NAPARI_DMOE_CACHE`` changed."""
    forget_builds()
    _kernel.cache_clear()


def native_lanes() -> int:
    """Floats per vector of the kernel's hidden-width code: 16 where it was built with
    AVX-512, else 8 (widths that do not fit run its scalar code)."""
    return int(_kernel().dmoe_experts_lanes())


def _run(name: str, args: _Args) -> None:
    run_kernel(_kernel(), SOURCE, name, args)


def drop_threshold(p: float) -> int:
    """The counter-based mask drops a unit whose 32-bit hash is below this (``p * 2**32``)."""
    return min(round(p * 2**32), 2**32 - 1)


def _args(x, indices, gates, w1, b1, w2, b2, drop, position, **tensors) -> _Args:
    """``drop``: ``(p, seed, bits)`` of :func:`native_experts`."""
    (T, C), (E, _, H) = x.shape, w1.shape
    p, seed, dropped_bits = drop
    return _Args(
        T=T, k=indices.shape[1], C=C, H=H, E=E, threads=torch.get_num_threads(),
        position=_POSITIONS[position], seed=seed, drop_threshold=drop_threshold(p),
        scale=1.0 / (1.0 - p) if p > 0 else 1.0,
        **pointers(x=x, gates=gates, w1=w1, b1=b1, w2=w2, b2=b2, idx=indices,
                   dropped_bits=dropped_bits, **tensors),
    )


def dropped_bits(dropped: torch.Tensor, units: int) -> torch.Tensor:
    """Dropped unit positions ``(n,)`` int64 → a bit per unit, set where dropped:
    uint8 ``(ceil(units / 8),)``, little-endian bit order (1 bit per unit, where the
    positions take ~6.4 at ``p = 0.1``)."""
    bits = torch.zeros((units + 7) // 8, dtype=torch.uint8)
    dropped = dropped.contiguous()
    if dropped.numel():
        if int(dropped.min()) < 0 or int(dropped.max()) >= units:
            raise ValueError(f"dropped positions must lie in [0, {units})")
        _kernel().dmoe_mark_dropped(dropped.data_ptr(), dropped.numel(), bits.data_ptr())
    return bits


def hashed_keep(seed: int, p: float, slots: int, width: int) -> torch.Tensor:
    """The counter-based keep mask a call with ``seed`` uses: bool ``(slots, width)`` (for
    tests: the kernel itself never stores it)."""
    bits = torch.zeros((slots * width + 7) // 8, dtype=torch.uint8)
    _kernel().dmoe_hashed_mask(seed, drop_threshold(p), slots, width, bits.data_ptr())
    unit = torch.arange(slots * width)
    return ((bits[unit >> 3] >> (unit & 7).to(torch.uint8)) & 1).eq(0).view(slots, width)


class _NativeExperts(torch.autograd.Function):
    """``out[t] = sum_j gates[t, j] * MLP_{indices[t, j]}(x[t])`` (see the C source)."""

    @staticmethod
    def forward(ctx, x, indices, gates, w1, b1, w2, b2, position, drop, training_graph):
        T, C = x.shape
        out = x.new_empty(T, C)
        # expert outputs before the gate, for the gate gradient (not kept without autograd)
        y_rows = x.new_empty(T, indices.shape[1], C) if training_graph else None
        _run("dmoe_experts_forward",
             _args(x, indices, gates, w1, b1, w2, b2, drop, position, out=out, y_rows=y_rows))
        p, seed, bits = drop
        ctx.save_for_backward(x, indices, gates, w1, b1, w2, y_rows, bits)
        ctx.config = (p, seed, position)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, indices, gates, w1, b1, w2, y_rows, bits = ctx.saved_tensors
        p, seed, position = ctx.config
        grads = dict(dx=torch.empty_like(x), dgates=torch.empty_like(gates),
                     dw1=torch.empty_like(w1), db1=torch.empty_like(b1),
                     dw2=torch.empty_like(w2), db2=x.new_empty(w2.shape[0], w2.shape[2]))
        # named here: the C code reads them through raw pointers, so they must stay alive
        inputs = dict(grad_out=grad_out.contiguous(), y_rows=y_rows,
                      w1t=w1.transpose(1, 2).contiguous(), w2t=w2.transpose(1, 2).contiguous())
        _run("dmoe_experts_backward",
             _args(x, indices, gates, w1, b1, w2, None, (p, seed, bits), position,
                   **inputs, **grads))
        dx = grads["dx"] if ctx.needs_input_grad[0] else None
        return (dx, None, grads["dgates"], grads["dw1"], grads["db1"], grads["dw2"],
                grads["db2"], None, None, None)


def native_experts(x, indices, gates, w1, b1, w2, b2, p, position, mask):
    """The function of :func:`.expert_dispatch.fused_experts` for float32 CPU tensors, in C.

    Args:
        x: tokens ``(T, C)``; indices: experts ``(T, k)``; gates: ``(T, k)``.
        w1, b1, w2, b2: the bank's weights ``(E, C, H)``, ``(E, H)``, ``(E, H, C)``, ``(E, C)``.
        p: dropout probability (0: none); position: ``"hidden"`` or ``"output"``.
        mask: bool keep mask ``(T, k, W)`` in token order, or None for a fresh
            counter-based mask (its seed drawn from torch's default generator).

    Returns:
        ``(T, C)``.
    """
    T, C = x.shape
    require_cpu(SOURCE, torch.float32, x=x, gates=gates, w1=w1, b1=b1, w2=w2, b2=b2)
    require_cpu(SOURCE, torch.int64, indices=indices)
    seed, bits = 0, None
    if p > 0 and mask is not None:
        units = T * indices.shape[1] * (w1.shape[2] if position == "hidden" else C)
        bits = dropped_bits((~mask.bool()).reshape(-1).nonzero().view(-1), units)
    elif p > 0:  # counter-based: one draw from the default generator, never 0 (= no dropout)
        seed = int(torch.randint(1, 2**63 - 1, (), dtype=torch.int64))
    return _NativeExperts.apply(
        x.contiguous(), indices.contiguous(), gates.contiguous(), w1.contiguous(),
        b1.contiguous(), w2.contiguous(), b2.contiguous(), position, (p, seed, bits),
        torch.is_grad_enabled())
