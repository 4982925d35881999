"""Tests for training.report: metrics.json, per_case.csv, report.md, violin.png, compare."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from training.metrics import fairness_summary
from training.report import (
    compare_markdown,
    plot_violin,
    write_metrics_json,
    write_per_case_csv,
    write_report_md,
)

CLASSES = ["background", "rim", "cup"]


def _records(shift=0.0):
    rows = [
        ("a", "White", [1.0, 0.5], [1.0, 0.25]),
        ("b", "White", [0.8, 0.7], [0.6, 0.5]),
        ("c", "Black", [0.6, 0.1], [0.4, 0.1]),
        ("d", "", [0.2, 0.3], [0.1, 0.2]),
    ]
    return [
        {"id": i, "group": g, "dice": np.array(d) - shift, "iou": np.array(u) - shift}
        for i, g, d, u in rows
    ]


def _eval_dir(tmp_path, name, records, attribute="race"):
    out = tmp_path / name
    write_metrics_json(fairness_summary(records, CLASSES, attribute), out / "metrics.json")
    return out


def test_metrics_json_roundtrip(tmp_path):
    summary = fairness_summary(_records(), CLASSES, "race")
    path = write_metrics_json(summary, tmp_path / "sub" / "metrics.json")
    assert json.loads(path.read_text()) == summary


def test_per_case_csv(tmp_path):
    path = write_per_case_csv(_records(), CLASSES, "race", tmp_path / "per_case.csv")
    with path.open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "race", "dice_rim", "dice_cup", "iou_rim", "iou_cup"]
    assert len(rows) == 5
    assert rows[1][:2] == ["a", "White"]
    assert [float(v) for v in rows[1][2:]] == [1.0, 0.5, 1.0, 0.25]
    assert rows[4][1] == "unknown"
    with pytest.raises(ValueError, match="class names"):
        write_per_case_csv(_records(), ["x"], "race", tmp_path / "bad.csv")


def test_report_md_layout(tmp_path):
    summary = fairness_summary(_records(), CLASSES, "race")
    text = write_report_md(summary, tmp_path / "report.md", title="Demo run").read_text()
    assert text.startswith("# Demo run")
    assert "×100" in text
    header = next(line for line in text.splitlines() if line.startswith("| class"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[:5] == ["class", "ES-Dice", "Dice", "ES-IoU", "IoU"]
    assert "Dice Black (n=1)" in cols and "IoU White (n=2)" in cols
    assert "Dice unknown (n=1)" in cols
    rim = next(line for line in text.splitlines() if line.startswith("| rim"))
    # rim: ES-Dice .5, Dice .65, ES-IoU .375, IoU .525 (see test_metrics)
    assert rim.split("|")[2:6] == [" 50.00 ", " 65.00 ", " 37.50 ", " 52.50 "]
    assert any(line.startswith("| mean") for line in text.splitlines())


def test_plot_violin_writes_png(tmp_path):
    path = plot_violin(_records(), CLASSES, tmp_path / "violin.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000
    with pytest.raises(ValueError, match="no records"):
        plot_violin([], CLASSES, tmp_path / "empty.png")


def test_compare_markdown_rows_and_sections(tmp_path):
    a = _eval_dir(tmp_path, "dmoe", _records())
    b = _eval_dir(tmp_path, "baseline", _records(shift=0.05))
    text = compare_markdown([a, b])
    assert "### mean over foreground classes" in text and "### rim" in text and "### cup" in text
    table_rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert sum(r.startswith("| dmoe |") for r in table_rows) == 3  # mean + 2 classes
    assert sum(r.startswith("| baseline |") for r in table_rows) == 3
    header = table_rows[0]
    assert "Dice White (n=2)" in header and "IoU Black (n=1)" in header
    # dmoe is better everywhere: its rim Dice 65.00 is bold, baseline's 60.00 is not
    rim_start = text.index("### rim")
    rim_block = text[rim_start : text.index("### cup")]
    assert "**65.00**" in rim_block and "| 60.00 |" in rim_block
    named = compare_markdown([a, b / "metrics.json"], names=["dMoE", "TransUNet"])
    assert "| dMoE |" in named and "| TransUNet |" in named


def test_compare_markdown_bad_inputs(tmp_path):
    a = _eval_dir(tmp_path, "a", _records())
    other_attr = _eval_dir(tmp_path, "b", _records(), attribute="gender")
    recs = _records()
    recs[2]["group"] = "Asian"
    other_groups = _eval_dir(tmp_path, "c", recs)
    with pytest.raises(ValueError, match="attribute differ"):
        compare_markdown([a, other_attr])
    with pytest.raises(ValueError, match="groups"):
        compare_markdown([a, other_groups])
    with pytest.raises(ValueError, match="names"):
        compare_markdown([a, a], names=["only one"])
    with pytest.raises(ValueError, match="at least one"):
        compare_markdown([])
    with pytest.raises(FileNotFoundError, match="training.evaluate"):
        compare_markdown([a, tmp_path / "missing"])


def _write_compare(out, tmp_path):
    from training.evaluate import write_compare

    a = _eval_dir(tmp_path, "a", _records())
    return write_compare([a, a], ["x", "y"], out, overwrite=True)


WRITERS = {
    "metrics.json": lambda out, _: write_metrics_json(
        fairness_summary(_records(), CLASSES, "race"), out / "metrics.json"),
    "per_case.csv": lambda out, _: write_per_case_csv(_records(), CLASSES, "race",
                                                      out / "per_case.csv"),
    "report.md": lambda out, _: write_report_md(fairness_summary(_records(), CLASSES, "race"),
                                                out / "report.md"),
    "violin.png": lambda out, _: plot_violin(_records(), CLASSES, out / "violin.png"),
    "compare.md": _write_compare,
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_report_write_that_fails_halfway_keeps_the_earlier_file(tmp_path, name, disk_fills):
    """A write cut short (here: the disk fills after half the bytes) leaves the earlier
    file byte for byte and no temporary file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"an earlier run's file")
    disk_fills(out / name)
    with pytest.raises(OSError, match="(?i)no space left"):
        WRITERS[name](out, tmp_path)
    assert [p.name for p in out.iterdir()] == [name]
    assert (out / name).read_bytes() == b"an earlier run's file"
