"""Statistics over methods × seeds × test cases for ``training.benchmark``.

A *run* is one (method, seed) evaluated on the test split: per case, a group name and the
class-mean Dice and IoU (``training.metrics`` conventions: per-case averaging, groups
``unknown`` excluded from the equity scaling).

:func:`paired_bootstrap` gives confidence intervals for the difference between a method
and a baseline, resampling **seeds** and, within each seed, **test cases** (stratified by
group, so that every group keeps its size; the same case indices for both methods, which
makes the comparison paired). Its percentiles are the 95 % interval of the mean
difference over seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .metrics import UNKNOWN_GROUP, equity_scaled, group_name


@dataclass(frozen=True)
class RunScores:
    """Per-case scores of one evaluated run: ``ids (N,)``, ``groups (N,)``, ``dice (N,)``,
    ``iou (N,)`` (class means per case)."""

    ids: np.ndarray
    groups: np.ndarray
    dice: np.ndarray
    iou: np.ndarray

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> RunScores:
        """From ``RunningFairness.records`` (``id``, ``group``, ``dice (K-1,)``, ``iou``)."""
        if not records:
            raise ValueError("no evaluated cases; evaluate at least one case")
        return cls(np.array([str(r["id"]) for r in records], dtype=object),
                   np.array([group_name(r.get("group")) for r in records], dtype=object),
                   np.array([float(np.mean(r["dice"])) for r in records]),
                   np.array([float(np.mean(r["iou"])) for r in records]))

    def aligned(self, ids: np.ndarray) -> RunScores:
        """The same cases in the order of ``ids`` (ValueError if a case is missing)."""
        where = {c: i for i, c in enumerate(self.ids.tolist())}
        missing = [c for c in ids.tolist() if c not in where]
        if missing:
            raise ValueError(f"runs were evaluated on different cases (missing {missing[:3]}); "
                             "evaluate every method on the same test split")
        idx = np.array([where[c] for c in ids.tolist()], dtype=int)
        return RunScores(self.ids[idx], self.groups[idx], self.dice[idx], self.iou[idx])


def regroup_by_part(scores: RunScores, attribute: str, part: str) -> RunScores:
    """An intersectional run (``attribute="race,gender"``, groups ``"Black|female"``) with
    every case regrouped by the single attribute ``part`` (``"race"`` → ``"Black"``);
    unknown or malformed combinations stay ``"unknown"``.

    Raises:
        ValueError: ``part`` is not one of ``attribute``'s parts.
    """
    from .data.cases import split_combination

    parts = attribute_parts_of(attribute)
    if part not in parts:
        raise ValueError(f"{part!r} is not a part of {attribute!r}; parts: {parts}")
    groups = np.array([group_name(split_combination(attribute, str(g)).get(part, ""))
                       for g in scores.groups.tolist()], dtype=object)
    return RunScores(scores.ids, groups, scores.dice, scores.iou)


def attribute_parts_of(attribute: str | None) -> list[str]:
    """``"race,gender"`` → ``["race", "gender"]``; ``[]`` for one attribute or None."""
    if not attribute or "," not in attribute:
        return []
    return [p.strip() for p in attribute.split(",")]


def known_groups(groups: np.ndarray) -> list[str]:
    return sorted({str(g) for g in groups.tolist()} - {UNKNOWN_GROUP})


def summary_of(values: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """``{"overall", "es", "groups": {g: mean}}`` of per-case ``values`` (ES over known
    groups, as ``training.metrics``)."""
    overall = float(values.mean())
    per_group = {g: float(values[groups == g].mean()) for g in known_groups(groups)}
    return {"overall": overall, "es": equity_scaled(overall, list(per_group.values())),
            "groups": per_group}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """``{"mean", "std"}`` (sample std, ddof 1; 0 for a single value)."""
    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()),
            "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0}


def _group_members(groups: np.ndarray) -> list[np.ndarray]:
    """Case indices of each group (sorted by group name), computed once per run."""
    names = groups.astype(str)
    return [np.flatnonzero(names == g) for g in np.unique(names)]


def _stratified_indices(members: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """One bootstrap resample within each group (``members`` from :func:`_group_members`)."""
    return np.concatenate([rng.choice(m, size=m.size, replace=True) for m in members])


Statistic = Callable[[np.ndarray, np.ndarray], dict[str, float]]


def es_and_groups(values: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """The bootstrap statistic: ES (key ``"es"``), overall (``"overall"``) and per group."""
    s = summary_of(values, groups)
    return {"es": s["es"], "overall": s["overall"], **{f"group:{g}": v
                                                       for g, v in s["groups"].items()}}


def paired_bootstrap(method: Mapping[int, RunScores], baseline: Mapping[int, RunScores],
                     metric: str = "dice", n_boot: int = 2000, seed: int = 0,
                     statistic: Statistic = es_and_groups) -> dict[str, dict[str, Any]]:
    """Paired bootstrap over seeds and test cases of ``method − baseline``.

    Args:
        method, baseline: per seed, the run's scores (the same test cases for both).
        metric: ``"dice"`` or ``"iou"``.
        n_boot: bootstrap replicates.
        seed: RNG seed of the resampling.
        statistic: per-run statistics (default: ES, overall and per-group means).

    Returns:
        ``{name: {"mean": observed mean difference over seeds, "ci95": [lo, hi]}}`` for
        every key of ``statistic``.
    """
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        raise ValueError("no seed was run for both methods; nothing to compare")
    pairs = []
    for s in seeds:
        base = baseline[s]
        pairs.append((method[s].aligned(base.ids), base))
    members = [_group_members(b.groups) for _, b in pairs]

    def diff(m: RunScores, b: RunScores, idx: np.ndarray | None) -> dict[str, float]:
        if idx is None:
            idx = np.arange(m.ids.size)
        sm = statistic(getattr(m, metric)[idx], m.groups[idx])
        sb = statistic(getattr(b, metric)[idx], b.groups[idx])
        return {k: sm[k] - sb[k] for k in sm if k in sb}

    observed = [diff(m, b, None) for m, b in pairs]
    keys = list(observed[0])
    rng = np.random.default_rng(seed)
    boot = {k: np.empty(n_boot) for k in keys}
    for r in range(n_boot):
        picked = rng.integers(0, len(pairs), size=len(pairs))
        acc = {k: 0.0 for k in keys}
        for p in picked:
            m, b = pairs[p]
            d = diff(m, b, _stratified_indices(members[p], rng))
            for k in keys:
                acc[k] += d.get(k, 0.0)
        for k in keys:
            boot[k][r] = acc[k] / len(pairs)
    return {k: {"mean": float(np.mean([o[k] for o in observed])),
                "ci95": [float(np.percentile(boot[k], 2.5)),
                         float(np.percentile(boot[k], 97.5))]} for k in keys}


def single_attribute_summaries(records: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                               attribute: str) -> dict[str, Any]:
    """Intersectional runs (``attribute="race,gender"``, groups ``"Black|female"``): the
    fairness summary (``training.metrics.fairness_summary``) per single attribute, each
    case regrouped by that attribute's value alone (unknown combinations stay unknown).
    """
    from .data.cases import split_combination
    from .metrics import fairness_summary

    parts = [p.strip() for p in attribute.split(",")]
    out = {}
    for part in parts:
        regrouped = [{**r, "group": split_combination(attribute, str(r.get("group") or ""))
                      .get(part, "")} for r in records]
        out[part] = fairness_summary(regrouped, class_names, part)
    return out
