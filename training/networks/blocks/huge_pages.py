"""Fresh CPU buffers backed by transparent huge pages (Linux), for large gradients.

A freshly allocated buffer of tens of MB (the expert weight gradients of a ViT-B dMoE
layer: 2 x 75 MB per step) is mapped page by page on first write; in a virtual machine
each 4 KiB page fault costs about a microsecond, so filling such a gradient took ~4x as
long as copying it. ``madvise(MADV_HUGEPAGE)`` on the buffer before it is written lets
the kernel map it in 2 MiB pages instead (512x fewer faults). Without Linux, or where
transparent huge pages are off, :func:`empty_like` is ``torch.empty_like``.
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch

HUGE_PAGE_BYTES = 2 * 2**20
MIN_BYTES = 8 * 2**20
"""Buffers from this size on are advised; smaller ones gain little."""

_MADV_HUGEPAGE = 14
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.cache
def _madvise():
    """libc's ``madvise`` when transparent huge pages can be requested, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(THP_SETTING) as f:
            if "[never]" in f.read():
                return None
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def advise(t: torch.Tensor) -> bool:
    """Ask for huge pages under the whole 2 MiB-aligned part of ``t``'s storage; True if
    the advice was taken (it changes no values and never fails the caller)."""
    madvise = _madvise()
    nbytes = t.untyped_storage().nbytes()
    if madvise is None or t.device.type != "cpu" or nbytes < MIN_BYTES:
        return False
    start = t.untyped_storage().data_ptr()
    lo = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    hi = (start + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return hi > lo and madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(t)`` (contiguous), huge-page backed where possible (see module)."""
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    advise(out)
    return out
