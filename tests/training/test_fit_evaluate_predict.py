"""fit → evaluate → predict end to end on a tiny synthetic set (CPU, seconds)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from tests.training.conftest import write_files
from training import evaluate as evaluate_cli
from training import fit as fit_cli
from training import predict as predict_cli
from training.checkpoint import load_checkpoint
from training.data import make_synthetic_dataset, read_image, read_label

FAST = ["--image-size", "32", "--batch-size", "8", "--lr", "3e-3", "--quiet",
        "--model-kwargs", '{"embed_dim": 32, "depth": 2, "num_heads": 2}']


@pytest.fixture(scope="module")
def fundus(tmp_path_factory):
    return make_synthetic_dataset("fundus", tmp_path_factory.mktemp("fundus"), n=40, seed=3)


@pytest.fixture(scope="module")
def trained(fundus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = fit_cli.main(["--data", str(fundus), "--attribute", "race", "--classes",
                           "background,rim,cup", "--epochs", "2", "--out", str(out), *FAST])
    return result


def test_fit_writes_promised_outputs(trained):
    out = trained.out
    for name in ("best.safetensors", "last.safetensors", "config.yaml", "history.csv"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"loss", "val_dice", "val_es_dice", "lr", "train_seconds"} <= set(rows[0])
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["attribute"] == "race" and config["moe"] == "dmoe" and config["epochs"] == 2
    model, meta = load_checkpoint(out / "best.safetensors")
    assert meta["class_names"] == ["background", "rim", "cup"]
    assert meta["attribute"] == {"name": "race", "vocabulary": ["Asian", "Black", "White"],
                                 "unknown_router": True}
    assert meta["preprocessing"]["image_size"] == [32, 32]
    assert meta["provenance"]["validation"]["mean"]["dice"] == pytest.approx(
        trained.best_metric)  # --select dice (the default) picks best.safetensors
    assert meta["provenance"]["data_manifest_hash"]


def test_config_file_sets_flags_and_cli_wins(fundus, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": str(fundus), "attribute": "race", "epochs": 5,
                                   "moe": "moe", "image-size": 32, "quiet": True,
                                   "model_kwargs": {"embed_dim": 32, "depth": 1,
                                                    "num_heads": 2}}))
    res = fit_cli.main(["--config", str(cfg), "--epochs", "1", "--out", str(tmp_path / "o")])
    saved = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["moe"] == "moe"
    assert res.epochs_run == 1


def test_seeded_cpu_runs_repeat_exactly(fundus, tmp_path):
    args = ["--data", str(fundus), "--attribute", "race", "--epochs", "1", *FAST]
    a = fit_cli.main([*args, "--out", str(tmp_path / "a")])
    b = fit_cli.main([*args, "--out", str(tmp_path / "b")])
    assert a.history[0]["loss"] == b.history[0]["loss"]
    assert a.history[0]["val_es_dice"] == b.history[0]["val_es_dice"]


def test_evaluate_writes_report_in_schema(trained, fundus, tmp_path):
    res = evaluate_cli.main(["--checkpoint", str(trained.best_checkpoint), "--data", str(fundus),
                             "--out", str(tmp_path)])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["attribute"] == "race"
    assert set(metrics["classes"]) == {"rim", "cup"}
    for entry in [*metrics["classes"].values(), metrics["mean"]]:
        assert {"dice", "iou", "es_dice", "es_iou", "groups"} <= set(entry)
        assert entry["es_dice"] <= entry["dice"] + 1e-12
    n = sum(g["n"] for g in metrics["mean"]["groups"].values())
    rows = list(csv.DictReader(open(tmp_path / "per_case.csv")))
    assert len(rows) == n == len(res.records)
    assert "| ES-Dice" in (tmp_path / "report.md").read_text().replace("|ES-Dice", "| ES-Dice")
    assert (tmp_path / "violin.png").stat().st_size > 1000
    # compare: two evaluation folders side by side
    table = evaluate_cli.main(["--compare", str(tmp_path), str(tmp_path), "--names", "a", "b"])
    assert "| a" in table and "| b" in table


def test_evaluate_replaces_an_earlier_evaluation_only_with_overwrite(trained, fundus, tmp_path,
                                                                     refused_before_loading):
    out = tmp_path / "eval"
    out.mkdir()
    earlier = write_files(out, {"metrics.json": b'{"earlier": 1}\n',
                                "report.md": b"earlier report\n", "notes.txt": b"mine"})
    argv = ["--checkpoint", str(trained.best_checkpoint), "--data", str(fundus),
            "--out", str(out)]
    err = refused_before_loading(evaluate_cli.main, argv)
    assert (f"{out} already holds 2 file(s) from an earlier run that this run would "
            "replace: metrics.json, report.md. Nothing was written; pass --overwrite") in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    evaluate_cli.main([*argv, "--overwrite"])
    assert json.loads((out / "metrics.json").read_text())["attribute"] == "race"
    assert "ES-Dice" in (out / "report.md").read_text()
    assert (out / "notes.txt").read_bytes() == b"mine"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "notes.txt",
                                                     "per_case.csv", "report.md", "violin.png"]
    # --compare --out: an earlier compare.md likewise
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "compare.md").write_text("earlier table\n")
    compare = ["--compare", str(out), str(out), "--names", "a", "b", "--out",
               str(tmp_path / "cmp")]
    err = refused_before_loading(evaluate_cli.main, compare)
    assert "compare.md. Nothing was written; pass --overwrite" in err
    assert (tmp_path / "cmp" / "compare.md").read_text() == "earlier table\n"
    evaluate_cli.main([*compare, "--overwrite"])
    assert "| a" in (tmp_path / "cmp" / "compare.md").read_text()


def test_evaluate_removes_the_temporary_files_of_its_own_outputs_only(
        trained, fundus, tmp_path, refused_before_loading, capsys):
    """A killed evaluate leaves ``.metrics.json.XXXXXXXX.tmp`` in --out: a refused run
    keeps it (a refused run changes nothing); the next run that writes deletes it and says
    so; other files, another name's temporary file included, stay."""
    out = tmp_path / "eval"
    out.mkdir()
    stale = write_files(out, {".metrics.json.abcdef12.tmp": b'{"torn',
                              ".violin.png.ab_3x9qz.tmp": b"\x89PNG torn"})
    others = write_files(out, {".foo.tmp": b"not a temporary file of ours",
                               ".notes.txt.abcdef12.tmp": b"another program's",
                               "notes.txt": b"mine"})
    earlier = write_files(out, {"report.md": b"earlier report\n"})
    argv = ["--checkpoint", str(trained.best_checkpoint), "--data", str(fundus),
            "--out", str(out)]
    refused_before_loading(evaluate_cli.main, argv)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {**stale, **others, **earlier}
    (out / "report.md").unlink()  # the earlier report moved away: a normal run
    evaluate_cli.main(argv)
    assert ("removed 2 temporary file(s) left by killed writes: .metrics.json.abcdef12.tmp, "
            ".violin.png.ab_3x9qz.tmp\n") in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted([*others, *evaluate_cli.OUTPUT_FILES])
    assert {n: (out / n).read_bytes() for n in others} == others
    cmp = tmp_path / "cmp"  # --compare --out: compare.md's likewise
    cmp.mkdir()
    write_files(cmp, {".compare.md.abcdef12.tmp": b"| torn"})
    evaluate_cli.main(["--compare", str(out), "--out", str(cmp)])
    assert sorted(p.name for p in cmp.iterdir()) == ["compare.md"]


@pytest.mark.parametrize("name", evaluate_cli.OUTPUT_FILES)
def test_evaluate_cut_short_while_writing_an_output_keeps_that_earlier_file(
        trained, fundus, tmp_path, name, disk_fills, capsys):
    """--overwrite into an earlier evaluation, the disk filling up halfway through ``name``:
    exit 4 naming it; the files written before it are the new ones, ``name`` and those
    after it are the earlier run's byte for byte, and no temporary file is left."""
    out = tmp_path / "eval"
    out.mkdir()
    earlier = {n: f"earlier {n}".encode() for n in evaluate_cli.OUTPUT_FILES}
    for n, data in earlier.items():
        (out / n).write_bytes(data)
    disk_fills(out / name)
    with pytest.raises(SystemExit) as info:
        evaluate_cli.main(["--checkpoint", str(trained.best_checkpoint), "--data", str(fundus),
                           "--out", str(out), "--overwrite"])
    assert info.value.code == 4
    assert (f"error: cannot write {out / name}: no space left on the device" in
            capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == sorted(evaluate_cli.OUTPUT_FILES)
    k = evaluate_cli.OUTPUT_FILES.index(name)
    for n in evaluate_cli.OUTPUT_FILES[:k]:
        assert (out / n).read_bytes() != earlier[n], n
    for n in evaluate_cli.OUTPUT_FILES[k:]:
        assert (out / n).read_bytes() == earlier[n], n


def test_predict_dataset_and_single_image(trained, fundus, tmp_path):
    rows = predict_cli.main(["--checkpoint", str(trained.best_checkpoint), "--data", str(fundus),
                             "--split", "test", "--out", str(tmp_path / "p")])
    assert rows
    listed = list(csv.DictReader(open(tmp_path / "p" / "predictions.csv")))
    assert [r["id"] for r in listed] == [r["id"] for r in rows]
    first = listed[0]
    assert first["file"].endswith(".png")
    labels = read_label(tmp_path / "p" / first["file"])
    image, _ = read_image(fundus.parent / "images" / f"{first['id']}.png")
    assert labels.shape == image.shape[1:]
    assert set(np.unique(labels)) <= {0, 1, 2}

    img = fundus.parent / "images" / f"{first['id']}.png"
    one = predict_cli.main(["--checkpoint", str(trained.best_checkpoint), "--image", str(img),
                            "--out", str(tmp_path / "q")])
    assert one == [{"id": first["id"], "attribute_value": "unknown", "file": f"{first['id']}.png"}]


def test_bad_data_stops_before_training(tmp_path, fundus):
    with pytest.raises(SystemExit) as err:
        fit_cli.main(["--data", str(fundus), "--attribute", "ethnicity", "--out",
                      str(tmp_path), *FAST])
    assert err.value.code == 2
    assert not (tmp_path / "last.safetensors").exists()
