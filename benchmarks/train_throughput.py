"""Training throughput (samples/s) and peak memory for 1 and 2 processes on CPU.

Usage::

    python benchmarks/train_throughput.py [--processes 1 2] [--steps 20] [--batch-size 8]
        [--arch transunet] [--image-size 64] [--precision fp32|bf16] [--threads T]
    # 3D ResUNet, with and without the dMoE layers (share of a step they take):
    python benchmarks/train_throughput.py --arch resunet --preset tiny --patch 64 64 32 \
        --batch-size 4 --moe none dmoe --processes 1 --interleave
    python benchmarks/train_throughput.py --arch resunet --preset paper --patch 128 128 64 \
        --batch-size 2 --moe none dmoe --processes 1

For each process count the script launches itself under ``torch.distributed.run``
(``--nproc_per_node=N``, gloo, a free local port). Every worker builds the same tiny
model, wraps it in DistributedDataParallel when N > 1, and runs ``--steps`` timed
optimisation steps (after ``--warmup`` untimed ones) with ``training.engine`` on random
images; each worker uses ``cores // N`` threads (``--threads`` overrides) so the runs
share the machine fairly. The global batch is ``N × --batch-size``. Printed per run:
samples/s over all ranks, seconds per step, and peak resident memory (max RSS) per
process and summed. On a busy machine prefer ``--threads 1``: OpenMP threads that
compete with other processes for cores slow down far more than single-threaded ones.

``--patch H W [D]`` sets the image size per axis (three values: a 3D network).
``--moe none dmoe`` runs the same network without and with its MoE layers (everything
else equal, same seed) and prints the share of a training step the dMoE layers take:
``1 - t(none) / t(dmoe)``, and the time they add, ``t(dmoe) / t(none) - 1``. The runs of
the modes alternate ``--rounds`` times (median of the rounds) so that load changes on a
shared machine hit both alike. With a MoE mode, a second pass of ``--steps`` steps times
the layers inside the step (forward and backward hooks on each layer, see
:class:`LayerTimer`) and prints their share of it: the steadier figure, since it divides
two times of the same process.

``--interleave`` (one process, with ``--moe``) builds every mode's network in one process
and alternates single training steps between them (``--steps`` each, after ``--warmup``):
the time a mode adds is then the median over the steps of ``t(mode) / t(none) - 1`` for
neighbouring steps, which sees everything a step does (optimizer, transposes, cache
effects) but not the ±30 % by which whole processes of the same work differed here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

DEFAULT_TRANSUNET_KWARGS = {"embed_dim": 64, "depth": 2, "num_heads": 2}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _image_size(args: argparse.Namespace) -> tuple[int, ...]:
    return tuple(args.patch) if args.patch else (args.image_size,) * 2


def _model(args: argparse.Namespace, moe: str):
    """The benchmarked network in MoE mode ``moe`` (same seed for every mode)."""
    import torch

    from training.networks import create_model

    torch.manual_seed(0)
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else (
        dict(DEFAULT_TRANSUNET_KWARGS) if args.arch == "transunet" else {})
    if args.arch == "transunet":
        kwargs.setdefault("img_size", args.image_size)
    else:
        kwargs.setdefault("spatial_dims", len(_image_size(args)))
    return create_model(args.arch, preset=args.preset, in_channels=1, out_channels=3,
                        moe=moe, num_attributes=3, **kwargs)


def _batches(args: argparse.Namespace, rank: int) -> list[dict]:
    import torch

    size = _image_size(args)
    g = torch.Generator().manual_seed(rank)
    return [{"image": torch.rand(args.batch_size, 1, *size, generator=g),
             "label": torch.randint(0, 3, (args.batch_size, *size), generator=g),
             "attr": torch.randint(0, 3, (args.batch_size,), generator=g)}
            for _ in range(4)]


def _trainer(args: argparse.Namespace, net, model, batches: list[dict]):
    """``run(steps) -> seconds``: that many optimisation steps of ``net`` (``model``, maybe
    wrapped) with ``training.engine``, AdamW as ``training.fit`` uses by default."""
    import torch

    from training.engine import autocast_for, train_one_epoch
    from training.losses import build_loss

    loss_fn = build_loss("dicece", num_classes=3, num_groups=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    autocast = autocast_for(args.precision, torch.device("cpu"))
    done = [0]

    def run(steps: int) -> float:
        loader = [batches[(done[0] + i) % len(batches)] for i in range(steps)]
        done[0] += steps
        return train_one_epoch(net, loader, loss_fn, opt, torch.device("cpu"),
                               autocast=autocast).seconds
    return run


def _interleaved_worker(args: argparse.Namespace) -> None:
    """One process, every mode of ``--moe``: single steps alternate between the networks."""
    import torch

    modes = args.moe_mode.split(",")
    batches = _batches(args, 0)
    models = {m: _model(args, m) for m in modes}
    runs = {m: _trainer(args, models[m], models[m], batches) for m in modes}
    for m in modes:
        runs[m](args.warmup)
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.steps):
        for m in modes:
            seconds[m].append(runs[m](1))
    layers: dict[str, list[float]] = {m: [] for m in modes}
    with contextlib.ExitStack() as hooks:  # a second pass, timing the (d)MoE layers
        timers = {m: hooks.enter_context(LayerTimer(models[m])) for m in modes if m != "none"}
        for _ in range(args.steps):
            for m in modes:
                before = timers[m].seconds if m in timers else 0.0
                step = runs[m](1)
                if m in timers:
                    layers[m].append((timers[m].seconds - before) / step)
    print("RESULT " + json.dumps({
        "threads": torch.get_num_threads(), "seconds": seconds, "layer_shares": layers,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }), flush=True)


def _worker(args: argparse.Namespace) -> None:
    import torch

    from training.distributed import setup_distributed, sum_floats, teardown_distributed

    info = setup_distributed(torch.device("cpu"))
    model = _model(args, args.moe_mode)
    net = model
    if info.distributed:
        net = torch.nn.parallel.DistributedDataParallel(model)
    run = _trainer(args, net, model, _batches(args, info.rank))

    run(args.warmup)
    seconds = run(args.steps)
    moe_seconds = share = None
    if args.moe_mode != "none":  # a second pass with timing hooks on the (d)MoE layers
        with LayerTimer(model) as timer:
            hooked = run(args.steps)
        moe_seconds, share = timer.seconds / args.steps, timer.seconds / hooked
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    samples, _ = sum_floats(args.steps * args.batch_size, 0.0)
    slowest = max(_gather(seconds))
    rss = _gather(rss_mb)
    if info.is_main:
        print("RESULT " + json.dumps({
            "processes": info.world_size, "threads": torch.get_num_threads(),
            "moe": args.moe_mode,
            "samples_per_s": samples / slowest, "s_per_step": slowest / args.steps,
            "peak_rss_mb_per_process": rss, "peak_rss_mb_total": sum(rss),
            "moe_s_per_step": moe_seconds, "moe_share": share,
        }), flush=True)
    teardown_distributed()


class LayerTimer:
    """Wall time spent inside the model's (d)MoE layers, forward and backward.

    Forward: from a layer's forward pre-hook to its forward hook. Backward: from its
    full-backward pre-hook (the gradient of its output is ready) to its full-backward hook
    (the gradient of its input is computed); the layer's router and expert backward run in
    between. The network's other work is not counted, so this is the layers' own share of
    a step, measured inside the step (the ``none`` vs ``dmoe`` comparison of two runs also
    sees cache effects and the optimizer step over the layers' parameters, but on a shared
    machine single rounds of it moved by ±30 %).
    """

    def __init__(self, model) -> None:
        from training.networks import DMoE

        self.layers = [m for m in model.modules() if isinstance(m, DMoE)]
        self.seconds = 0.0
        self._started: dict[tuple[int, str], float] = {}
        self._handles = []

    def _start(self, key: tuple[int, str]):
        def hook(*_):
            self._started[key] = time.perf_counter()
        return hook

    def _stop(self, key: tuple[int, str]):
        def hook(*_):
            self.seconds += time.perf_counter() - self._started.pop(key)
        return hook

    def __enter__(self) -> LayerTimer:
        for i, layer in enumerate(self.layers):
            self._handles += [
                layer.register_forward_pre_hook(self._start((i, "fwd"))),
                layer.register_forward_hook(self._stop((i, "fwd"))),
                layer.register_full_backward_pre_hook(self._start((i, "bwd"))),
                layer.register_full_backward_hook(self._stop((i, "bwd"))),
            ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def _gather(value: float) -> list[float]:
    from training.distributed import all_gather_objects

    return [float(v) for v in all_gather_objects(value)]


def _launch(n: int, args: argparse.Namespace, argv: list[str], moe: str) -> dict:
    threads = args.threads or max((os.cpu_count() or 1) // n, 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           os.path.abspath(__file__), "--worker", "--moe-mode", moe, *argv]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{n}-process run failed:\n{proc.stderr[-3000:]}")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_s"] = time.perf_counter() - start
            return result
    raise SystemExit(f"{n}-process run printed no result:\n{proc.stdout[-2000:]}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="per process")
    p.add_argument("--arch", default="transunet", choices=["transunet", "resunet"])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--patch", type=int, nargs="+", metavar="SIZE",
                   help="image size per axis, e.g. 64 64 32 (3 values = 3D; overrides "
                        "--image-size; resunet only)")
    p.add_argument("--moe", nargs="+", choices=["none", "moe", "dmoe"], default=["dmoe"],
                   help="MoE modes to compare (same network otherwise)")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate the MoE modes this many times; medians are printed")
    p.add_argument("--model-kwargs", default=None,
                   help=f"JSON kwargs for create_model (transunet default: "
                        f"{json.dumps(DEFAULT_TRANSUNET_KWARGS)})")
    p.add_argument("--moe-mode", default="dmoe", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help="torch threads per process (default: cores // N)")
    p.add_argument("--interleave", action="store_true",
                   help="one process: alternate single steps between the --moe modes' "
                        "networks (see the module docstring)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.worker:
        (_interleaved_worker if args.interleave else _worker)(args)
        return []
    if args.patch and (args.arch != "resunet" or len(args.patch) not in (2, 3)):
        raise SystemExit(f"--patch takes 2 or 3 sizes and --arch resunet, got {args.patch} "
                         f"with --arch {args.arch}")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    passthrough = _strip(argv, "--moe", "--rounds", "--processes")
    if args.interleave:
        return [_interleaved(args, passthrough)]
    size = "x".join(map(str, args.patch)) if args.patch else f"{args.image_size}px"
    print(f"{args.arch}/{args.preset} {size}, batch {args.batch_size}/process, "
          f"{args.steps} steps, {args.precision}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'moe':>5} {'procs':>5} {'threads':>7} {'samples/s':>10} {'s/step':>8} "
          f"{'peak RSS/proc MB':>17} {'total MB':>9}")
    results = []
    for n in args.processes:
        steps: dict[str, list[float]] = {m: [] for m in args.moe}
        for _ in range(args.rounds):
            for moe in args.moe:
                r = _launch(n, args, passthrough + ["--processes", str(n)], moe)
                results.append(r)
                steps[moe].append(r["s_per_step"])
                per = "/".join(f"{v:.0f}" for v in r["peak_rss_mb_per_process"])
                print(f"{moe:>5} {r['processes']:>5} {r['threads']:>7} "
                      f"{r['samples_per_s']:>10.1f} {r['s_per_step']:>8.3f} {per:>17} "
                      f"{r['peak_rss_mb_total']:>9.0f}", flush=True)
        for moe in (m for m in args.moe if m != "none"):
            shares = [r["moe_share"] for r in results
                      if r["moe"] == moe and r["processes"] == n and r["moe_share"] is not None]
            if shares:
                share = statistics.median(shares)
                print(f"{n} process(es), timed inside the step: the {moe} layers take "
                      f"{share:.1%} ({min(shares):.1%}–{max(shares):.1%}) of a step, "
                      f"+{share / (1 - share):.1%} over the rest of it (median of "
                      f"{len(shares)}, min–max)")
        if "none" in steps and len(steps) > 1:
            base = statistics.median(steps["none"])
            for moe in (m for m in args.moe if m != "none"):
                t = statistics.median(steps[moe])
                print(f"{n} process(es): {moe} {t:.3f} s/step vs none {base:.3f} s/step "
                      f"(medians of {args.rounds}): the {moe} layers take {1 - base / t:.1%} "
                      f"of a step, +{t / base - 1:.1%} over the network without them")
    return results


def _interleaved(args: argparse.Namespace, passthrough: list[str]) -> dict:
    """``--interleave``: one worker process runs every mode; prints per-mode step times and
    each MoE mode's added time against ``none`` over neighbouring steps."""
    if args.processes != [1] or "none" not in args.moe or len(args.moe) < 2:
        raise SystemExit("--interleave compares --moe none and MoE modes in one process: "
                         "give --processes 1 and --moe none dmoe (or moe)")
    r = _launch(1, args, passthrough + ["--processes", "1"], ",".join(args.moe))
    size = "x".join(map(str, args.patch)) if args.patch else f"{args.image_size}px"
    print(f"{args.arch}/{args.preset} {size}, batch {args.batch_size}, {args.precision}, "
          f"{r['threads']} thread(s), one process, {args.steps} alternating steps per mode "
          f"(after {args.warmup}), load average {os.getloadavg()[0]:.1f}; peak RSS "
          f"{r['peak_rss_mb']:.0f} MB for all {len(args.moe)} networks")
    base = r["seconds"]["none"]
    for moe in args.moe:
        t = r["seconds"][moe]
        line = (f"{moe:>5}: {statistics.median(t):.3f} s/step "
                f"({min(t):.3f}–{max(t):.3f})")
        if moe != "none":
            added = [a / b - 1 for a, b in zip(t, base)]
            shares = r["layer_shares"][moe]
            share = statistics.median(shares)
            line += (f"; adds {statistics.median(added):+.1%} (neighbouring steps: median, "
                     f"quartiles {_quartiles(added)}) to the network without them; timed "
                     f"inside the step its layers take {share:.1%} of it, "
                     f"+{share / (1 - share):.1%} over the rest")
        print(line, flush=True)
    return r


def _quartiles(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return f"{q[0]:+.1%}…{q[2]:+.1%}"


def _strip(argv: list[str], *options: str) -> list[str]:
    """``argv`` without the given options and their values."""
    out, skip = [], False
    for a in argv:
        if a.startswith("--"):
            skip = a.split("=")[0] in options
            if skip:
                continue
        elif skip:
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    main()
