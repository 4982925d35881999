"""Intersectional routing: --attribute race,gender routes by the combination (one router per
observed combination, or --attribute-routing sum: per-attribute routers summed), reports
groups per combination and per single attribute (evaluate and the benchmark's summary),
and sends unseen combinations to the unknown router (sum: to their parts' routers); the
intersectional synthetic set."""

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
from training.data.cases import vocabulary_parts
from training.stats import RunScores, regroup_by_part, single_attribute_summaries


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


def test_sum_vocabulary_is_the_mixed_radix_product_of_the_parts():
    cases = [_case(0, "Black", "female"), _case(1, "White", "male"), _case(2, "Black", ""),
             _case(3, "Asian", "male", split="test"), _case(4, "Asian", "female", split="test")]
    combined = combine_attributes(cases, "race,gender")
    vocab = build_vocabulary(combined, "race,gender", routing="sum")
    # parts from fully known training combinations: race {Black, White}, gender {female, male}
    assert vocab == ["Black|female", "Black|male", "White|female", "White|male"]
    assert vocabulary_parts(vocab) == (2, 2)
    # "White|female" was never seen in training but its parts were: a real index
    assert encode_attribute("White|female", vocab) == 2
    assert encode_attribute("Asian|female", vocab) == -1  # an unseen part value: unknown
    assert build_vocabulary(combined, "race,gender") == ["Black|female", "White|male"]
    # one attribute: both routings are the same
    assert build_vocabulary(combined, "race", routing="sum") == ["Black", "White"]
    with pytest.raises(ValueError, match="routing"):
        build_vocabulary(combined, "race,gender", routing="product")


def test_sum_vocabulary_order_is_defined_by_the_parts_not_by_string_sorting():
    cases = [_case(0, "a", "x"), _case(1, "a b", "y")]
    vocab = build_vocabulary(combine_attributes(cases, "race,gender"), "race,gender", "sum")
    assert vocab == ["a|x", "a|y", "a b|x", "a b|y"]  # part order ("a" < "a b") ...
    assert sorted(vocab) != vocab  # ... which is not the order of the joined strings
    assert vocabulary_parts(vocab) == (2, 2)
    with pytest.raises(ValueError, match="summed-routing"):
        vocabulary_parts(["a|x", "a b|y"])  # a combination vocabulary with gaps


def test_fit_config_attribute_routing():
    from training.fitting import FitConfig

    base = {"data": "d.csv", "attribute": "race,gender"}
    assert FitConfig(**base, attribute_routing="sum").summed_routing
    assert not FitConfig(**base).summed_routing
    assert not FitConfig(**{**base, "attribute": "race"}, attribute_routing="sum").summed_routing
    for other in ({"loss": "febs"}, {"moe": "moe"}, {"arch": "separate", "moe": "none"}):
        assert not FitConfig(**base, attribute_routing="sum", **other).summed_routing, other
    with pytest.raises(ValueError, match="attribute-routing"):
        FitConfig(**base, attribute_routing="product")


def _records(rng, shift=0.0):
    import numpy as np

    groups = ["Black|female"] * 3 + ["Black|male"] * 2 + ["White|female"] * 4 + \
        ["White|male"] * 5 + [""]
    return [{"id": f"c{i}", "group": g, "dice": [float(np.clip(rng.uniform(0.4, 0.9) + shift,
                                                                0, 1))] * 2,
             "iou": [0.5, 0.5]} for i, g in enumerate(groups)]


def test_benchmark_summary_has_single_attribute_aggregates():
    import numpy as np

    from training.benchmark import summarise
    from training.benchmark_report import summary_markdown

    rng = np.random.default_rng(0)
    cost = {"gflops": 0.1, "params": 10, "best_epoch": 1}
    none = {s: (_records(rng), cost) for s in range(2)}
    runs = {"none": none, "dmoe": {s: (_records(rng, 0.05), cost) for s in range(2)},
            "same": none}
    summary = summarise(runs, "none", 200, attribute="race,gender")
    race = summary["methods"]["dmoe"]["attributes"]["race"]
    assert set(summary["methods"]["dmoe"]["attributes"]) == {"race", "gender"}
    assert set(race["groups"]) == {"Black", "White"}  # unknown is not a group
    assert race["groups"]["White"]["n"] == 9 and race["groups"]["Black"]["n"] == 5
    # the per-part mean is the mean over seeds of each seed's mean over that part's cases
    want = np.mean([np.mean([r["dice"][0] for r in recs if r["group"].startswith("White")])
                    for recs, _ in runs["dmoe"].values()])
    assert race["groups"]["White"]["mean"] == pytest.approx(want)
    assert set(race["es_dice"]) == {"mean", "std"}
    gender_vs = summary["vs"]["dmoe"]["attributes"]["gender"]
    assert set(gender_vs["groups"]) == {"female", "male"}
    lo, hi = summary["vs"]["same"]["attributes"]["race"]["es_dice_diff"]["ci95"]
    assert lo <= 0.0 <= hi  # a method against itself
    md = summary_markdown(summary)
    assert "By race alone" in md and "Dice White (n=9)" in md and "ES-Dice over gender" in md
    # one attribute: no aggregates
    plain = summarise({"none": none}, "none", 10, attribute="race")
    assert "attributes" not in plain["methods"]["none"]


def test_regroup_by_part():
    import numpy as np

    sc = RunScores(np.array(["a", "b", "c"], dtype=object),
                   np.array(["Black|female", "unknown", "White|male"], dtype=object),
                   np.array([0.1, 0.2, 0.3]), np.array([0.1, 0.2, 0.3]))
    assert regroup_by_part(sc, "race,gender", "gender").groups.tolist() == [
        "female", "unknown", "male"]
    with pytest.raises(ValueError, match="age"):
        regroup_by_part(sc, "race,gender", "age")


@pytest.mark.slow
def test_sum_routing_round_trip_and_an_unseen_combination(tmp_path):
    from training.checkpoint import load_checkpoint
    from training.evaluate import evaluate
    from training.fit import main as fit_main
    from training.inference import Segmenter

    manifest = make_synthetic_dataset("intersectional", tmp_path / "data", n=30, seed=1)
    rows = list(csv.DictReader(open(manifest)))
    for r in rows:  # no "Asian|female" in training: only in the test split
        if (r["race"], r["gender"]) == ("Asian", "female"):
            r["split"] = "test"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    run = tmp_path / "run"
    fit_main(["--data", str(manifest), "--attribute", "race,gender", "--attribute-routing",
              "sum", "--classes", "background,rim,cup", "--image-size", "32", "--batch-size",
              "4", "--epochs", "1", "--model-kwargs",
              '{"embed_dim": 32, "depth": 2, "num_heads": 2}', "--out", str(run), "--quiet"])
    model, meta = load_checkpoint(run / "best.safetensors")
    assert meta["attribute"]["routing"] == "sum"
    vocab = meta["attribute"]["vocabulary"]
    assert vocab == ["Asian|female", "Asian|male", "Black|female", "Black|male",
                     "White|female", "White|male"]
    bank = model.encoder_moe[0].router
    assert bank.parts == (3, 2) and bank.num_routers == 3 + 1 + 2 + 1
    seg = Segmenter.from_checkpoint(run / "best.safetensors", device="cpu")
    assert seg.encode("Asian|female") == (0, "Asian|female")  # unseen in training, routed
    result = evaluate(run / "best.safetensors", manifest, tmp_path / "ev", split="test")
    groups = result.summary["mean"]["groups"]
    assert "Asian|female" in groups and "unknown" not in groups
    assert set(result.summary["by_attribute"]) == {"race", "gender"}
