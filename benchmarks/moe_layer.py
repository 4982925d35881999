"""Speed and memory of the dMoE layer against a straightforward per-expert implementation.

Usage: ``python benchmarks/moe_layer.py [--repeats 5] [--only 2d|3d-36k|3d-295k|3d-tiny-65k]
[--modes train eval] [--threads T]``

For each shape (two 3D ResUNet paper-preset stages, the first stage of the tiny preset
and the 2D TransUNet/ViT paper shape; 8 experts, top-2) it times forward+backward of
``training.networks.DMoE`` and of a reference written here (per-sample router loop,
boolean-mask dispatch per expert, ``F.dropout``, plain autograd) in the same process,
alternating the two so that load changes hit both alike.

- ``train`` (the default first row) is the configuration users train with: ``train()``
  mode, router noise on, expert dropout 0.1. ``eval`` (second row) has both off; there the
  outputs of both implementations are also compared (``max|diff|``).
- Time: wall-clock median of ``--repeats`` with min–max; speed-up = reference median /
  dMoE median. ``cpu s``: medians of the process's CPU time (all threads) and their
  ratio; with ``--threads 1`` on a busy shared machine the steadier figure (time spent
  waiting for a core is not counted; with several threads, OpenMP spin-waits are).
- Peak memory (one step each, in a child process): the rise of the peak resident set
  (``VmHWM``, reset through ``/proc/self/clear_refs`` before the step, glibc told to hand
  freed blocks back, which would slow the timed runs) over the resident set before the
  step: everything the step allocates, on CPU. On CUDA tensors
  ``torch.cuda.max_memory_allocated`` is used instead.
- ``%peak``: useful expert + router FLOPs (backward = 2x forward; recomputation is not
  counted) per second over the best measured fp32 2048x2048 product (``torch.mm``/MKL or
  oneDNN) on the same threads, timed for ``PEAK_SECONDS`` right before each repeat (on a
  shared machine the speed drifts within a minute): the median (min–max) over repeats of
  each repeat's fraction; once per wall second, once per CPU second. ``peak``: the
  product's median GFLOP/s.
- ``path``: which expert dispatch ran (on CPU ``native`` = the C kernel for narrow
  experts, ``fused`` otherwise; ``grouped`` = bf16 grouped GEMM on CUDA).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {
    "3d-295k": dict(B=1, N=294_912, C=48, A=4),
    "3d-36k": dict(B=1, N=36_864, C=96, A=4),
    "2d": dict(B=8, N=196, C=768, A=3),
    "3d-tiny-65k": dict(B=4, N=16_384, C=8, A=4),
}
E, K, DROPOUT = 8, 2, 0.1
PEAK_SECONDS = 0.3


def reference_forward(layer, x, attr):
    """Per-sample noisy router + boolean-mask dispatch per expert, ``F.dropout``, autograd."""
    import torch
    import torch.nn.functional as F

    router, ex = layer.router, layer.experts
    idx_list, gate_list = [], []
    for b in range(x.shape[0]):
        a = int(attr[b])
        logits = x[b] @ router.w_gate[a]
        if layer.training:
            noise_std = F.softplus(x[b] @ router.w_noise[a])
            logits = logits + torch.randn_like(logits) * noise_std
        top, idx = logits.topk(router.top_k, dim=-1)
        idx_list.append(idx)
        gate_list.append(torch.softmax(top, -1))
    flat = x.reshape(-1, x.shape[-1])
    idx = torch.stack(idx_list).reshape(-1, router.top_k)
    gates = torch.stack(gate_list).reshape(-1, router.top_k)
    out = torch.zeros_like(flat)
    p = ex.dropout if layer.training else 0.0
    for e in range(ex.num_experts):
        hit = idx == e
        mask = hit.any(-1)
        g = (gates * hit).sum(-1)[mask]
        h = torch.relu(flat[mask] @ ex.w1[e] + ex.b1[e])
        if ex.dropout_position == "hidden":
            h = F.dropout(h, p, training=p > 0)
        y = h @ ex.w2[e] + ex.b2[e]
        if ex.dropout_position == "output":
            y = F.dropout(y, p, training=p > 0)
        out[mask] += g[:, None] * y
    return x + out.reshape(x.shape)


def matmul_peak(seconds: float = 1.0) -> dict[str, tuple[float, float]]:
    """fp32 GFLOP per wall second and per CPU second of a 2048x2048 product.

    ``mkl``: ``torch.mm``; ``onednn``: oneDNN's linear (what the fused experts use), when
    torch has it. The peak the ``%peak`` column divides by is the larger of the two.
    """
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    products = {"mkl": lambda: a @ b}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        linear = torch.ops.mkldnn._linear_pointwise
        products["onednn"] = lambda: linear(a, b, None, "none", [], "")
    rates = {}
    for name, product in products.items():
        product()
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            product()
            n += 1
        flop = 2 * 2048**3 * n / 1e9
        rates[name] = (flop / (time.perf_counter() - t0), flop / (time.process_time() - c0))
    return rates


class PeakMemory:
    """Peak bytes a step allocates: VmHWM rise on CPU, ``max_memory_allocated`` on CUDA."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        if not cuda:
            try:  # fixed mmap/trim thresholds: freed large blocks go back to the OS
                libc = ctypes.CDLL("libc.so.6")
                libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD
                libc.mallopt(-1, 1 << 17)  # M_TRIM_THRESHOLD
            except OSError:
                pass

    @staticmethod
    def _status_mb(key: str) -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
        raise OSError(f"{key} not in /proc/self/status")

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
            return
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        self.base = self._status_mb("VmRSS")

    def stop(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return self._status_mb("VmHWM") - self.base


def _flops(s: dict) -> float:
    """Useful forward+backward FLOPs of one layer call (experts, router with noise)."""
    tokens, C = s["B"] * s["N"], s["C"]
    fwd = tokens * (K * 2 * 2 * C * 4 * C + 2 * 2 * C * E)
    return 3 * fwd


def _setup(shape: str, mode: str, device: str):
    """The layer, its input and both implementations for one shape and mode."""
    import torch

    from training.networks import DMoE

    s = SHAPES[shape]
    torch.manual_seed(0)
    layer = DMoE(s["C"], num_experts=E, top_k=K, num_attributes=s["A"], dropout=DROPOUT,
                 unknown_router=False).to(device)
    for p in layer.router.parameters():
        torch.nn.init.normal_(p, std=0.02)
    layer.train(mode == "train")
    x = torch.randn(s["B"], s["N"], s["C"], device=device, requires_grad=True)
    attr = torch.arange(s["B"], device=device) % s["A"]
    impls = {"dmoe": lambda: layer(x, attr).output,
             "reference": lambda: reference_forward(layer, x, attr)}

    def step(run, memory=None):
        """One forward+backward: ``(wall s, CPU s, peak MB or nan)``."""
        layer.zero_grad(set_to_none=True)
        x.grad = None
        if memory:
            memory.start()
        t0, c0 = time.perf_counter(), time.process_time()
        y = run()
        y.backward(torch.ones_like(y))
        if device == "cuda":
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        del y
        return seconds, cpu, memory.stop() if memory else float("nan")

    return layer, x, attr, impls, step


def measure(shape: str, mode: str, repeats: int, device: str) -> dict:
    """Time both implementations for one shape and mode, alternating them."""
    import torch

    layer, x, attr, impls, step = _setup(shape, mode, device)
    for run in impls.values():
        step(run)  # warm-up
    times = {name: [] for name in impls}
    cpu_times = {name: [] for name in impls}
    peaks = []  # (wall, CPU) GFLOP/s of the 2048x2048 product, right before each repeat
    for _ in range(repeats):
        rates = matmul_peak(PEAK_SECONDS).values()
        peaks.append((max(w for w, _ in rates), max(c for _, c in rates)))
        for name, run in impls.items():
            seconds, cpu, _ = step(run)
            times[name].append(seconds)
            cpu_times[name].append(cpu)
    diff = float("nan")
    if mode == "eval":
        with torch.no_grad():
            diff = (impls["dmoe"]() - impls["reference"]()).abs().max().item()
    tokens = x.reshape(-1, x.shape[-1])
    return {"times": times, "cpu_times": cpu_times, "peaks": peaks, "max_abs_diff": diff,
            "path": layer.experts.select_path(tokens)}


def measure_memory(shape: str, mode: str, device: str) -> dict[str, float]:
    """Peak MB of one step of each implementation (run in a child process: the malloc
    settings that make resident memory track live memory would slow the timed runs)."""
    memory = PeakMemory(device == "cuda")
    _, _, _, impls, step = _setup(shape, mode, device)
    peaks = {}
    for name, run in impls.items():
        step(run)  # warm-up
        peaks[name] = step(run, memory)[2]
    return peaks


def _fmt(ts: list[float]) -> str:
    return f"{statistics.median(ts):6.3f} ({min(ts):.3f}–{max(ts):.3f})"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=list(SHAPES), action="append")
    parser.add_argument("--modes", nargs="+", choices=["train", "eval"], default=["train", "eval"])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--memory-child", nargs=2, metavar=("SHAPE", "MODE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(measure_memory(*args.memory_child, args.device)))
        return []
    rates = matmul_peak()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"load average {os.getloadavg()[0]:.1f}; E={E}, top-{K}, dropout {DROPOUT} (train)")
    print("fp32 2048x2048 product, GFLOP/s (per wall s, per CPU s): "
          + ", ".join(f"{k} {w:.0f}, {c:.0f}" for k, (w, c) in rates.items()))
    print(f"{'shape':24} {'mode':5} {'path':7} {'dMoE s, median (min–max)':>24} "
          f"{'reference s':>24} {'speed-up':>8} {'dMoE MB':>8} {'ref MB':>8} {'mem':>5} "
          f"{'peak':>5} {'%peak (min–max)':>17} | {'cpu s dMoE/ref':>15} {'cpu x':>6} "
          f"{'%peak':>6} | {'max|diff|':>9}")
    rows = []
    for shape in args.only or list(SHAPES):
        s = SHAPES[shape]
        label = f"B={s['B']} N={s['N']:,} C={s['C']}"
        for mode in args.modes:
            r = measure(shape, mode, args.repeats, args.device)
            child = subprocess.run(
                [sys.executable, __file__, "--memory-child", shape, mode, "--device",
                 args.device, "--threads", str(torch.get_num_threads())],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            r["peak_mb"] = json.loads(child.stdout.strip().splitlines()[-1])
            t_d, t_r = r["times"]["dmoe"], r["times"]["reference"]
            speed = statistics.median(t_r) / statistics.median(t_d)
            c_d = statistics.median(r["cpu_times"]["dmoe"])
            c_r = statistics.median(r["cpu_times"]["reference"])
            mem = r["peak_mb"]["dmoe"] / max(r["peak_mb"]["reference"], 1e-9)
            # each repeat against the product timed right before it (the speed drifts)
            gflop = _flops(s) / 1e9
            fracs = [gflop / t / p for t, (p, _) in zip(t_d, r["peaks"])]
            frac, peak = statistics.median(fracs), statistics.median(p for p, _ in r["peaks"])
            cpu_frac = statistics.median(
                gflop / t / p for t, (_, p) in zip(r["cpu_times"]["dmoe"], r["peaks"]))
            print(f"{label:24} {mode:5} {r['path']:7} {_fmt(t_d):>24} {_fmt(t_r):>24} "
                  f"{speed:7.2f}x {r['peak_mb']['dmoe']:8.0f} {r['peak_mb']['reference']:8.0f} "
                  f"{mem:5.2f} {peak:5.0f} {frac:6.1%} ({min(fracs):.0%}–{max(fracs):.0%}) | "
                  f"{f'{c_d:.3f}/{c_r:.3f}':>15} "
                  f"{c_r / c_d:5.2f}x {cpu_frac:6.1%} | {r['max_abs_diff']:9.1e}", flush=True)
            rows.append({"shape": shape, "mode": mode, **r, "speed_up": speed, "peak": peak,
                         "cpu_speed_up": c_r / c_d, "mem_ratio": mem, "peak_fraction": frac,
                         "cpu_peak_fraction": cpu_frac})
    return rows


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
