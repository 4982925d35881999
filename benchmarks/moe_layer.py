"""Speed and memory of the dMoE layer against a straightforward implementation.

Usage: ``python benchmarks/moe_layer.py [--repeats 3] [--only 2d|3d-36k|3d-295k]``

For each shape (the 2D TransUNet paper shape and two 3D ResUNet stages) it times forward
and forward+backward of ``training.networks.DMoE`` and of a naive reference written here
(a per-sample router loop and boolean-mask dispatch per expert, plain autograd), and
prints the time, the achieved fraction of this CPU's fp32 matmul peak and the peak memory
of the timed call. Each measurement runs in its own subprocess so that peak RSS is clean.
Outputs of both implementations are compared with routing noise off (eval mode).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SHAPES = {
    "2d": dict(B=8, N=196, C=768, A=3),
    "3d-36k": dict(B=1, N=36_864, C=96, A=4),
    "3d-295k": dict(B=1, N=294_912, C=48, A=4),
}
E, K = 8, 2


def naive_forward(layer, x, attr):
    """Per-sample router loop + masked per-expert dispatch (the obvious implementation)."""
    import torch

    router, ex = layer.router, layer.experts
    idx_list, gate_list = [], []
    for b in range(x.shape[0]):
        logits = x[b] @ router.w_gate[int(attr[b])]
        top, idx = logits.topk(router.top_k, dim=-1)
        idx_list.append(idx)
        gate_list.append(torch.softmax(top, -1))
    idx, gates = torch.stack(idx_list), torch.stack(gate_list)
    flat = x.reshape(-1, x.shape[-1])
    idx, gates = idx.reshape(-1, router.top_k), gates.reshape(-1, router.top_k)
    out = torch.zeros_like(flat)
    for e in range(ex.num_experts):
        hit = idx == e
        mask = hit.any(-1)
        g = (gates * hit).sum(-1)[mask]
        h = torch.relu(flat[mask] @ ex.w1[e] + ex.b1[e])
        y = h @ ex.w2[e] + ex.b2[e]
        out[mask] += g[:, None] * y
    return x + out.reshape(x.shape)


def matmul_peak(seconds: float = 1.0) -> float:
    """fp32 GFLOP/s of a large square matmul on this machine's torch threads."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    return 2 * 2048**3 * n / (time.perf_counter() - t0) / 1e9


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _measure(shape: str, impl: str, mode: str, repeats: int) -> dict:
    """Run in a child process: one (shape, implementation, mode) measurement."""
    import torch

    from training.networks import DMoE

    s = SHAPES[shape]
    torch.manual_seed(0)
    layer = DMoE(s["C"], num_experts=E, top_k=K, num_attributes=s["A"], unknown_router=False)
    for p in layer.router.parameters():
        torch.nn.init.normal_(p, std=0.02)
    layer.eval()  # routing noise and dropout off: both implementations are deterministic
    x = torch.randn(s["B"], s["N"], s["C"], requires_grad=(mode == "fwd+bwd"))
    attr = torch.arange(s["B"]) % s["A"]
    if impl == "dmoe":
        def run():
            return layer(x, attr).output
    else:
        def run():
            return naive_forward(layer, x, attr)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                return run()
        y = run()
        y.backward(torch.ones_like(y))
        return y

    step()  # warm-up
    base = _rss_mb()
    times = []
    for _ in range(repeats):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        t0 = time.perf_counter()
        y = step()
        times.append(time.perf_counter() - t0)
        del y
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    with torch.no_grad():
        diff = (layer(x, attr).output - naive_forward(layer, x, attr)).abs().max().item()
    return {"seconds": min(times), "peak_mb": max(peak, 0.0), "max_abs_diff": diff}


def _flops(shape: str, mode: str) -> float:
    s = SHAPES[shape]
    tokens = s["B"] * s["N"]
    fwd = tokens * (K * 2 * 2 * s["C"] * 4 * s["C"] + 2 * s["C"] * E)
    return fwd * (3 if mode == "fwd+bwd" else 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=sorted(SHAPES), action="append")
    parser.add_argument("--child", nargs=3, metavar=("SHAPE", "IMPL", "MODE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_measure(*args.child, repeats=args.repeats)))
        return

    import torch

    peak = matmul_peak()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"fp32 matmul peak {peak:.0f} GFLOP/s")
    print(f"{'shape':26} {'mode':8} {'impl':6} {'time':>9} {'%peak':>6} {'peak MB':>8} "
          f"{'speed-up':>8} {'mem ratio':>9} {'max|diff|':>9}")
    for shape in args.only or list(SHAPES):
        s = SHAPES[shape]
        label = f"B={s['B']} N={s['N']} C={s['C']}"
        for mode in ("fwd", "fwd+bwd"):
            res = {}
            for impl in ("naive", "dmoe"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", shape, impl, mode,
                     "--repeats", str(args.repeats)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            for impl in ("naive", "dmoe"):
                r = res[impl]
                frac = _flops(shape, mode) / r["seconds"] / 1e9 / peak
                speed = res["naive"]["seconds"] / r["seconds"]
                mem = r["peak_mb"] / max(res["naive"]["peak_mb"], 1e-9)
                print(f"{label:26} {mode:8} {impl:6} {r['seconds'] * 1e3:7.1f}ms {frac:6.1%} "
                      f"{r['peak_mb']:8.0f} {speed:7.2f}x {mem:9.2f} {r['max_abs_diff']:9.2e}")


if __name__ == "__main__":
    main()
