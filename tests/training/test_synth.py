from __future__ import annotations

import csv

import pytest

from training.synth import main


def test_cli_writes_a_manifest(tmp_path, capsys):
    assert main(["--kind", "skin", "--out", str(tmp_path / "skin"), "--n", "15",
                 "--seed", "2"]) == 0
    with open(tmp_path / "skin" / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 15 and set(rows[0]) == {"image", "label", "split", "id", "age_group"}
    assert (tmp_path / "skin" / rows[0]["image"]).is_file()
    assert "--attribute age_group" in capsys.readouterr().err


def test_cli_reports_bad_n(tmp_path, capsys):
    assert main(["--kind", "ct", "--out", str(tmp_path), "--n", "5"]) == 2
    assert "n must be at least 12" in capsys.readouterr().err


def test_a_folder_another_run_is_writing_is_refused(tmp_path, capsys):
    from training.run_folder import lock_folder

    out = tmp_path / "skin"
    with lock_folder(out, "training.synth"):  # a first synth, still writing
        assert main(["--kind", "skin", "--out", str(out), "--n", "15"]) == 2
        err = capsys.readouterr().err
        assert "is in use by another run (training.synth" in err and "nothing was changed" in err
        assert not (out / "manifest.csv").exists()
    assert main(["--kind", "skin", "--out", str(out), "--n", "15"]) == 0  # once it is done
    assert not (out / ".napari-dmoe.lock").exists()


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_an_existing_dataset_is_replaced_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "fundus"
    assert main(["--kind", "fundus", "--out", str(out), "--n", "12", "--seed", "1"]) == 0
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    assert main(["--kind", "fundus", "--out", str(out), "--n", "9", "--seed", "2"]) == 2
    err = capsys.readouterr().err
    assert (f"{out} already holds 26 file(s) from an earlier run that this run would "
            "replace: manifest.csv, dataset.json, fundus_0000.png and 23 more. Nothing was "
            "written; pass --overwrite to replace them") in err
    assert _snapshot(out) == before
    assert main(["--kind", "fundus", "--out", str(out), "--n", "9", "--seed", "2",
                 "--overwrite"]) == 0
    with open(out / "manifest.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 9
    assert len(list((out / "images").iterdir())) == 9  # the earlier 12 cases' files went
    assert (out / "notes.txt").read_text() == "mine"


def test_a_dataset_synth_did_not_write_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "images").mkdir(parents=True)
    mine = {"manifest.csv": b"image,label,split,id,race\nimages/fundus_0000.png,,,a,X\n",
            "images/fundus_0000.png": b"my scan"}
    for name, data in mine.items():
        (out / name).write_bytes(data)
    for extra in ([], ["--overwrite"]):
        assert main(["--kind", "fundus", "--out", str(out), "--n", "9", *extra]) == 2
        assert ("holds a dataset training.synth did not write (manifest.csv without "
                "training.synth's dataset.json); nothing was changed") in capsys.readouterr().err
        assert _snapshot(out) == mine


def test_killed_writes_leave_no_torn_file_and_are_tidied_next_time(tmp_path, capsys,
                                                                  disk_fills):
    from training.checkpoint import CheckpointWriteError
    from training.data import make_synthetic_dataset, write_manifest

    out = tmp_path / "fundus"
    torn = out / "images" / ".fundus_0001.png.abcd1234.png"  # a killed write's
    other = out / "images" / ".notes.txt.abcd1234.tmp"  # not a name synth writes
    torn.parent.mkdir(parents=True)
    torn.write_bytes(b"half")
    other.write_bytes(b"mine")
    disk_fills(out / "images" / "fundus_0003.png")
    with pytest.raises(CheckpointWriteError, match="fundus_0003.png"):
        make_synthetic_dataset("fundus", out, n=9, seed=0)
    assert not torn.exists() and other.read_bytes() == b"mine"
    assert not (out / "images" / "fundus_0003.png").exists()  # not a torn file
    assert not (out / "manifest.csv").exists()  # written last: the dataset is unfinished
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        ".notes.txt.abcd1234.tmp", "fundus_0000.png", "fundus_0001.png", "fundus_0002.png"]

    manifest = tmp_path / "other" / "manifest.csv"
    write_manifest(manifest, [{"image": "a.png", "id": "a"}])
    before = manifest.read_bytes()
    disk_fills(manifest)
    with pytest.raises(CheckpointWriteError):
        write_manifest(manifest, [{"image": "b.png", "id": "b"}])
    assert manifest.read_bytes() == before
