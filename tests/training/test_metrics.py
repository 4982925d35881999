"""Tests for training.metrics: per-case scores, ES and the fairness summary."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.metrics import RunningFairness, case_scores, equity_scaled, fairness_summary

CLASSES = ["background", "rim", "cup"]


def test_case_scores_hand_computed():
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    target = np.array([[0, 1, 0], [2, 2, 2]])
    # class 1: pred {(0,1),(0,2)}, truth {(0,1)} -> tp=1 fp=1 fn=0: dice 2/3, iou 1/2
    # class 2: pred {(1,0),(1,1)}, truth {(1,0),(1,1),(1,2)} -> tp=2 fp=0 fn=1: dice 4/5, iou 2/3
    s = case_scores(pred, target, 3)
    np.testing.assert_allclose(s["dice"], [2 / 3, 4 / 5])
    np.testing.assert_allclose(s["iou"], [1 / 2, 2 / 3])
    assert s["dice"].shape == (2,) and s["iou"].shape == (2,)


def test_case_scores_empty_conventions():
    # K=4: class 1 only in truth, class 2 only in prediction, class 3 in neither
    target = np.array([[1, 0], [0, 0]])
    pred = np.array([[0, 2], [0, 0]])
    s = case_scores(pred, target, 4)
    np.testing.assert_array_equal(s["dice"], [0.0, 0.0, 1.0])
    np.testing.assert_array_equal(s["iou"], [0.0, 0.0, 1.0])
    # all background everywhere: every class is "both empty" -> 1.0
    s = case_scores(np.zeros((3, 3), int), np.zeros((3, 3), int), 3)
    np.testing.assert_array_equal(s["dice"], [1.0, 1.0])


def test_case_scores_3d_torch_matches_naive_loop():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=(6, 7, 5))
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, 4, target.shape))
    s = case_scores(torch.from_numpy(pred), torch.from_numpy(target), 4)
    for c in range(1, 4):
        p, t = pred == c, target == c
        inter = np.logical_and(p, t).sum()
        assert s["dice"][c - 1] == pytest.approx(2 * inter / (p.sum() + t.sum()))
        assert s["iou"][c - 1] == pytest.approx(inter / np.logical_or(p, t).sum())


@pytest.mark.parametrize(
    "pred, target, k, match",
    [
        (np.zeros((2, 2), int), np.zeros((2, 3), int), 3, "shape"),
        (np.full((2, 2), 3), np.zeros((2, 2), int), 3, "values must lie"),
        (np.zeros((2, 2)), np.zeros((2, 2), int), 3, "integer"),
        (np.zeros((2, 2), int), np.zeros((2, 2), int), 1, "num_classes"),
    ],
)
def test_case_scores_errors(pred, target, k, match):
    with pytest.raises(ValueError, match=match):
        case_scores(pred, target, k)


def test_equity_scaled_known_numbers():
    # gaps |0.8-0.9| + |0.8-0.7| + |0.8-0.6| = 0.4 -> 0.8 / 1.4
    assert equity_scaled(0.8, [0.9, 0.7, 0.6]) == pytest.approx(0.8 / 1.4)
    assert equity_scaled(0.8, [0.8, 0.8]) == pytest.approx(0.8)
    assert equity_scaled(0.5, []) == pytest.approx(0.5)


def _records():
    return [
        {"id": "a", "group": "A", "dice": np.array([1.0, 0.5]), "iou": np.array([1.0, 0.25])},
        {"id": "b", "group": "A", "dice": np.array([0.8, 0.7]), "iou": np.array([0.6, 0.5])},
        {"id": "c", "group": "B", "dice": np.array([0.6, 0.1]), "iou": np.array([0.4, 0.1])},
        {"id": "d", "group": "", "dice": np.array([0.2, 0.3]), "iou": np.array([0.1, 0.2])},
    ]


def test_fairness_summary_values_and_schema():
    s = fairness_summary(_records(), CLASSES, "race")
    assert set(s) == {"attribute", "classes", "mean"}
    assert s["attribute"] == "race"
    assert list(s["classes"]) == ["rim", "cup"]
    for sec in [*s["classes"].values(), s["mean"]]:
        assert set(sec) == {"dice", "iou", "es_dice", "es_iou", "groups"}
        assert list(sec["groups"]) == ["A", "B", "unknown"]
        for g in sec["groups"].values():
            assert set(g) == {"n", "dice", "iou"}
    rim, cup, mean = s["classes"]["rim"], s["classes"]["cup"], s["mean"]
    # rim dice: overall (1+.8+.6+.2)/4 = .65; A .9, B .6 (unknown .2 excluded from ES)
    # ES = .65 / (1 + .25 + .05) = .5
    assert rim["dice"] == pytest.approx(0.65)
    assert rim["es_dice"] == pytest.approx(0.5)
    assert rim["groups"]["A"] == {"n": 2, "dice": pytest.approx(0.9), "iou": pytest.approx(0.8)}
    assert rim["groups"]["unknown"]["n"] == 1
    assert rim["groups"]["unknown"]["dice"] == pytest.approx(0.2)
    # rim iou: overall .525; A .8, B .4 -> .525 / 1.4 = .375
    assert rim["es_iou"] == pytest.approx(0.375)
    # cup dice: overall .4; A .6, B .1 -> .4 / 1.5
    assert cup["es_dice"] == pytest.approx(0.4 / 1.5)
    # cup iou: overall .2625; A .375, B .1 -> .2625 / 1.275
    assert cup["es_iou"] == pytest.approx(0.2625 / 1.275)
    # mean: per-case class means a .75 b .75 c .35 d .25 -> overall .525, A .75, B .35
    # ES = .525 / (1 + .225 + .175) = .375, not the mean of per-class ES (.3833)
    assert mean["dice"] == pytest.approx(0.525)
    assert mean["groups"]["B"]["dice"] == pytest.approx(0.35)
    assert mean["es_dice"] == pytest.approx(0.375)
    assert mean["es_dice"] != pytest.approx((rim["es_dice"] + cup["es_dice"]) / 2)
    # mean iou per case: .625 .55 .25 .15 -> overall .39375; A .5875, B .25
    assert mean["es_iou"] == pytest.approx(0.39375 / (1 + 0.19375 + 0.14375))
    json.dumps(s)  # plain Python types only


def test_fairness_summary_class_names_and_errors():
    fg_only = fairness_summary(_records(), ["rim", "cup"], "race")
    assert fg_only == fairness_summary(_records(), CLASSES, "race")
    with pytest.raises(ValueError, match="class names"):
        fairness_summary(_records(), ["a", "b", "c", "d"], "race")
    with pytest.raises(ValueError, match="no records"):
        fairness_summary([], CLASSES, "race")


def test_all_unknown_gives_es_equal_overall():
    recs = [{**r, "group": "unknown"} for r in _records()]
    s = fairness_summary(recs, CLASSES, "race")
    assert list(s["mean"]["groups"]) == ["unknown"]
    assert s["mean"]["es_dice"] == pytest.approx(s["mean"]["dice"])


def test_running_fairness_matches_summary():
    tracker = RunningFairness(CLASSES, "race")
    pred = torch.tensor([[[0, 1], [2, 2]], [[0, 0], [0, 0]]])
    target = torch.tensor([[[0, 1], [2, 0]], [[1, 0], [0, 0]]])
    new = tracker.update(pred, target, groups=["White", None], ids=["x", "y"])
    # case x: rim dice 1, cup tp=1 fp=1 -> 2/3; case y: rim only in truth -> 0, cup empty -> 1
    np.testing.assert_allclose(new[0]["dice"], [1.0, 2 / 3])
    np.testing.assert_allclose(new[1]["dice"], [0.0, 1.0])
    assert new[1]["group"] == "unknown"
    s = tracker.summary()
    assert s == fairness_summary(tracker.records, CLASSES, "race")
    assert s["classes"]["rim"]["dice"] == pytest.approx(0.5)
    tracker.reset()
    assert tracker.records == []
    with pytest.raises(ValueError, match="group values"):
        tracker.update(pred, target, groups=["White"])
