"""Huge-page backed gradient buffers: same tensors as ``torch.empty_like``."""

from __future__ import annotations

import sys

import pytest
import torch

from training.networks.blocks import huge_pages


def test_empty_like_has_the_shape_dtype_and_holds_values():
    w = torch.randn(8, 768, 3072)
    out = huge_pages.empty_like(w)
    assert out.shape == w.shape and out.dtype == w.dtype and out.is_contiguous()
    out.copy_(w)
    assert torch.equal(out, w)


def test_small_buffers_are_not_advised():
    assert not huge_pages.advise(torch.empty(1000))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux-only")
def test_large_buffers_are_advised_where_the_kernel_allows():
    try:
        with open(huge_pages.THP_SETTING) as f:
            enabled = "[never]" not in f.read()
    except OSError:  # no transparent huge pages in this kernel or container
        enabled = False
    assert huge_pages.advise(torch.empty(4 * 2**20)) == enabled
