"""Per-case segmentation scores and the equity-scaled fairness summary.

Definitions follow shared/DATA_FORMATS.md §5 and the FairSeg reference implementation
(Tian et al., ICLR 2024), with our own empty-mask conventions:

- Per case and foreground class ``c``: Dice and IoU on the evaluated grid. Prediction and
  truth both empty → 1.0; exactly one of them empty → 0.0. (The reference code scores an
  empty prediction 0 even on empty truth; we do not copy that.)
- ``overall_c`` = mean over all cases (unknown-attribute cases included);
  ``group_{g,c}`` = mean over the cases of group ``g``. Per-case averaging, never pooled
  voxels.
- ``ES_c = overall_c / (1 + Σ_g |overall_c − group_{g,c}|)`` where ``g`` runs over the
  attribute's groups present in the evaluated set. Cases whose attribute is unknown
  (group ``""``, ``None`` or ``"unknown"``) are reported as their own group named
  ``"unknown"`` but are **excluded** from the ES sum: ES measures disparity between the
  attribute's values, and "unknown" is not one of them.
- The ``"mean"`` entry averages over foreground classes: its Dice/IoU (overall and per
  group) are the class means of the per-class values, and its ES is computed on the
  class-averaged per-case scores (per-case mean over classes → overall and group means →
  ES). This is *not* the mean of the per-class ES values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

UNKNOWN_GROUP = "unknown"
_METRICS = ("dice", "iou")


def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor or array-like) as a numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def case_scores(pred: Any, target: Any, num_classes: int) -> dict[str, np.ndarray]:
    """Dice and IoU of one case for every foreground class.

    Args:
        pred: integer label map ``(*spatial)`` (numpy array or torch tensor), values in
            ``[0, num_classes)``.
        target: integer label map of the same shape and range.
        num_classes: ``K``, number of classes including background 0.

    Returns:
        ``{"dice": (K-1,), "iou": (K-1,)}`` float64 arrays for classes ``1..K-1``.
        Both masks empty for a class → 1.0; exactly one empty → 0.0.

    Raises:
        ValueError: on a shape mismatch, non-integer input, values outside
            ``[0, num_classes)`` or ``num_classes < 2``.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + 1 class), got {num_classes}")
    p, t = _to_numpy(pred), _to_numpy(target)
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} differs from target shape {t.shape}")
    for name, arr in (("pred", p), ("target", t)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(
                f"{name} values must lie in [0, {num_classes}), got range "
                f"[{arr.min()}, {arr.max()}]; check num_classes or the label remapping"
            )
    k = num_classes
    flat = t.ravel().astype(np.int64) * k + p.ravel().astype(np.int64)
    cm = np.bincount(flat, minlength=k * k).reshape(k, k)  # cm[true, pred]
    tp = np.diag(cm)[1:].astype(np.float64)
    fp = cm.sum(axis=0)[1:] - tp
    fn = cm.sum(axis=1)[1:] - tp
    dice_den = 2 * tp + fp + fn
    iou_den = tp + fp + fn
    empty = dice_den == 0  # both masks empty for that class
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(empty, 1.0, 2 * tp / np.where(empty, 1, dice_den))
        iou = np.where(empty, 1.0, tp / np.where(empty, 1, iou_den))
    return {"dice": dice, "iou": iou}


def equity_scaled(overall: float, group_values: Sequence[float]) -> float:
    """Equity-scaled performance ``overall / (1 + Σ_g |overall − g|)``.

    Args:
        overall: the score over all cases (e.g. mean Dice).
        group_values: the same score per group; an empty sequence gives ``overall``.

    Returns:
        The equity-scaled score (FairSeg, Tian et al. 2024, Eq. for ES-Dice/ES-IoU).
    """
    overall = float(overall)
    gaps = sum(abs(overall - float(g)) for g in group_values)
    return overall / (1.0 + gaps)


def group_name(value: Any) -> str:
    """Normalise an attribute value: ``""``, ``None`` and ``"unknown"`` → ``"unknown"``."""
    if value is None:
        return UNKNOWN_GROUP
    name = str(value)
    return UNKNOWN_GROUP if name.strip() == "" or name == UNKNOWN_GROUP else name


def sorted_groups(names: set[str] | Sequence[str]) -> list[str]:
    """Groups sorted by name, with ``"unknown"`` (if present) last."""
    known = sorted(n for n in set(names) if n != UNKNOWN_GROUP)
    return known + ([UNKNOWN_GROUP] if UNKNOWN_GROUP in names else [])


def foreground_names(class_names: Sequence[str], num_foreground: int) -> list[str]:
    """Foreground class names from a list with or without the background name.

    Args:
        class_names: ``K`` names (background first, as stored in checkpoints) or the
            ``K-1`` foreground names.
        num_foreground: ``K-1``, the length of the per-case score vectors.

    Raises:
        ValueError: if the length matches neither convention.
    """
    names = [str(c) for c in class_names]
    if len(names) == num_foreground + 1:
        return names[1:]
    if len(names) == num_foreground:
        return names
    raise ValueError(
        f"got {len(names)} class names {names} for {num_foreground} foreground scores; "
        f"pass all {num_foreground + 1} names (background first) or the {num_foreground} "
        "foreground names"
    )


def _score_table(records: Sequence[dict[str, Any]], metric: str) -> np.ndarray:
    """Stack ``records[i][metric]`` into ``(N, K-1)``."""
    rows = [np.atleast_1d(_to_numpy(r[metric])).astype(np.float64) for r in records]
    widths = {row.shape for row in rows}
    if len(widths) != 1:
        raise ValueError(f"records carry {metric} vectors of different shapes: {sorted(widths)}")
    return np.stack(rows)


def _summarise(scores: dict[str, np.ndarray], groups: np.ndarray, names: list[str]) -> dict:
    """Overall, ES and per-group stats for one column of per-case scores each.

    Args:
        scores: ``{"dice": (N,), "iou": (N,)}``.
        groups: ``(N,)`` normalised group names.
        names: the group order to report.
    """
    out: dict[str, Any] = {}
    group_means: dict[str, dict[str, float]] = {g: {} for g in names}
    for metric in _METRICS:
        values = scores[metric]
        overall = float(values.mean())
        for g in names:
            group_means[g][metric] = float(values[groups == g].mean())
        known = [group_means[g][metric] for g in names if g != UNKNOWN_GROUP]
        out[metric] = overall
        out[f"es_{metric}"] = equity_scaled(overall, known)
    out["groups"] = {g: {"n": int((groups == g).sum()), **group_means[g]} for g in names}
    return {k: out[k] for k in ("dice", "iou", "es_dice", "es_iou", "groups")}


def fairness_summary(
    records: Sequence[dict[str, Any]], class_names: Sequence[str], attribute: str
) -> dict[str, Any]:
    """Fairness metrics of an evaluated set: the ``metrics.json`` schema of issue 3.

    Args:
        records: one dict per case, ``{"id": str, "group": str, "dice": (K-1,),
            "iou": (K-1,)}`` (e.g. from :func:`case_scores`). ``group`` ``""``, ``None``
            or ``"unknown"`` marks an unknown attribute value.
        class_names: ``K`` class names (background first) or the ``K-1`` foreground ones.
        attribute: the attribute's name (e.g. ``"race"``).

    Returns:
        ``{"attribute": str, "classes": {name: {"dice", "iou", "es_dice", "es_iou",
        "groups": {value: {"n", "dice", "iou"}}}}, "mean": {same keys}}``; groups sorted
        by name, ``"unknown"`` last (reported, excluded from ES; see module docstring).

    Raises:
        ValueError: on no records or class names that do not fit the score vectors.
    """
    if len(records) == 0:
        raise ValueError("no records to summarise; evaluate at least one case")
    tables = {m: _score_table(records, m) for m in _METRICS}
    if tables["dice"].shape != tables["iou"].shape:
        raise ValueError(
            f"dice {tables['dice'].shape} and iou {tables['iou'].shape} tables differ in shape"
        )
    fg = foreground_names(class_names, tables["dice"].shape[1])
    groups = np.array([group_name(r.get("group")) for r in records], dtype=object)
    names = sorted_groups(set(groups.tolist()))
    classes = {
        name: _summarise({m: tables[m][:, c] for m in _METRICS}, groups, names)
        for c, name in enumerate(fg)
    }
    mean = _summarise({m: tables[m].mean(axis=1) for m in _METRICS}, groups, names)
    return {"attribute": str(attribute), "classes": classes, "mean": mean}


class RunningFairness:
    """Accumulates per-case scores during validation and summarises them.

    Args:
        class_names: ``K`` class names, background first.
        attribute: the attribute's name, copied into the summary.

    Example:
        >>> tracker = RunningFairness(["background", "rim", "cup"], "race")
        >>> tracker.update(pred, target, groups=["White", "Black"], ids=["a", "b"])
        >>> tracker.summary()["mean"]["es_dice"]
    """

    def __init__(self, class_names: Sequence[str], attribute: str) -> None:
        if len(class_names) < 2:
            raise ValueError(
                f"class_names needs background + at least one class, got {list(class_names)}"
            )
        self.class_names = [str(c) for c in class_names]
        self.attribute = str(attribute)
        self.records: list[dict[str, Any]] = []

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def reset(self) -> None:
        """Forget every accumulated case."""
        self.records = []

    def update(
        self,
        pred: Any,
        target: Any,
        groups: Sequence[Any],
        ids: Sequence[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Score a batch of cases and remember them.

        Args:
            pred: integer label maps ``(B, *spatial)`` (numpy or torch).
            target: integer label maps ``(B, *spatial)``.
            groups: ``B`` attribute values (``""``/``None`` = unknown).
            ids: ``B`` case ids; default ``"case<running index>"``.

        Returns:
            The ``B`` new records.
        """
        p, t = _to_numpy(pred), _to_numpy(target)
        if p.shape != t.shape:
            raise ValueError(f"pred shape {p.shape} differs from target shape {t.shape}")
        if len(groups) != p.shape[0]:
            raise ValueError(f"got {len(groups)} group values for a batch of {p.shape[0]}")
        if ids is not None and len(ids) != p.shape[0]:
            raise ValueError(f"got {len(ids)} ids for a batch of {p.shape[0]}")
        new = []
        for b in range(p.shape[0]):
            scores = case_scores(p[b], t[b], self.num_classes)
            case_id = str(ids[b]) if ids is not None else f"case{len(self.records) + b}"
            new.append({"id": case_id, "group": group_name(groups[b]), **scores})
        self.records.extend(new)
        return new

    def summary(self) -> dict[str, Any]:
        """The :func:`fairness_summary` of every case seen since the last reset."""
        return fairness_summary(self.records, self.class_names, self.attribute)
