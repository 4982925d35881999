"""Noisy top-k routing's selection and backward pass in C (``native_router.c``, built on
first use by :mod:`.native_build`), for narrow float32 tokens on CPU.

torch still computes the noisy logits (one batched product, the normal draws, softplus);
the kernel then picks each token's k experts and their logits and keeps the noise and
noise logit at the chosen experts, in one pass where torch ran about 30 ops (an
integer-key top-2, three gathers and a layout copy); and it runs the whole backward pass,
where torch filled and scattered a ``(B, 2E, N)`` logit gradient and ran two batched
products over it. Both run a vector of tokens at a time (k <= 2; a feature map's tokens).
Same function and gradients as the torch code of :func:`.noisy_top_k.noisy_top_k` (tests
compare them).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .native_build import forget_builds, load_kernel, pointers, require_cpu, run_kernel

SOURCE = Path(__file__).with_name("native_router.c")

MAX_WIDTH = 64
"""Tokens at most this wide (C) take the kernel (the 3D U-Net stages; the ViT's 768-wide
tokens are few, and their products are torch's)."""

MAX_K = 64

_INTS = ("B", "E", "N", "k", "C", "threads", "nl_sample", "xs_b", "xs_n", "xs_c")
_INPUTS = ("logits", "noise", "nl", "grad_gates", "gates", "noise_sel", "sig_sel", "x", "wt")
_OUTPUTS = ("top_out", "noise_out", "nl_out", "dx", "dwt", "db")


class _Args(ctypes.Structure):
    """The C ``Args`` struct (all fields 8 bytes: no padding)."""

    _fields_ = ([(name, ctypes.c_int64) for name in _INTS]
                + [(name, ctypes.c_void_p) for name in _INPUTS]
                + [("idx_in", ctypes.c_void_p), ("indices", ctypes.c_void_p)]
                + [(name, ctypes.c_void_p) for name in _OUTPUTS])


@functools.cache
def _kernel() -> ctypes.CDLL | None:
    return load_kernel(SOURCE, _Args, "dmoe_router",
                       ("dmoe_router_select", "dmoe_router_backward"))


def forget_kernel() -> None:
    """Forget the loaded kernel (the next call loads or builds it again)."""
    forget_builds()
    _kernel.cache_clear()


def native_router_applies(x: torch.Tensor, weight: torch.Tensor, k: int) -> bool:
    """True when :func:`select_top_k` and :func:`router_backward` take these tokens
    ``x (B, N, C)`` and router weights ``weight (B, C, 2E)``: float32 on CPU, C at most
    ``MAX_WIDTH``, k at most ``MAX_K``, and the kernel built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.shape[-1] <= MAX_WIDTH
            and 1 <= k <= min(MAX_K, weight.shape[-1] // 2) and _kernel() is not None)


def _run(name: str, args: _Args) -> None:
    run_kernel(_kernel(), SOURCE, name, args)


def select_top_k(logits: torch.Tensor, noise: torch.Tensor, both: torch.Tensor, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token's k best experts, their logits, and the noise and noise logit there.

    Args:
        logits: noisy logits ``(B, E, N)``.
        noise: the standard normal draws ``(B, E, N)``.
        both: gate and noise logits ``(B, 2E, N)`` (contiguous; the noise logits are its
            second half).
        k: experts per token.

    Returns:
        ``indices`` (long), the ``logits``, ``noise`` and ``noise_logits`` at the chosen
        experts, each ``(B, N, k)``, best first (ties: lower expert; NaN counts as largest).
    """
    B, E, N = logits.shape
    require_cpu(SOURCE, torch.float32, logits=logits, noise=noise, both=both)
    logits, noise = logits.contiguous(), noise.contiguous()
    both = both.contiguous()
    indices = torch.empty(B, N, k, dtype=torch.int64)
    top, noise_sel, nl_sel = (logits.new_empty(B, N, k) for _ in range(3))
    nl = both[:, E:]  # a view: its pointer starts at the noise logits
    args = _Args(B=B, E=E, N=N, k=k, C=0, threads=torch.get_num_threads(),
                 nl_sample=2 * E * N, **pointers(logits=logits, noise=noise, nl=nl,
                                                  indices=indices, top_out=top,
                                                  noise_out=noise_sel, nl_out=nl_sel))
    _run("dmoe_router_select", args)
    return indices, top, noise_sel, nl_sel


def router_backward(grad_gates: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor,
                    noise_sel: torch.Tensor, nl_sel: torch.Tensor, x: torch.Tensor,
                    weight: torch.Tensor, *, need_x: bool, need_bias: bool
                    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Gradients of the routing (see the C source) for tokens ``x (B, N, C)`` (any strides)
    and router weights ``weight (B, C, 2E)``, from ``grad_gates (B, N, k)``.

    Returns:
        ``grad_x`` (``x``'s shape and strides, or None unless ``need_x``), ``grad_weight``
        ``(B, C, 2E)`` and ``grad_bias`` ``(B, 2E)`` (None unless ``need_bias``).
    """
    B, N, C = x.shape
    E2 = weight.shape[-1]
    k = indices.shape[-1]
    require_cpu(SOURCE, torch.float32, grad_gates=grad_gates, gates=gates,
                noise_sel=noise_sel, nl_sel=nl_sel, x=x, weight=weight)
    require_cpu(SOURCE, torch.int64, indices=indices)
    dense = x.is_contiguous() or x.transpose(1, 2).is_contiguous()
    if not dense:
        x = x.contiguous()
    dx = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype) if need_x else None
    wt = weight.transpose(1, 2).contiguous()  # (B, 2E, C): one row per logit
    dwt = torch.empty_like(wt)
    db = x.new_empty(B, E2) if need_bias else None
    inputs = dict(grad_gates=grad_gates.contiguous(), gates=gates.contiguous(),
                  noise_sel=noise_sel.contiguous(), sig_sel=torch.sigmoid(nl_sel).contiguous(),
                  idx_in=indices.contiguous())  # named: the C code reads raw pointers
    args = _Args(B=B, E=E2 // 2, N=N, k=k, C=C, threads=torch.get_num_threads(),
                 xs_b=x.stride(0), xs_n=x.stride(1), xs_c=x.stride(2),
                 **pointers(x=x, wt=wt, dx=dx, dwt=dwt, db=db, **inputs))
    _run("dmoe_router_backward", args)
    return dx, dwt.transpose(1, 2).contiguous(), db
