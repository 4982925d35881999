"""training.benchmark and training.stats: resumable method × seed runs, summaries, paired
bootstrap CIs; the data-hash check of evaluate/predict; --select recorded in checkpoints."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from training.data import DataError, make_synthetic_dataset
from training.stats import RunScores, paired_bootstrap

FAST = ["--attribute", "race", "--classes", "background,rim,cup", "--image-size", "32",
        "--batch-size", "4", "--epochs", "1", "--lr", "3e-3",
        "--model-kwargs", '{"embed_dim": 32, "depth": 2, "num_heads": 2}']


def _scores(rng, n=30, shift=0.0):
    groups = np.array(["A"] * 20 + ["B"] * 7 + ["C"] * 3, dtype=object)[:n]
    dice = np.clip(rng.uniform(0.5, 0.95, n) + shift, 0, 1)
    return RunScores(np.array([f"c{i}" for i in range(n)], dtype=object), groups, dice,
                     dice * 0.8)


def test_bootstrap_of_a_method_against_itself_contains_zero():
    rng = np.random.default_rng(0)
    runs = {s: _scores(rng) for s in range(3)}
    boot = paired_bootstrap(runs, runs, n_boot=300)
    for key, v in boot.items():
        lo, hi = v["ci95"]
        assert lo <= 0.0 <= hi, key
        assert v["mean"] == 0.0


def test_bootstrap_finds_a_real_difference_and_pairs_cases():
    rng = np.random.default_rng(1)
    base = {s: _scores(rng) for s in range(3)}
    better = {s: RunScores(b.ids, b.groups, b.dice + 0.05, b.iou) for s, b in base.items()}
    boot = paired_bootstrap(better, base, n_boot=300)
    lo, hi = boot["overall"]["ci95"]
    assert boot["overall"]["mean"] == pytest.approx(0.05)
    assert lo == pytest.approx(0.05) and hi == pytest.approx(0.05)  # paired: no case noise
    # unpaired-looking noise: a method whose per-case scores are shuffled is not "better"
    noisy = {s: RunScores(b.ids, b.groups, rng.permutation(b.dice), b.iou)
             for s, b in base.items()}
    lo, hi = paired_bootstrap(noisy, base, n_boot=300)["overall"]["ci95"]
    assert lo < 0 < hi


def test_bootstrap_refuses_runs_on_different_cases():
    rng = np.random.default_rng(2)
    a = {0: _scores(rng)}
    b = {0: RunScores(np.array([f"x{i}" for i in range(30)], dtype=object), a[0].groups,
                      a[0].dice, a[0].iou)}
    with pytest.raises(ValueError, match="different cases"):
        paired_bootstrap(a, b, n_boot=10)


@pytest.fixture(scope="module")
def fundus(tmp_path_factory):
    return make_synthetic_dataset("fundus", tmp_path_factory.mktemp("fundus"), n=40, seed=5)


@pytest.mark.slow
def test_benchmark_writes_summaries_and_resume_skips_finished_runs(fundus, tmp_path):
    from training.benchmark import main

    out = tmp_path / "bench"
    argv = ["--data", str(fundus), *FAST, "--methods", "none,febs", "--seeds", "2",
            "--out", str(out), "--bootstrap", "50"]
    first = main(argv)
    assert sorted(first.ran) == [("febs", 0), ("febs", 1), ("none", 0), ("none", 1)]
    for name in ("results.csv", "summary.json", "summary.md", "violin.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    m = summary["methods"]["febs"]
    for key in ("es_dice", "dice", "es_iou", "iou"):
        assert set(m[key]) == {"mean", "std"}
    assert set(m["groups"]) == {"Asian", "Black", "White"}
    assert all(set(g) == {"mean", "std", "n"} for g in m["groups"].values())
    assert m["gflops"] > 0 and m["params"] > 0
    vs = summary["vs"]["febs"]
    assert vs["baseline"] == "none" and len(vs["es_dice_diff"]["ci95"]) == 2
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {(r["method"], r["seed"]) for r in rows} == {("none", "0"), ("none", "1"),
                                                         ("febs", "0"), ("febs", "1")}
    assert {r["group"] for r in rows} == {"all", "Asian", "Black", "White"}
    assert "ES-Dice" in (out / "summary.md").read_text()
    # a rerun trains nothing; a third seed trains only the new runs
    mtime = (out / "runs" / "none" / "seed0" / "best.safetensors").stat().st_mtime
    again = main(argv)
    assert again.ran == [] and len(again.skipped) == 4
    assert (out / "runs" / "none" / "seed0" / "best.safetensors").stat().st_mtime == mtime
    more = main([*argv, "--seeds", "3"])  # the later flag wins
    assert sorted(more.ran) == [("febs", 2), ("none", 2)]


def test_a_run_whose_evaluation_was_cut_short_is_evaluated_again(fundus, tmp_path,
                                                                  monkeypatch):
    """A run without test/run.json is not finished: its test folder may hold an interrupted
    evaluation's files, which the resumed benchmark replaces (evaluate's overwrite refusal
    must not stop it); once run.json is written the run counts as done."""
    from types import SimpleNamespace

    import torch

    import training.fitting
    from training.benchmark import load_run, run_dir, run_one
    from training.checkpoint import save_checkpoint
    from training.data import Preprocessing
    from training.networks import create_model

    run = run_dir(tmp_path, "none", 0)
    (run / "test").mkdir(parents=True)
    torch.manual_seed(0)
    model = create_model("transunet", preset="tiny", in_channels=1, out_channels=3,
                         moe="none", img_size=32, depth=1)
    best = save_checkpoint(model, run / "best.safetensors",
                           class_names=["background", "rim", "cup"],
                           attribute={"name": "race", "vocabulary": ["Asian", "Black", "White"]},
                           preprocessing=Preprocessing(spatial_dims=2, image_size=(32, 32),
                                                       in_channels=1).to_dict())
    monkeypatch.setattr(training.fitting, "fit", lambda config: SimpleNamespace(
        best_checkpoint=best, best_epoch=1))  # training itself is fit's (resume) business
    (run / "test" / "metrics.json").write_text('{"interrupted": true}')
    assert load_run(tmp_path, "none", 0) is None
    config = SimpleNamespace(out=str(run), format=None, device="cpu")
    records, info = run_one(config, str(fundus), log=lambda line: None)
    assert "interrupted" not in json.loads((run / "test" / "metrics.json").read_text())
    assert load_run(tmp_path, "none", 0) == (records, info)


def _fake_runs():
    rng = np.random.default_rng(0)

    def records():
        return [{"id": f"c{i}", "group": "ABC"[i % 3], "dice": list(rng.uniform(0, 1, 2)),
                 "iou": list(rng.uniform(0, 1, 2))} for i in range(9)]

    return {m: {s: (records(), {"params": 1000, "gflops": 0.5}) for s in (0, 1)}
            for m in ("none", "febs")}


def _finished_runs(out, base):
    """``_fake_runs`` written as finished runs of ``base`` (records, run.json, config.yaml)."""
    from training.benchmark import method_config, run_dir
    from training.cli import write_yaml
    from training.fitting.config import saved_config

    for method, by_seed in _fake_runs().items():
        for seed, (records, info) in by_seed.items():
            test = run_dir(out, method, seed) / "test"
            test.mkdir(parents=True)
            (test / "records.json").write_text(json.dumps(records))
            (test / "run.json").write_text(json.dumps(info))
            write_yaml(run_dir(out, method, seed) / "config.yaml",
                       saved_config(method_config(base, method, seed, out)))


def test_finished_runs_of_other_settings_are_refused_not_mixed_in(tmp_path):
    """Rerunning with another budget into the same --out would have skipped the finished
    runs and summarised them beside new ones; it is refused before anything trains."""
    import dataclasses

    import training.benchmark as bench
    from training.fitting import FitConfig

    base = FitConfig(data=str(tmp_path / "data"), out="unused", epochs=1, attribute="race")
    _finished_runs(tmp_path, base)
    longer = dataclasses.replace(base, epochs=2, lr=5e-4, workers=3, device="cpu")
    with pytest.raises(ValueError) as err:
        bench.benchmark(longer, ["none", "febs"], [0, 1], tmp_path, n_boot=20,
                        log=lambda line: None)
    message = str(err.value)
    assert "4 finished run(s) trained with other settings" in message
    assert "epochs: 1 → 2" in message and "lr: 0.001 → 0.0005" in message
    assert "workers" not in message and "device" not in message  # same result either way
    assert "Nothing was trained or written" in message
    assert not (tmp_path / "results.csv").exists()
    moved = dataclasses.replace(base, data=str(tmp_path / "elsewhere"), workers=3)
    same = bench.benchmark(moved, ["none", "febs"], [0, 1], tmp_path, n_boot=20,
                           log=lambda line: None)
    assert same.ran == [] and len(same.skipped) == 4
    assert (tmp_path / "results.csv").is_file()


def test_a_second_benchmark_into_the_same_out_is_refused(tmp_path, capsys):
    """It would train the same unfinished runs and race the first one's records and
    summaries; it is refused, naming the first, and nothing is written."""
    import training.benchmark as bench
    from training.fitting import FitConfig
    from training.run_folder import FolderInUseError, lock_folder

    base = FitConfig(data=str(tmp_path / "data"), out="unused", epochs=1, attribute="race")
    _finished_runs(tmp_path, base)
    with lock_folder(tmp_path, "training.benchmark"):  # the first benchmark, still running
        with pytest.raises(FolderInUseError, match="in use by another run.*training.benchmark"):
            bench.benchmark(base, ["none", "febs"], [0, 1], tmp_path, n_boot=20,
                            log=lambda line: None)
        assert not (tmp_path / "results.csv").exists()
        with pytest.raises(SystemExit) as exit_:
            bench.main(["--data", str(tmp_path / "data"), "--attribute", "race", "--epochs",
                        "1", "--methods", "none,febs", "--seeds", "2", "--out", str(tmp_path)])
        assert exit_.value.code == 2
        assert "is in use by another run" in capsys.readouterr().err
    done = bench.benchmark(base, ["none", "febs"], [0, 1], tmp_path, n_boot=20,
                           log=lambda line: None)  # once the first has finished
    assert len(done.skipped) == 4 and (tmp_path / "results.csv").is_file()
    assert not (tmp_path / ".napari-dmoe.lock").exists()


@pytest.mark.parametrize("name", ["results.csv", "summary.json", "summary.md", "violin.png"])
def test_a_summary_write_cut_short_keeps_that_earlier_file(tmp_path, name, disk_fills):
    from training.benchmark import summarise
    from training.benchmark_report import write_outputs

    runs = _fake_runs()
    (tmp_path / name).write_bytes(b"earlier summary")
    disk_fills(tmp_path / name)
    with pytest.raises(OSError, match="(?i)no space left"):
        write_outputs(tmp_path, runs, summarise(runs, "none", 20))
    assert (tmp_path / name).read_bytes() == b"earlier summary"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_run_json_cut_short_leaves_the_run_unfinished(tmp_path, monkeypatch, disk_fills):
    """run.json marks a run as done: a write of it cut short leaves none (so a resumed
    benchmark evaluates the run again) rather than a torn one that load_run cannot read."""
    from types import SimpleNamespace

    import training.benchmark
    import training.evaluate
    import training.fitting
    from training.benchmark import load_run, run_dir, run_one

    run = run_dir(tmp_path, "none", 0)
    (run / "test").mkdir(parents=True)
    monkeypatch.setattr(training.fitting, "fit", lambda config: SimpleNamespace(
        best_checkpoint=run / "best.safetensors", best_epoch=1))
    records = _fake_runs()["none"][0][0]
    monkeypatch.setattr(training.evaluate, "evaluate", lambda *a, **k: SimpleNamespace(
        records=records, summary={"mean": {"es_dice": 0.5, "dice": 0.6}}))
    monkeypatch.setattr(training.benchmark, "cost_of", lambda path: {"params": 1,
                                                                     "gflops": 0.1})
    disk_fills(run / "test" / "run.json")
    config = SimpleNamespace(out=str(run), format=None, device="cpu")
    with pytest.raises(OSError, match="(?i)no space left"):
        run_one(config, "data", log=lambda line: None)
    assert sorted(p.name for p in (run / "test").iterdir()) == ["records.json"]
    assert load_run(tmp_path, "none", 0) is None


@pytest.mark.slow
def test_evaluate_refuses_changed_data_and_select_is_recorded(fundus, tmp_path):
    from training.checkpoint import load_checkpoint
    from training.evaluate import evaluate
    from training.fit import main as fit_main
    from training.predict import predict

    run = tmp_path / "run"
    fit_main(["--data", str(fundus), *FAST, "--moe", "none", "--select", "worst_group",
              "--out", str(run), "--quiet"])
    _, meta = load_checkpoint(run / "best.safetensors")
    assert meta["provenance"]["select"] == "worst_group"
    assert meta["provenance"]["config"]["val_fraction"] == 0.1
    evaluate(run / "best.safetensors", fundus, tmp_path / "ok")  # same data: accepted
    # drop two cases from the manifest: refused, naming both hashes and the case counts
    lines = fundus.read_text().splitlines()
    changed = fundus.with_name("changed.csv")
    changed.write_text("\n".join(lines[:-2]) + "\n")
    with pytest.raises(DataError, match=r"38 cases.*40 cases.*--allow-changed-data"):
        evaluate(run / "best.safetensors", changed, tmp_path / "no")
    with pytest.raises(DataError, match="allow-changed-data"):
        predict(run / "best.safetensors", tmp_path / "p", data=changed)
    result = evaluate(run / "best.safetensors", changed, tmp_path / "yes",
                      allow_changed_data=True)
    assert result.records
