"""Inference speed and memory of the bundled demo models (the plugin's path).

Usage: ``python benchmarks/inference.py [--repeats 5]``

2D: the skin demo model (RGB) on a 512×512×3 image, after one warm-up run (median time).
3D: the CT demo model on 256×256×64 and 256×256×128 volumes (sliding window), one run each;
peak memory is the growth of the process's peak RSS during the call. Each case runs in its
own subprocess so the peaks do not mask each other.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = Path(__file__).resolve().parents[1] / "src" / "napari_dmoe" / "models"
CASES = {
    "2d-512-rgb": ("skin_age_dmoe.safetensors", (512, 512, 3), "40-59"),
    "3d-256x256x64": ("ct_tstage_dmoe.safetensors", (256, 256, 64), "T3"),
    "3d-256x256x128": ("ct_tstage_dmoe.safetensors", (256, 256, 128), "T3"),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _measure(case: str, repeats: int) -> dict:
    import numpy as np

    from training.inference import Segmenter

    name, shape, value = CASES[case]
    seg = Segmenter.from_checkpoint(MODELS / name, device="cpu")
    rng = np.random.default_rng(0)
    image = (rng.normal(0, 200, shape) if len(shape) == 3 and shape[-1] != 3
             else rng.random(shape) * 255).astype(np.float32)
    windows = []
    if seg.spatial_dims == 2:
        seg.segment(image, value)  # warm-up
        runs = repeats
    else:
        runs = 1
    base = _rss_mb()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        seg.segment(image, value, progress=lambda d, t: windows.append(t))
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return {"seconds": statistics.median(times), "peak_mb": max(peak, 0.0),
            "windows": windows[-1] if windows else 1,
            "input_mb": image.nbytes / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(args.child, args.repeats)))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{'case':16} {'model':28} {'time':>9} {'windows':>8} {'input MB':>9} {'peak MB':>8}")
    for case, (name, _, _) in CASES.items():
        out = subprocess.run([sys.executable, __file__, "--child", case, "--repeats",
                              str(args.repeats)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{case:16} {name:28} {r['seconds']:8.2f}s {r['windows']:8d} "
              f"{r['input_mb']:9.0f} {r['peak_mb']:8.0f}")


if __name__ == "__main__":
    main()
