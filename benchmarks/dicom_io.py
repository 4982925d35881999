"""DICOM timings on a 256×256×128 CT series: read, segment, write DICOM-SEG, write RTSTRUCT.

Usage: ``python benchmarks/dicom_io.py [--repeats 3] [--shape 256 256 128] [--threads N]``

A synthetic pelvic CT (``training.data.synthetic_images.draw_ct``, T3 look) is written once
as a single-frame CT series (one uncompressed file per slice, shuffled names), then each
step runs ``--repeats`` times and prints the median and min–max wall time:

- read: ``training.data.dicom.read_series`` (headers, geometry checks, pixel decode, HU);
- segment: the bundled CT demo model through ``training.inference.Segmenter.segment``
  (with the series' affine; the model is loaded once, outside the timing);
- write SEG / RTSTRUCT: ``write_dicom_seg`` / ``write_rtstruct`` of the predicted mask
  (headers re-read, references built, file written).

The machine's load average is printed with the figures: on a shared 2-core machine, torch's
default of 2 threads is several times slower than ``--threads 1`` once other processes
compete for the cores (oversubscribed OpenMP threads wait on each other).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

MODEL = (Path(__file__).resolve().parents[1] / "src" / "napari_dmoe" / "models"
         / "ct_tstage_dmoe.safetensors")


def _timed(fn, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def run(shape: tuple[int, int, int], repeats: int) -> dict[str, list[float]]:
    import numpy as np

    from training.data.dicom import read_series, write_ct_series, write_dicom_seg, write_rtstruct
    from training.data.synthetic import GROUPS
    from training.data.synthetic_images import draw_ct
    from training.inference import Segmenter

    spacing = (0.9, 0.9, 2.5)
    _, look, cut = GROUPS["ct"]["T3"]
    hu, _ = draw_ct(np.random.default_rng(0), look, cut, shape, spacing)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "series"
        names = [f"IM{i:05d}" for i in np.random.default_rng(1).permutation(shape[2])]
        write_ct_series(hu.astype(np.float32), folder, affine, file_names=names)
        out: dict[str, list[float]] = {}
        out["read"], volume = _timed(lambda: read_series(folder), repeats)
        seg = Segmenter.from_checkpoint(MODEL, device="cpu")
        out["segment"], result = _timed(
            lambda: seg.segment(volume.array, "T3", affine=volume.affine), repeats)
        labels = result.labels
        kw = dict(algorithm_name="ct_tstage_dmoe", algorithm_version="bench",
                  attribute="t_stage", attribute_value="T3")
        counter = iter(range(10**6))
        out["write SEG"], _ = _timed(lambda: write_dicom_seg(
            labels, volume, seg.class_names, Path(tmp) / f"s{next(counter)}.dcm", **kw), repeats)
        out["write RTSTRUCT"], _ = _timed(lambda: write_rtstruct(
            labels, volume, seg.class_names, Path(tmp) / f"r{next(counter)}.dcm", **kw),
            repeats)
        print(f"series: {shape[0]}×{shape[1]}×{shape[2]}, {len(volume.files)} files, "
              f"tumour voxels predicted: {int((labels == 1).sum())}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shape", type=int, nargs=3, default=(256, 256, 128))
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()
    timings = run(tuple(args.shape), args.repeats)
    print(f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, load average "
          f"{load[0]:.1f} before / {os.getloadavg()[0]:.1f} after")
    print(f"{'step':<16}{'median s':>10}{'min–max s':>16}   (n={args.repeats})")
    for step, times in timings.items():
        print(f"{step:<16}{statistics.median(times):>10.2f}"
              f"{min(times):>8.2f}–{max(times):<7.2f}")


if __name__ == "__main__":
    main()
