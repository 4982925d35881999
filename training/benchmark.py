"""``python -m training.benchmark``: every method × seed with the same budget, evaluated on
the test split, summarised with paired-bootstrap confidence intervals.

    python -m training.benchmark --data D --attribute A \\
        --methods none,moe,dmoe,febs,groupdro,adv,separate --seeds 3 --out DIR [fit flags]

Any ``training.fit`` flag sets the shared budget (``--epochs``, ``--image-size``, …);
``--seed S`` is the first seed (seeds ``S … S+N−1``). Methods (``training.protocol.METHODS``):
``none`` TransUNet/ResUNet, ``moe`` attribute-blind MoE, ``dmoe``, ``febs``, ``groupdro``,
``adv`` (gradient-reversal discriminator), ``separate`` (one backbone per group).

Each run trains with :func:`training.fitting.fit` into ``DIR/runs/METHOD/seedS`` and is
evaluated with :func:`training.evaluate.evaluate` into ``…/test``; a run whose
``test/run.json`` exists is skipped, so rerunning the same command resumes (an
interrupted training continues from its last epoch); a finished run trained with other
settings (another ``--epochs``, ``--lr``, …) is refused rather than mixed into the table.
A benchmark holds ``DIR``'s lock until it has written its summaries: a second one into the
same ``DIR`` is refused (exit 2, naming the first) instead of training the same runs.
Outputs:

- ``DIR/results.csv``: one row per method, seed and group (plus group ``all`` with ES);
- ``DIR/summary.json``: ``{"methods": {M: {"es_dice": {"mean", "std"}, "dice", "es_iou",
  "iou", "groups": {G: {"mean", "std", "n"}}, "gflops", "params"}}, "vs": {M:
  {"baseline", "es_dice_diff": {"mean", "ci95"}, "groups": {G: {"mean", "ci95"}}}}}``;
- intersectional runs (``--attribute race,gender``; groups are combinations such as
  ``"Black|female"``) also get per-single-attribute aggregates, each test case regrouped by
  one part's value: ``methods[M]["attributes"][part] = {"es_dice": {"mean", "std"},
  "groups": {value: {"mean", "std", "n"}}}`` and ``vs[M]["attributes"][part] =
  {"es_dice_diff": {"mean", "ci95"}, "groups": {value: {"mean", "ci95"}}}`` (the bootstrap
  then resamples cases within each value of that part);
- ``DIR/summary.md``: the paper's table (×100, mean ± std over seeds) and the CIs, and for
  intersectional runs the same per single attribute;
- ``DIR/violin.png``: per-group Dice distributions per method (cases pooled over seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .benchmark_report import write_outputs
from .protocol import METHODS
from .run_folder import lock_folder
from .stats import (
    RunScores,
    attribute_parts_of,
    known_groups,
    mean_std,
    paired_bootstrap,
    regroup_by_part,
    summary_of,
)

METRICS = ("es_dice", "dice", "es_iou", "iou")


@dataclasses.dataclass
class BenchmarkResult:
    out: Path
    summary: dict[str, Any]
    ran: list[tuple[str, int]]
    skipped: list[tuple[str, int]]


def run_dir(out: Path, method: str, seed: int) -> Path:
    return Path(out) / "runs" / method / f"seed{seed}"


def method_config(base: Any, method: str, seed: int, out: Path):
    """The ``FitConfig`` of one run: ``base`` with the method's settings and the seed."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    changes = dict(METHODS[method])
    if changes.get("arch") == "separate":
        kwargs = dict(base.model_kwargs)
        kwargs.setdefault("backbone", base.arch)
        changes["model_kwargs"] = kwargs
    return dataclasses.replace(base, **changes, seed=seed, out=str(run_dir(out, method, seed)),
                               resume=True, quiet=True)


def cost_of(checkpoint: Path) -> dict[str, float]:
    """Parameters and inference GFLOPs (batch 1; ``separate``: all group models, the
    paper's convention) of a trained checkpoint at its training input size."""
    import torch

    from .checkpoint import load_checkpoint
    from .flops import count_flops, count_params

    model, meta = load_checkpoint(checkpoint, device="cpu")
    pre = meta["preprocessing"]
    size = pre.get("image_size") or pre.get("patch_size")
    channels = int(pre.get("in_channels") or 1)
    with torch.no_grad():
        flops = count_flops(model, (1, channels, *size))
    return {"params": int(count_params(model)), "gflops": flops.total / 1e9}


def run_one(config: Any, data: str, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    """Train (or resume) one run, evaluate its best checkpoint on the test split."""
    from .checkpoint import atomic_write_text
    from .evaluate import evaluate
    from .fitting import fit

    out = Path(config.out)
    start = time.perf_counter()
    result = fit(config)
    # overwrite: run_one runs only for a run without test/run.json (load_run skips finished
    # ones), so files in test/ are from an evaluation that was interrupted before run.json,
    # not a result to keep; fit's --resume already protects the trained run itself
    ev = evaluate(result.best_checkpoint, data, out / "test", split="test", format=config.format,
                  device=config.device, overwrite=True)
    cost = cost_of(result.best_checkpoint)
    info = {"best_epoch": result.best_epoch, "seconds": round(time.perf_counter() - start, 1),
            **cost}
    records = [{"id": str(r["id"]), "group": str(r.get("group")),
                "dice": [float(v) for v in r["dice"]], "iou": [float(v) for v in r["iou"]]}
               for r in ev.records]
    atomic_write_text(out / "test" / "records.json", json.dumps(records))
    atomic_write_text(out / "test" / "run.json", json.dumps(info, indent=2))  # last: done
    log(f"  ES-Dice {ev.summary['mean']['es_dice']:.4f} Dice {ev.summary['mean']['dice']:.4f} "
        f"(best epoch {result.best_epoch}, {info['seconds']:.0f} s)")
    return records, info


def load_run(out: Path, method: str, seed: int) -> tuple[list[dict], dict] | None:
    """A finished run's per-case records and cost, or None if it has not finished."""
    test = run_dir(out, method, seed) / "test"
    if not (test / "run.json").is_file() or not (test / "records.json").is_file():
        return None
    records = json.loads((test / "records.json").read_text())
    return records, json.loads((test / "run.json").read_text())


SAME_RESULT = frozenset({"data", "out", "quiet", "workers", "device", "compile",
                         "grad_checkpoint", "description"})
"""Settings that do not change what a run learns (where it reads and writes, how fast, how
much it logs): a finished run trained under others differs only in these."""


def settings_changed(out: Path, base: Any, runs: Sequence[tuple[str, int]]) -> list[str]:
    """For each finished run of ``runs`` (``(method, seed)``), the settings its
    ``config.yaml`` differs in from the run this benchmark would train
    (``"DIR: epochs: 1 → 2; …"``), :data:`SAME_RESULT` aside. A run without a readable
    ``config.yaml`` cannot be compared and is not listed."""
    import yaml

    from .fitting.config import saved_config
    from .train_state import config_differences

    changed = []
    for method, seed in runs:
        saved = run_dir(out, method, seed) / "config.yaml"
        try:
            trained = yaml.safe_load(saved.read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        wanted = saved_config(method_config(base, method, seed, out))
        diffs = config_differences(trained, wanted, ignore=SAME_RESULT)
        if diffs:
            changed.append(f"{run_dir(out, method, seed)}: {'; '.join(diffs)}")
    return changed


def benchmark(base: Any, methods: Sequence[str], seeds: Sequence[int], out: str | Path, *,
              baseline: str = "none", n_boot: int = 2000,
              log: Callable[[str], None] = print) -> BenchmarkResult:
    """Run every method × seed (skipping finished runs) and write the summaries.

    A finished run trained with other settings than this call's (:func:`settings_changed`)
    is refused before anything trains (ValueError naming each run and setting), and so is an
    ``out`` another live benchmark holds (:class:`~training.run_folder.FolderInUseError`).

    Args:
        base: a ``FitConfig`` with the shared budget (its ``out``/``seed``/method fields are
            replaced per run).
        methods: names from ``training.protocol.METHODS``.
        seeds: training seeds.
        out: output folder.
        baseline: method the others are compared with (the first method if absent).
        n_boot: bootstrap replicates for the confidence intervals.
    """
    out = Path(out)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    # the whole benchmark holds --out: a second one into the same folder would train the
    # same unfinished runs and race this one's records, run.json and summaries
    with lock_folder(out, "training.benchmark", log=log):
        return _run_all(base, methods, seeds, out, baseline, n_boot, log)


def _run_all(base: Any, methods: Sequence[str], seeds: Sequence[int], out: Path,
             baseline: str, n_boot: int, log: Callable[[str], None]) -> BenchmarkResult:
    """:func:`benchmark`'s work, with ``out`` locked."""
    ran, skipped = [], []
    runs: dict[str, dict[int, tuple[list[dict], dict]]] = {m: {} for m in methods}
    total = len(methods) * len(seeds)
    finished = {(m, s): run for s in seeds for m in methods
                if (run := load_run(out, m, s)) is not None}
    changed = settings_changed(out, base, list(finished))
    if changed:  # before anything trains: the table would mix two budgets
        shown = "\n  ".join(changed[:5]) + (f"\n  … and {len(changed) - 5} more"
                                            if len(changed) > 5 else "")
        raise ValueError(f"{out} holds {len(changed)} finished run(s) trained with other "
                         f"settings than these (trained → now):\n  {shown}\nSummarising them "
                         "with runs of the new settings would mix two budgets in one table. "
                         "Nothing was trained or written. Use another --out for the new "
                         "settings, or delete those run folders to train them again.")
    for i, (seed, m) in enumerate(((s, m) for s in seeds for m in methods), start=1):
        if (m, seed) in finished:
            skipped.append((m, seed))
            runs[m][seed] = finished[(m, seed)]
            continue
        log(f"[{i}/{total}] {m} seed {seed}")
        runs[m][seed] = run_one(method_config(base, m, seed, out), base.data, log)
        ran.append((m, seed))
    summary = summarise(runs, baseline if baseline in methods else methods[0], n_boot,
                        attribute=getattr(base, "attribute", None))
    write_outputs(out, runs, summary)
    return BenchmarkResult(out, summary, ran, skipped)


def group_scores(by_seed: dict[int, RunScores]) -> dict[str, Any]:
    """``{"es_dice", "dice", "es_iou", "iou": {"mean", "std"}, "groups": {G: {"mean", "std",
    "n"}}}`` over seeds (group n: test cases of the first seed)."""
    per_seed = {s: {"dice": summary_of(sc.dice, sc.groups),
                    "iou": summary_of(sc.iou, sc.groups)} for s, sc in by_seed.items()}
    groups = sorted({g for sc in by_seed.values() for g in known_groups(sc.groups)})
    first = next(iter(by_seed.values()))
    return {
        "es_dice": mean_std([p["dice"]["es"] for p in per_seed.values()]),
        "dice": mean_std([p["dice"]["overall"] for p in per_seed.values()]),
        "es_iou": mean_std([p["iou"]["es"] for p in per_seed.values()]),
        "iou": mean_std([p["iou"]["overall"] for p in per_seed.values()]),
        "groups": {g: {**mean_std([p["dice"]["groups"][g] for p in per_seed.values()
                                   if g in p["dice"]["groups"]]),
                       "n": int((first.groups == g).sum())} for g in groups},
    }


def compare(method: dict[int, RunScores], baseline: dict[int, RunScores], name: str,
            n_boot: int) -> dict[str, Any]:
    """``{"baseline", "es_dice_diff", "dice_diff", "groups"}``: paired-bootstrap
    differences ``method − baseline``."""
    boot = paired_bootstrap(method, baseline, "dice", n_boot=n_boot)
    return {"baseline": name, "es_dice_diff": boot["es"], "dice_diff": boot["overall"],
            "groups": {k.split(":", 1)[1]: v for k, v in boot.items()
                       if k.startswith("group:")}}


def summarise(runs: dict[str, dict[int, tuple[list[dict], dict]]], baseline: str,
              n_boot: int, attribute: str | None = None) -> dict[str, Any]:
    """``summary.json``'s content from every run's records (see the module docstring).

    ``attribute``: the runs' ``--attribute``; with several (``race,gender``) each method
    also gets per-single-attribute aggregates under ``"attributes"``.
    """
    scores = {m: {s: RunScores.from_records(r[0]) for s, r in by_seed.items()}
              for m, by_seed in runs.items()}
    parts = attribute_parts_of(attribute)
    by_part = {m: {part: {s: regroup_by_part(sc, attribute, part) for s, sc in by_seed.items()}
                   for part in parts} for m, by_seed in scores.items()}
    methods: dict[str, Any] = {}
    for m, by_seed in scores.items():
        costs = [r[1] for r in runs[m].values()]
        methods[m] = {
            **group_scores(by_seed),
            "gflops": float(costs[0]["gflops"]), "params": int(costs[0]["params"]),
            "seeds": sorted(by_seed),
            "best_epochs": [int(r[1].get("best_epoch", 0)) for r in runs[m].values()],
        }
        if parts:
            methods[m]["attributes"] = {}
            for part, part_scores in by_part[m].items():
                agg = group_scores(part_scores)
                methods[m]["attributes"][part] = {"es_dice": agg["es_dice"],
                                                  "groups": agg["groups"]}
    vs: dict[str, Any] = {}
    for m in scores:
        if m == baseline:
            continue
        vs[m] = compare(scores[m], scores[baseline], baseline, n_boot)
        if parts:
            vs[m]["attributes"] = {}
            for part in parts:
                c = compare(by_part[m][part], by_part[baseline][part], baseline, n_boot)
                vs[m]["attributes"][part] = {"es_dice_diff": c["es_dice_diff"],
                                             "groups": c["groups"]}
    out = {"methods": methods, "vs": vs, "baseline": baseline,
           "bootstrap": {"replicates": n_boot, "resampled": "seeds, then test cases "
                         "within each group (paired: same cases for both methods)"}}
    if parts:
        out["attribute"] = attribute
    return out


def build_parser() -> argparse.ArgumentParser:
    from .fit import build_parser as fit_parser

    p = fit_parser()
    p.prog = "python -m training.benchmark"
    p.description = __doc__.split("\n")[0]
    g = p.add_argument_group("benchmark")
    g.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, from {','.join(METHODS)} (default: all)")
    g.add_argument("--seeds", type=int, default=3, help="number of seeds (from --seed)")
    g.add_argument("--baseline", default="none", help="method the CIs compare with")
    g.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates")
    return p


def main(argv: list[str] | None = None) -> BenchmarkResult:
    from .cli import parse_with_config
    from .data import DataError
    from .engine import NonFiniteLoss, TrainingInterrupted
    from .fitting import FitConfig

    parser = build_parser()
    args = parse_with_config(parser, argv, required=("data",))
    own = {"methods", "seeds", "baseline", "bootstrap", "config"}
    try:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if args.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
        base = FitConfig(**{k: v for k, v in vars(args).items() if k not in own
                            and k != "moe"}, moe="none")
        for line in base.protocol_report.lines():  # --protocol: applied and overridden
            print(line, file=sys.stderr)
        seeds = list(range(args.seed, args.seed + args.seeds))
        result = benchmark(base, methods, seeds, args.out, baseline=args.baseline,
                           n_boot=args.bootstrap)
    except (DataError, ValueError) as exc:
        parser.exit(2, f"error: {exc}\n")
    except (NonFiniteLoss, TrainingInterrupted) as exc:
        parser.exit(getattr(exc, "exit_code", 3), f"{exc}\nFinished runs are kept; the same "
                    "command continues the benchmark.\n")
    print((result.out / "summary.md").read_text())
    print(f"wrote {result.out}/results.csv, summary.json, summary.md, violin.png "
          f"({len(result.ran)} run(s) trained, {len(result.skipped)} already done)",
          file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
