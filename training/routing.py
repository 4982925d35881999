"""``python -m training.routing``: which experts serve which patient group, across a dataset.

``--checkpoint CKPT --data DATA [--split test] --out DIR`` segments every case of the split
with routing maps (``Segmenter.segment(return_routing=True)``), once under the case's own
attribute value and once under every other value (each vocabulary value and
``unknown``), and writes

- ``routing.json``::

    {"layers": {LAYER: {"groups": {GROUP: {"n_tokens": n, "top1_usage": [E floats],
                                            "gate_mass": [E floats], "entropy": x,
                                            "unused": [experts], "switch_fraction": {VALUE: x}}},
                        "js_divergence": {"G1|G2": x}}}}

  per dMoE layer and patient group (the case's attribute value; ``unknown`` for missing or
  unseen values): ``n_tokens`` routing-grid cells; ``top1_usage[i]`` share of those cells
  whose top-1 expert is expert ``E{i+1}`` (experts are numbered from 1, as in the plugin's
  maps and legend); ``gate_mass[i]`` share of all gate weight given to ``E{i+1}``; both sum
  to 1; ``entropy`` of ``top1_usage`` in bits (0 = one expert, log2 E = all equally);
  ``unused`` the expert numbers that are never top-1; ``switch_fraction[v]`` share of the
  group's cells whose top-1 expert changes when the attribute is swapped to ``v``;
  ``js_divergence["G1|G2"]`` Jensen–Shannon divergence (base 2, in [0, 1]) between the
  groups' ``top1_usage``, written for both orders (symmetric, 0 on the diagonal omitted);
- ``routing.png``: per dMoE layer a heatmap group × expert of ``top1_usage``. A model
  without dMoE/MoE layers gets ``{"layers": {}}`` and no figure; with ``--overwrite`` an
  earlier ``routing.png`` is then deleted, since it showed another model's routing and
  would contradict the new ``routing.json`` beside it (a placeholder figure would pass for
  a result).

Cases and splits are chosen exactly as ``training.evaluate`` chooses them, with the same
check of the checkpoint's data hash: data that differ from the training data are refused
for a split other than ``all`` unless ``--allow-changed-data``. An ``--out``
that already holds ``routing.json`` or ``routing.png`` (an earlier report's) is refused
before the model is loaded, unless ``--overwrite``; other files there are never touched.
Both files are written under a temporary name and renamed when complete: a kill or a full
disk (exit 4) leaves the earlier file or the new one, never a torn one; the temporary files
a killed run left (``.routing.json.XXXXXXXX.tmp``, …) are deleted by the next run into the
same ``--out`` that gets past that refusal, which prints one line naming them. While it
writes, ``--out`` is locked (``.napari-dmoe.lock``, as ``training.fit``'s run folder): a
second run into the same ``--out`` is refused (exit 2) naming the first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cli import add_checkpoint_data_arguments, add_config_argument, parse_with_config

UNKNOWN = "unknown"
OUTPUT_FILES = ("routing.json", "routing.png")
"""What :func:`routing_report` writes into ``out``."""


@dataclass
class RoutingReport:
    """``stats`` as written to ``out/routing.json``; ``removed``: files of an earlier report
    deleted because this one has no counterpart (an earlier ``routing.png`` when the model
    has no dMoE/MoE layer, with ``overwrite``)."""

    out: Path
    stats: dict[str, Any]
    removed: list[Path] = field(default_factory=list)


class _Accumulator:
    """Counts for one (layer, group)."""

    def __init__(self, num_experts: int) -> None:
        self.n = 0
        self.top1 = np.zeros(num_experts, np.float64)
        self.mass = np.zeros(num_experts, np.float64)
        self.switched: dict[str, float] = {}

    def add(self, gates: np.ndarray) -> np.ndarray:
        """``gates (E, *grid)`` of the case under its own value; returns its top-1 map."""
        top = gates.argmax(0)
        self.n += top.size
        self.top1 += np.bincount(top.ravel(), minlength=gates.shape[0])[: gates.shape[0]]
        self.mass += gates.reshape(gates.shape[0], -1).sum(1)
        return top

    def add_switch(self, value: str, own_top: np.ndarray, other_gates: np.ndarray) -> None:
        changed = float(np.count_nonzero(other_gates.argmax(0) != own_top))
        self.switched[value] = self.switched.get(value, 0.0) + changed

    def summary(self) -> dict[str, Any]:
        top1 = _normalise(self.top1)
        return {"n_tokens": int(self.n), "top1_usage": top1.tolist(),
                "gate_mass": _normalise(self.mass).tolist(), "entropy": _entropy(top1),
                "unused": [i + 1 for i, c in enumerate(self.top1) if c == 0],
                "switch_fraction": {v: (c / self.n if self.n else 0.0)
                                    for v, c in sorted(self.switched.items())}}


def _normalise(x: np.ndarray) -> np.ndarray:
    total = float(x.sum())
    return x / total if total > 0 else np.zeros_like(x)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum()) if p.size else 0.0


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon divergence in bits (0 = same distribution, 1 = disjoint)."""
    p, q = np.asarray(p, float), np.asarray(q, float)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float((a[mask] * np.log2(a[mask] / m[mask])).sum())

    return max(0.0, 0.5 * kl(p) + 0.5 * kl(q))


def routing_statistics(segmenter: Any, cases: list[tuple[np.ndarray, str]], *,
                       progress: Callable[[int, int], None] | None = None,
                       should_cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """The ``routing.json`` content for ``cases`` = ``[(image (C, *S), attribute value)]``.

    Each case runs once per router (its own value, then every other vocabulary value and
    ``unknown``); an attribute-blind model gives switch fractions of 0.
    """
    routers = [*segmenter.vocabulary, UNKNOWN]
    acc: dict[str, dict[str, _Accumulator]] = {}
    order: list[str] = []
    for i, (image, raw_value) in enumerate(cases):
        _, own = segmenter.encode(raw_value or None)
        result = segmenter.segment(image, own, channel_axis=0, return_routing=True,
                                   should_cancel=should_cancel)
        tops = []
        for routing in result.routing:
            if routing.name not in acc:
                acc[routing.name] = {}
                order.append(routing.name)
            group = acc[routing.name].setdefault(own, _Accumulator(routing.num_experts))
            tops.append(group.add(routing.expert_gates))
        for value in routers:
            if value == own:
                continue
            other = segmenter.segment(image, value, channel_axis=0, return_routing=True,
                                      should_cancel=should_cancel)
            for routing, top in zip(other.routing, tops, strict=True):
                acc[routing.name][own].add_switch(value, top, routing.expert_gates)
        if progress:
            progress(i + 1, len(cases))
    layers = {}
    for name in order:
        groups = {g: acc[name][g].summary() for g in sorted(acc[name], key=_group_key(routers))}
        js = {}
        for a in groups:
            for b in groups:
                if a != b:
                    js[f"{a}|{b}"] = js_divergence(np.array(groups[a]["top1_usage"]),
                                                   np.array(groups[b]["top1_usage"]))
        layers[name] = {"groups": groups, "js_divergence": js}
    return {"layers": layers}


def _group_key(routers: list[str]) -> Callable[[str], int]:
    return lambda g: routers.index(g) if g in routers else len(routers)


def plot_routing(stats: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """``routing.png``: one heatmap (groups × experts, top-1 usage) per dMoE layer.

    Renders with the Agg canvas directly (as ``training.report.plot_violin``): no pyplot,
    so matplotlib's global backend and figure list stay as they were (inside napari too).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .checkpoint import atomic_savefig

    layers = list(stats["layers"].items())
    if not layers:
        raise ValueError("no dMoE layer in the statistics: the model has no routing to plot")
    cols = min(len(layers), 2 if len(layers) <= 4 else 3)
    rows = math.ceil(len(layers) / cols)
    first_groups = layers[0][1]["groups"]
    n_groups = len(first_groups)
    n_experts = len(next(iter(first_groups.values()))["top1_usage"])
    fig = Figure(layout="constrained", figsize=(
        1.8 + cols * (0.42 * n_experts + 0.6), 0.9 + rows * (0.36 * n_groups + 0.9)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    image = None
    for ax in axes.ravel()[len(layers):]:
        ax.axis("off")
    for k, (ax, (name, layer)) in enumerate(zip(axes.ravel(), layers)):
        groups = list(layer["groups"])
        usage = np.array([layer["groups"][g]["top1_usage"] for g in groups])
        image = ax.imshow(usage, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (r, c), v in np.ndenumerate(usage):
            ax.text(c, r, f"{v:.0%}" if v >= 0.005 else "·", ha="center", va="center",
                    fontsize=7, color="black" if v > 0.6 else "white")
        ax.set_xticks(range(usage.shape[1]), [f"E{e + 1}" for e in range(usage.shape[1])],
                      fontsize=8)
        ax.set_yticks(range(len(groups)),
                      [f"{g} ({layer['groups'][g]['n_tokens']})" if k % cols == 0 else ""
                       for g in groups], fontsize=8)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title or "Top-1 expert usage per group (share of routing cells)", fontsize=10)
    fig.supylabel("group (routing cells)", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, label="top-1 usage")
    return atomic_savefig(fig, path, dpi=110)


def routing_report(checkpoint: str | Path, data: str | Path, out: str | Path, *,
                   split: str = "test", format: str | None = None, device: str = "auto",
                   seed: int = 0, progress: Callable[[int, int], None] | None = None,
                   should_cancel: Callable[[], bool] | None = None,
                   allow_changed_data: bool = False, overwrite: bool = False) -> RoutingReport:
    """Load the checkpoint and split (as ``training.evaluate``), write JSON and figure.

    A model without dMoE/MoE layers gets no figure; with ``overwrite`` an earlier
    ``routing.png`` in ``out`` is deleted (before the JSON is replaced), so no figure of
    another model's routing is left beside the new ``routing.json``. Once ``out`` and the
    data are accepted, ``out`` is locked until the last file is written
    (``training.run_folder.lock_outputs``) and the temporary files that killed writes of
    :data:`OUTPUT_FILES` left in ``out`` are deleted (one printed line names them).

    Raises:
        training.run_folder.RunFolderError: ``out`` holds one of :data:`OUTPUT_FILES`
            (an earlier report's) and not ``overwrite``; raised before the model is
            loaded, nothing is written or deleted.
        training.data.DataError: ``data`` are not the data the checkpoint was trained on
            (its manifest hash differs) and not ``allow_changed_data``, for a ``split``
            other than ``"all"`` (``training.evaluate.checkpoint_split``); nothing is
            written or deleted.
        training.run_folder.FolderInUseError: another run holds ``out``'s lock (it names
            the holder); nothing is written or deleted.
    """
    from .checkpoint import TEMP_SUFFIX, atomic_write_text
    from .data import read_case
    from .evaluate import checkpoint_split
    from .inference import Segmenter
    from .run_folder import existing_files, lock_outputs, refuse_earlier_outputs

    out = Path(out)
    if not overwrite:
        refuse_earlier_outputs(existing_files(out, OUTPUT_FILES), out)
    seg = Segmenter.from_checkpoint(checkpoint, device=device)
    attribute = seg.attribute_name
    cases = checkpoint_split(seg.metadata, checkpoint, data, split, format=format, seed=seed,
                             allow_changed_data=allow_changed_data, require_labels=False,
                             attribute=attribute)
    with lock_outputs(out, "training.routing", dict.fromkeys(OUTPUT_FILES, TEMP_SUFFIX),
                      overwrite=overwrite):  # out and data accepted: held while it writes
        loaded = []
        for case in cases:
            image, _, _ = read_case(case, spatial_dims=seg.spatial_dims)
            loaded.append((image, case.attributes.get(attribute, "") if attribute else ""))
        stats = routing_statistics(seg, loaded, progress=progress, should_cancel=should_cancel)
        removed = []
        figure = out / "routing.png"
        if not stats["layers"] and overwrite and os.path.lexists(figure):
            figure.unlink()  # first: a kill before the JSON is written leaves the earlier JSON
            removed.append(figure)
        atomic_write_text(out / "routing.json", json.dumps(stats, indent=2))
        if stats["layers"]:
            plot_routing(stats, figure,
                         title=f"{Path(checkpoint).stem} on {split} ({len(loaded)} cases): "
                               f"top-1 expert usage per {attribute or 'group'}")
    return RoutingReport(out, stats, removed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.routing",
                                description=__doc__.split("\n")[0])
    add_config_argument(p)
    add_checkpoint_data_arguments(p)
    return p


def main(argv: list[str] | None = None) -> RoutingReport:
    parser = build_parser()
    args = parse_with_config(parser, argv, required=("checkpoint", "data", "out"))
    from .checkpoint import CheckpointWriteError
    from .data import DataError

    try:
        report = routing_report(args.checkpoint, args.data, args.out, split=args.split,
                                format=args.format, device=args.device,
                                allow_changed_data=args.allow_changed_data,
                                overwrite=args.overwrite)
    except (DataError, ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    except CheckpointWriteError as exc:  # disk full, read-only folder: the message says which
        parser.exit(4, f"error: {exc}\n")
    for name, layer in report.stats["layers"].items():
        print(name)
        for group, g in layer["groups"].items():
            top = sorted(range(len(g["top1_usage"])), key=lambda e: -g["top1_usage"][e])[:3]
            used = ", ".join(f"E{e + 1} {g['top1_usage'][e]:.0%}" for e in top)
            switch = ", ".join(f"{v} {x:.0%}" for v, x in g["switch_fraction"].items())
            print(f"  {group:>10} (n={g['n_tokens']}): {used}; switched: {switch}")
    if not report.stats["layers"]:
        print("the model has no dMoE/MoE layer: nothing to report")
    for path in report.removed:
        print(f"removed the earlier {path.name}: another model's figure, which would not "
              "match routing.json")
    print(f"wrote {report.out}/routing.json" + (", routing.png" if report.stats["layers"]
                                                 else ""))
    return report


if __name__ == "__main__":
    main()
