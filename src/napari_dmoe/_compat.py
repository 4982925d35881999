"""Import torch and ``training`` safely inside a running napari.

Crash seen on this project's CPU machines (Debian 12, Mesa llvmpipe software OpenGL, torch
2.14.1 CUDA wheels): once napari's canvas has an OpenGL context, importing ``triton``
(pulled in by torchvision/timm/MONAI through ``torch._dynamo``) kills the process with a
segmentation fault, in any thread; imported *before* the first canvas it is fine. Triton
only serves GPU kernels (``torch.compile`` on CUDA), so on machines without CUDA we mark it
unavailable before anything imports it: torch then sees "no triton" and the inference
code, which never compiles, is unaffected. Set ``NAPARI_DMOE_ALLOW_TRITON=1`` to skip this.
"""

from __future__ import annotations

import os
import sys


def prepare_torch() -> None:
    """Call before importing ``training`` (or monai/timm) from plugin code."""
    if "triton" in sys.modules or os.environ.get("NAPARI_DMOE_ALLOW_TRITON"):
        return
    import torch  # torch alone does not import triton

    if not torch.cuda.is_available():
        sys.modules["triton"] = None  # type: ignore[assignment]  # "import triton" -> ImportError
