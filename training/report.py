"""Evaluation outputs: ``metrics.json``, ``per_case.csv``, ``report.md``, ``violin.png``
and the side-by-side comparison table of several evaluation folders.

Markdown tables print every score ×100 with two decimals (the paper's style), e.g. a
Dice of 0.8531 is shown as ``85.31``. ``metrics.json`` and ``per_case.csv`` keep raw
fractions in ``[0, 1]``. Column layout follows Tables 1–3 of Oh et al. (ICML 2025):
ES-Dice, Dice, per-group Dice, ES-IoU, IoU, per-group IoU; group headers carry the case
count, e.g. ``White (n=152)``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.metrics import UNKNOWN_GROUP, foreground_names, group_name, sorted_groups

METRICS_FILE = "metrics.json"
_SCALE_NOTE = (
    "Scores ×100, two decimals. ES = overall / (1 + Σ_g |overall − group_g|) over the "
    "attribute's groups; the `unknown` group is reported but not part of ES. "
    "Per-case averaging; `mean` = mean over foreground classes."
)


def _fmt(value: float) -> str:
    """A fraction as the paper prints it: ×100, two decimals."""
    return f"{100.0 * float(value):.2f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _sections(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[("mean", ...), (class, ...), ...]`` from a fairness summary."""
    return [("mean", summary["mean"])] + list(summary["classes"].items())


def write_metrics_json(summary: dict[str, Any], path: str | Path) -> Path:
    """Write a :func:`training.metrics.fairness_summary` result as indented JSON."""
    from training.checkpoint import atomic_write_text

    return atomic_write_text(path, json.dumps(summary, indent=2) + "\n")


def write_per_case_csv(
    records: Sequence[dict[str, Any]],
    class_names: Sequence[str],
    attribute: str,
    path: str | Path,
) -> Path:
    """Write one row per case: ``id, <attribute>, dice_<class>…, iou_<class>…``.

    Args:
        records: per-case dicts ``{"id", "group", "dice": (K-1,), "iou": (K-1,)}``.
        class_names: ``K`` names (background first) or the ``K-1`` foreground ones.
        attribute: column name for the group value (unknown values are written as
            ``unknown``).
        path: output file.
    """
    from training.checkpoint import atomic_write_text

    n_fg = len(np.atleast_1d(records[0]["dice"])) if records else len(class_names) - 1
    fg = foreground_names(class_names, n_fg)
    header = ["id", attribute] + [f"dice_{c}" for c in fg] + [f"iou_{c}" for c in fg]
    with io.StringIO(newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for rec in records:
            dice = np.atleast_1d(np.asarray(rec["dice"], dtype=float))
            iou = np.atleast_1d(np.asarray(rec["iou"], dtype=float))
            if len(dice) != n_fg or len(iou) != n_fg:
                raise ValueError(
                    f"case {rec.get('id')!r} has {len(dice)} dice / {len(iou)} iou values, "
                    f"expected {n_fg} (one per foreground class)"
                )
            values = [f"{v:.6f}" for v in (*dice, *iou)]
            writer.writerow([rec["id"], group_name(rec.get("group")), *values])
        return atomic_write_text(path, fh.getvalue(), newline="")


def _group_header(metric: str, name: str, n: int) -> str:
    return f"{metric} {name} (n={n})"


def write_report_md(
    summary: dict[str, Any], path: str | Path, title: str = "Fairness evaluation"
) -> Path:
    """Write the paper-style table: one row per class plus the foreground mean.

    Columns: ES-Dice, Dice, ES-IoU, IoU, then Dice per group and IoU per group, each
    group header naming its case count (e.g. ``Dice White (n=152)``).
    """
    from training.checkpoint import atomic_write_text

    groups = summary["mean"]["groups"]
    names = list(groups)
    total = sum(int(groups[g]["n"]) for g in names)
    header = ["class", "ES-Dice", "Dice", "ES-IoU", "IoU"]
    header += [_group_header("Dice", g, groups[g]["n"]) for g in names]
    header += [_group_header("IoU", g, groups[g]["n"]) for g in names]
    rows = []
    for label, sec in _sections(summary):
        row = [label] + [_fmt(sec[k]) for k in ("es_dice", "dice", "es_iou", "iou")]
        row += [_fmt(sec["groups"][g]["dice"]) for g in names]
        row += [_fmt(sec["groups"][g]["iou"]) for g in names]
        rows.append(row)
    group_list = ", ".join(f"{g} (n={groups[g]['n']})" for g in names)
    text = "\n\n".join(
        [
            f"# {title}",
            f"_{_SCALE_NOTE}_",
            f"Attribute: **{summary['attribute']}** · {total} cases · groups: {group_list}",
            _md_table(header, rows),
        ]
    )
    return atomic_write_text(path, text + "\n")


def plot_violin(
    records: Sequence[dict[str, Any]], class_names: Sequence[str], path: str | Path
) -> Path:
    """Per-group Dice distributions, one panel per foreground class (paper Fig. 3a).

    Groups with at least two distinct values get a violin; every case is also drawn as a
    jittered dot, and the group mean as a black bar. Tick labels carry ``n``. Renders with
    the Agg canvas directly, so no global matplotlib backend is changed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from training.checkpoint import atomic_savefig

    if not records:
        raise ValueError("no records to plot; evaluate at least one case")
    dice = np.stack([np.atleast_1d(np.asarray(r["dice"], dtype=float)) for r in records])
    fg = foreground_names(class_names, dice.shape[1])
    groups = np.array([group_name(r.get("group")) for r in records], dtype=object)
    names = sorted_groups(set(groups.tolist()))
    fig = Figure(figsize=(max(4.0, 1.1 * len(names) + 1.5) * len(fg), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(fg), squeeze=False)[0]
    rng = np.random.default_rng(0)
    for c, (ax, cname) in enumerate(zip(axes, fg, strict=True)):
        for x, g in enumerate(names, start=1):
            vals = dice[groups == g, c]
            color = "0.6" if g == UNKNOWN_GROUP else f"C{(x - 1) % 10}"
            if np.unique(vals).size >= 2:
                parts = ax.violinplot(vals, positions=[x], widths=0.8, showextrema=False)
                for body in parts["bodies"]:
                    body.set_facecolor(color)
                    body.set_alpha(0.35)
            jitter = rng.uniform(-0.12, 0.12, size=vals.size)
            ax.scatter(x + jitter, vals, s=8, color=color, alpha=0.8, linewidths=0)
            ax.hlines(vals.mean(), x - 0.25, x + 0.25, colors="black", linewidth=2)
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels([f"{g}\n(n={int((groups == g).sum())})" for g in names])
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(cname)
        ax.set_ylabel("Dice" if c == 0 else "")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return atomic_savefig(fig, path)


def _load_metrics(folder: Path) -> dict[str, Any]:
    file = folder if folder.is_file() else folder / METRICS_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"no {METRICS_FILE} in {folder}; run `python -m training.evaluate ... --out "
            f"{folder}` first or pass an evaluation output folder"
        )
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON ({exc}); re-run training.evaluate") from exc


def _layout(summary: dict[str, Any]) -> tuple[str, list[str], dict[str, int]]:
    """Attribute, class names and ``{group: n}`` of a metrics.json, for comparison."""
    groups = summary["mean"]["groups"]
    return (
        summary["attribute"],
        list(summary["classes"]),
        {g: int(v["n"]) for g, v in groups.items()},
    )


def compare_markdown(eval_dirs: Sequence[str | Path], names: Sequence[str] | None = None) -> str:
    """Side-by-side comparison of several evaluations (paper Tables 1–3; rows = methods).

    Args:
        eval_dirs: folders written by ``training.evaluate`` (or their ``metrics.json``).
        names: one method name per folder; default: the folder names.

    Returns:
        Markdown: a header line, then one table per section (mean over foreground
        classes, then each class) with columns ES-Dice, Dice, per-group Dice, ES-IoU,
        IoU, per-group IoU. The best value of each column is bold.

    Raises:
        ValueError: no folders, a names/folders length mismatch, or evaluations that
            differ in attribute, classes, groups or group sizes.
        FileNotFoundError: a folder without ``metrics.json``.
    """
    dirs = [Path(d) for d in eval_dirs]
    if not dirs:
        raise ValueError("compare needs at least one evaluation folder")
    if names is None:
        names = [d.parent.name if d.is_file() else d.name for d in dirs]
    if len(names) != len(dirs):
        raise ValueError(f"got {len(names)} names for {len(dirs)} evaluation folders")
    summaries = [_load_metrics(d) for d in dirs]
    ref = _layout(summaries[0])
    for d, s in zip(dirs[1:], summaries[1:], strict=True):
        other = _layout(s)
        for what, a, b in zip(("attribute", "classes", "groups (n)"), ref, other, strict=True):
            if a != b:
                raise ValueError(
                    f"cannot compare {dirs[0]} and {d}: {what} differ ({a} vs {b}); "
                    "evaluate every method on the same split with the same attribute"
                )
    attribute, _, group_n = ref
    header = ["method", "ES-Dice", "Dice"]
    header += [_group_header("Dice", g, n) for g, n in group_n.items()]
    header += ["ES-IoU", "IoU"] + [_group_header("IoU", g, n) for g, n in group_n.items()]
    blocks = [f"_{_SCALE_NOTE}_", f"Attribute: **{attribute}**"]
    for label, _ in _sections(summaries[0]):
        table = []
        for s in summaries:
            sec = s["mean"] if label == "mean" else s["classes"][label]
            vals = [sec["es_dice"], sec["dice"]] + [sec["groups"][g]["dice"] for g in group_n]
            vals += [sec["es_iou"], sec["iou"]] + [sec["groups"][g]["iou"] for g in group_n]
            table.append([round(100.0 * float(v), 2) for v in vals])
        best = np.max(np.array(table), axis=0)
        rows = [
            [name]
            + [f"**{v:.2f}**" if v == b else f"{v:.2f}" for v, b in zip(r, best, strict=True)]
            for name, r in zip(names, table, strict=True)
        ]
        title = "mean over foreground classes" if label == "mean" else label
        blocks.append(f"### {title}\n\n" + _md_table(header, rows))
    return "\n\n".join(blocks) + "\n"
