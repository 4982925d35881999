from __future__ import annotations

import csv

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
