"""What ``training.benchmark`` writes: ``results.csv``, ``summary.json``, ``summary.md``
(the paper's table layout, ×100, mean ± std over seeds, paired-bootstrap CIs, and per single
attribute for intersectional runs) and ``violin.png`` (per-group Dice per method).

``runs`` everywhere: ``{method: {seed: (per-case records, run info)}}``; ``summary``: the
dict :func:`training.benchmark.summarise` builds (schema in ``training.benchmark``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from .protocol import METHOD_TITLES
from .stats import RunScores, attribute_parts_of, known_groups, summary_of


def write_outputs(out: Path, runs: dict[str, dict[int, tuple[list[dict], dict]]],
                  summary: dict[str, Any]) -> None:
    """results.csv, summary.json, summary.md and violin.png in ``out``, each replaced in one
    step (``training.checkpoint.atomic_write_text``)."""
    from .checkpoint import atomic_write_text

    with io.StringIO(newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "group", "n", "dice", "iou", "es_dice", "es_iou"])
        for m, by_seed in runs.items():
            for s, (records, _) in sorted(by_seed.items()):
                sc = RunScores.from_records(records)
                d, i = summary_of(sc.dice, sc.groups), summary_of(sc.iou, sc.groups)
                w.writerow([m, s, "all", sc.ids.size, f"{d['overall']:.6f}",
                            f"{i['overall']:.6f}", f"{d['es']:.6f}", f"{i['es']:.6f}"])
                for g in known_groups(sc.groups):
                    w.writerow([m, s, g, int((sc.groups == g).sum()), f"{d['groups'][g]:.6f}",
                                f"{i['groups'][g]:.6f}", "", ""])
        atomic_write_text(out / "results.csv", f.getvalue(), newline="")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "summary.md", summary_markdown(summary))
    plot_methods_violin(runs, out / "violin.png")


def _pm(v: dict[str, float]) -> str:
    return f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}"


def summary_markdown(summary: dict[str, Any]) -> str:
    """The paper's table layout (×100, mean ± std over seeds) and the paired CIs."""
    methods = summary["methods"]
    groups = sorted({g for m in methods.values() for g in m["groups"]})
    ns = {g: next(m["groups"][g]["n"] for m in methods.values() if g in m["groups"])
          for g in groups}
    cell = {g: g.replace("|", "\\|") for g in groups}  # "Black|female" inside a table
    head = (["method", "ES-Dice", "Dice"] + [f"Dice {cell[g]} (n={ns[g]})" for g in groups]
            + ["ES-IoU", "IoU", "GFLOPs", "params (M)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, v in methods.items():
        cells = [METHOD_TITLES.get(m, m), _pm(v["es_dice"]), _pm(v["dice"])]
        cells += [_pm(v["groups"][g]) if g in v["groups"] else "—" for g in groups]
        cells += [_pm(v["es_iou"]), _pm(v["iou"]), f"{v['gflops']:.3f}",
                  f"{v['params'] / 1e6:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = max(len(v["seeds"]) for v in methods.values())
    lines += ["", f"×100, mean ± std over {seeds} seed(s); group n = test cases per seed."]
    if summary["vs"]:
        base = summary["baseline"]
        lines += ["", f"Difference from {METHOD_TITLES.get(base, base)} (×100, mean over "
                  "seeds [95 % paired bootstrap CI over seeds and test cases]):", ""]
        head = ["method", "ES-Dice", "Dice"] + [f"Dice {cell[g]}" for g in groups]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m, v in summary["vs"].items():
            cells = [METHOD_TITLES.get(m, m), _ci(v["es_dice_diff"]), _ci(v["dice_diff"])]
            cells += [_ci(v["groups"][g]) if g in v["groups"] else "—" for g in groups]
            lines.append("| " + " | ".join(cells) + " |")
    for part in attribute_parts_of(summary.get("attribute")):
        lines += ["", *part_markdown(summary, part)]
    return "\n".join(lines) + "\n"


def _ci(d: dict[str, Any]) -> str:
    lo, hi = d["ci95"]
    return f"{100 * d['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def part_markdown(summary: dict[str, Any], part: str) -> list[str]:
    """Lines of the per-single-attribute table of an intersectional benchmark: ES-Dice over
    ``part``'s values and Dice per value (×100, mean ± std), then the paired CIs."""
    methods = {m: v["attributes"][part] for m, v in summary["methods"].items()
               if part in v.get("attributes", {})}
    if not methods:
        return []
    values = sorted({g for m in methods.values() for g in m["groups"]})
    ns = {g: next(m["groups"][g]["n"] for m in methods.values() if g in m["groups"])
          for g in values}
    head = ["method", f"ES-Dice over {part}"] + [f"Dice {g} (n={ns[g]})" for g in values]
    lines = [f"By {part} alone (each case regrouped by its {part}; ×100, mean ± std over "
             "seeds):", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, v in methods.items():
        cells = [METHOD_TITLES.get(m, m), _pm(v["es_dice"])]
        cells += [_pm(v["groups"][g]) if g in v["groups"] else "—" for g in values]
        lines.append("| " + " | ".join(cells) + " |")
    vs = {m: v["attributes"][part] for m, v in summary["vs"].items()
          if part in v.get("attributes", {})}
    if vs:
        base = summary["baseline"]
        lines += ["", f"Difference from {METHOD_TITLES.get(base, base)} by {part} (×100 "
                  "[95 % paired bootstrap CI]):", ""]
        head = ["method", f"ES-Dice over {part}"] + [f"Dice {g}" for g in values]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m, v in vs.items():
            cells = [METHOD_TITLES.get(m, m), _ci(v["es_dice_diff"])]
            cells += [_ci(v["groups"][g]) if g in v["groups"] else "—" for g in values]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_methods_violin(runs: dict[str, dict[int, tuple[list[dict], dict]]],
                        path: Path) -> Path:
    """Per-group Dice (class mean per case, cases of all seeds) per method, one panel per
    method, like Figure 1 of Oh et al. 2025."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .checkpoint import atomic_savefig

    methods = list(runs)
    scores = {m: [RunScores.from_records(r[0]) for r in runs[m].values()] for m in methods}
    groups = sorted({g for m in methods for sc in scores[m] for g in known_groups(sc.groups)})
    fig = Figure(figsize=(2.0 + 1.0 * len(groups) * len(methods) * 0.75, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(methods), squeeze=False, sharey=True)[0]
    for ax, m in zip(axes, methods, strict=True):
        dice = np.concatenate([sc.dice for sc in scores[m]])
        grp = np.concatenate([sc.groups for sc in scores[m]]).astype(str)
        for x, g in enumerate(groups, start=1):
            vals = dice[grp == g]
            if vals.size == 0:
                continue
            if np.unique(vals).size >= 2:
                body = ax.violinplot(vals, positions=[x], widths=0.8, showextrema=False)
                for b in body["bodies"]:
                    b.set_facecolor(f"C{(x - 1) % 10}")
                    b.set_alpha(0.4)
            ax.hlines(vals.mean(), x - 0.3, x + 0.3, colors="black", linewidth=2)
        ax.set_xticks(range(1, len(groups) + 1))
        ax.set_xticklabels(groups, rotation=45, ha="right", fontsize=8)
        ax.set_title(METHOD_TITLES.get(m, m), fontsize=9)
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("test Dice per case (mean over classes)")
    fig.tight_layout()
    return atomic_savefig(fig, path)
