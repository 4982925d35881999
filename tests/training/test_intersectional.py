"""Intersectional routing: --attribute race,gender routes by the combination, reports groups
per combination and per single attribute, and sends unseen combinations to the unknown
router; the intersectional synthetic set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from training.data import (
    Case,
    DataError,
    build_vocabulary,
    combine_attributes,
    encode_attribute,
    make_synthetic_dataset,
    split_combination,
)
from training.stats import single_attribute_summaries


def _case(i, race, gender, split="train"):
    return Case(id=f"c{i}", image=Path(f"{i}.png"), label=None,
                attributes={"race": race, "gender": gender}, split=split)


def test_combination_attribute_vocabulary_and_unknowns():
    cases = [_case(0, "Black", "female"), _case(1, "White", "male"), _case(2, "Black", ""),
             _case(3, "Asian", "female", split="test")]
    combined = combine_attributes(cases, "race,gender")
    values = [c.attributes["race,gender"] for c in combined]
    assert values == ["Black|female", "White|male", "", "Asian|female"]
    assert combined[0].attributes["race"] == "Black"  # the single columns stay
    vocab = build_vocabulary(combined, "race,gender")
    assert vocab == ["Black|female", "White|male"]  # one router per observed combination
    # a combination never seen in training, or a missing part: the unknown router (-1)
    assert encode_attribute("Asian|female", vocab) == -1
    assert encode_attribute(values[2], vocab) == -1
    assert encode_attribute("White|male", vocab) == 1
    assert combine_attributes(cases, "race") is cases  # one attribute: unchanged
    with pytest.raises(DataError, match="age"):
        combine_attributes(cases, "race,age")
    assert split_combination("race,gender", "Black|female") == {"race": "Black",
                                                                "gender": "female"}
    assert split_combination("race,gender", "") == {}


def test_single_attribute_summaries_regroup_cases():
    records = [{"id": "a", "group": "Black|female", "dice": [0.9], "iou": [0.8]},
               {"id": "b", "group": "Black|male", "dice": [0.5], "iou": [0.4]},
               {"id": "c", "group": "White|male", "dice": [0.7], "iou": [0.6]},
               {"id": "d", "group": "", "dice": [0.1], "iou": [0.1]}]
    out = single_attribute_summaries(records, ["background", "fg"], "race,gender")
    race = out["race"]["mean"]["groups"]
    assert race["Black"]["n"] == 2 and race["Black"]["dice"] == pytest.approx(0.7)
    assert race["unknown"]["n"] == 1
    gender = out["gender"]["mean"]["groups"]
    assert gender["male"]["dice"] == pytest.approx(0.6)


def test_intersectional_synthetic_set_policy_depends_on_the_combination(tmp_path):
    manifest = make_synthetic_dataset("intersectional", tmp_path, n=24, seed=0)
    rows = list(csv.DictReader(open(manifest)))
    assert {"race", "gender"} <= set(rows[0])
    combos = {(r["race"], r["gender"]) for r in rows}
    assert len(combos) == 6
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["attribute"] == "race,gender"
    policies = info["policies"]
    # neither race nor gender alone determines the policy
    assert policies["Black|female"] != policies["Black|male"]
    assert policies["Asian|male"] != policies["Asian|female"]
    assert policies["Black|male"] == policies["White|female"] == policies["Asian|female"]


@pytest.mark.slow
def test_fit_and_evaluate_route_by_the_combination(tmp_path):
    from training.checkpoint import load_checkpoint
    from training.evaluate import evaluate
    from training.fit import main as fit_main

    manifest = make_synthetic_dataset("intersectional", tmp_path / "data", n=30, seed=1)
    run = tmp_path / "run"
    fit_main(["--data", str(manifest), "--attribute", "race,gender", "--classes",
              "background,rim,cup", "--image-size", "32", "--batch-size", "4", "--epochs", "1",
              "--model-kwargs", '{"embed_dim": 32, "depth": 2, "num_heads": 2}',
              "--out", str(run), "--quiet"])
    model, meta = load_checkpoint(run / "best.safetensors")
    assert meta["attribute"]["name"] == "race,gender"
    assert len(meta["attribute"]["vocabulary"]) == 6
    assert model.encoder_moe[0].router.num_routers == 7  # 6 combinations + unknown
    result = evaluate(run / "best.safetensors", manifest, tmp_path / "ev", split="all")
    groups = set(result.summary["mean"]["groups"])
    assert "Black|female" in groups
    assert set(result.summary["by_attribute"]) == {"race", "gender"}
    assert set(result.summary["by_attribute"]["gender"]["mean"]["groups"]) == {"female", "male"}
