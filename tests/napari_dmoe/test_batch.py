"""Batch… without a viewer: ``_batch.segment_folder`` loads the model once, reports one
progress step per case, and stops within a second or two of Cancel in both modes, keeping
the finished files (``predictions.csv`` lists exactly them); an earlier run's files in the
output folder are listed first and replaced only with ``overwrite=True``."""

from __future__ import annotations

import csv
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image as PILImage

from napari_dmoe import _batch


def drive(gen, on_progress=lambda p: None):
    """Run a batch generator as the Qt worker would; returns its result."""
    try:
        while True:
            on_progress(next(gen))
    except StopIteration as stop:
        return stop.value


def csv_files(out) -> list[str]:
    return [r["file"] for r in csv.DictReader(open(out / "predictions.csv"))]


@pytest.fixture()
def count_loads(monkeypatch):
    from training.inference import Segmenter

    real = Segmenter.from_checkpoint.__func__
    loads = []

    def counting(cls, path, device="auto"):
        loads.append(path)
        return real(cls, path, device=device)

    monkeypatch.setattr(Segmenter, "from_checkpoint", classmethod(counting))
    return loads


@pytest.fixture(scope="module")
def ct_data(tmp_path_factory):
    from training.data import make_synthetic_dataset

    return make_synthetic_dataset("ct", tmp_path_factory.mktemp("ct"), n=12, seed=0)


def png_folder(folder, n: int):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        PILImage.fromarray((rng.random((40, 48)) * 255).astype(np.uint8)).save(
            folder / f"scan{i}.png")
    return folder


def test_dataset_mode_stops_soon_after_cancel_and_keeps_finished_cases(checkpoints, ct_data,
                                                                       tmp_path):
    out = tmp_path / "out"
    cancel = threading.Event()
    seen, clock = [], {}

    def on_progress(p):
        seen.append((p.done, p.total, p.value))
        if p.done >= 2 and not cancel.is_set():
            clock["cancel"] = time.perf_counter()
            cancel.set()

    result = drive(_batch.segment_folder(checkpoints["ct"], ct_data.parent, out, "T1",
                                         device="cpu", cancel=cancel), on_progress)
    stopped = time.perf_counter() - clock["cancel"]
    print(f"dataset mode: cancel -> returned in {stopped:.3f} s; progress {seen}")
    assert stopped < 2.0
    assert result.cancelled and result.total == 12
    assert 2 <= len(result.rows) < 12
    assert [(d, t) for d, t, _ in seen[1:3]] == [(1, 12), (2, 12)]  # one step per case
    listed = csv_files(out)
    assert listed == [r["file"] for r in result.rows]
    assert sorted(p.name for p in out.iterdir()) == sorted([*listed, "predictions.csv"])


def test_dataset_mode_runs_to_the_end_without_cancel(checkpoints, ct_data, tmp_path):
    result = drive(_batch.segment_folder(checkpoints["ct"], ct_data.parent, tmp_path / "o",
                                         "T1", device="cpu"))
    assert not result.cancelled and len(result.rows) == result.total == 12
    assert len(csv_files(tmp_path / "o")) == 12


def test_plain_folder_loads_the_checkpoint_once(checkpoints, tmp_path, count_loads):
    ckpt = shutil.copy(checkpoints["fundus"], tmp_path / "fresh.safetensors")  # not cached
    source = png_folder(tmp_path / "images", 4)
    result = drive(_batch.segment_folder(ckpt, source, tmp_path / "out", "Black",
                                         device="cpu"))
    assert count_loads == [ckpt]
    assert len(result.rows) == 4 and not result.cancelled
    assert {r["attribute_value"] for r in result.rows} == {"Black"}
    assert csv_files(tmp_path / "out") == [f"scan{i}.png" for i in range(4)]


def test_the_widgets_segmenter_is_reused(checkpoints, tmp_path, count_loads):
    from training.checkpoint import load_checkpoint
    from training.inference import Segmenter

    seg = Segmenter(*load_checkpoint(checkpoints["fundus"], device="cpu"), device="cpu")
    source = png_folder(tmp_path / "images", 3)
    result = drive(_batch.segment_folder(checkpoints["fundus"], source, tmp_path / "out",
                                         "unknown", device="cpu", segmenter=seg))
    assert count_loads == [] and len(result.rows) == 3
    assert {r["attribute_value"] for r in result.rows} == {"unknown"}


def test_plain_folder_stops_soon_after_cancel(checkpoints, ct_data, tmp_path):
    source = ct_data.parent / "images"  # 12 volumes, no manifest: a plain folder
    assert not _batch.is_dataset(source)
    out = tmp_path / "out"
    cancel = threading.Event()
    clock = {}

    def on_progress(p):
        if p.done >= 2 and not cancel.is_set():
            clock["cancel"] = time.perf_counter()
            cancel.set()

    result = drive(_batch.segment_folder(checkpoints["ct"], source, out, "T2", device="cpu",
                                         cancel=cancel), on_progress)
    stopped = time.perf_counter() - clock["cancel"]
    print(f"plain folder: cancel -> returned in {stopped:.3f} s")
    assert stopped < 2.0
    assert result.cancelled and result.total == 12 and 2 <= len(result.rows) < 12
    listed = csv_files(out)
    assert listed == [r["file"] for r in result.rows]
    assert sorted(p.name for p in out.iterdir()) == sorted([*listed, "predictions.csv"])


def test_an_earlier_run_is_listed_and_replaced_only_with_overwrite(checkpoints, tmp_path):
    source = png_folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    assert _batch.earlier_outputs(source, out) == []
    drive(_batch.segment_folder(checkpoints["fundus"], source, out, "Black", device="cpu"))
    (out / "notes.txt").write_text("mine")
    assert _batch.earlier_outputs(source, out) == [out / "predictions.csv", out / "scan0.png",
                                                   out / "scan1.png"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="3 file.*earlier run.*--overwrite"):
        drive(_batch.segment_folder(checkpoints["fundus"], source, out, "White", device="cpu"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    result = drive(_batch.segment_folder(checkpoints["fundus"], source, out, "White",
                                         device="cpu", overwrite=True))
    assert {r["attribute_value"] for r in result.rows} == {"White"}
    assert {r["attribute_value"] for r in csv.DictReader(open(out / "predictions.csv"))} == {
        "White"}
    assert (out / "notes.txt").read_text() == "mine"


def test_earlier_outputs_of_a_dataset_are_its_cases_label_files(ct_data, tmp_path):
    import training.data

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _batch.earlier_outputs(ct_data.parent, out) == []
    first = training.data.load_cases(ct_data.parent)[0].id
    (out / f"{first}.nii.gz").write_bytes(b"earlier")
    assert _batch.earlier_outputs(ct_data.parent, out) == [out / f"{first}.nii.gz"]


def test_temporary_folders_remove_only_the_folders_they_made(tmp_path):
    folders = _batch.TemporaryFolders()
    made = folders.make("routing")
    (made / "routing.json").write_text("{}")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "routing.json").write_text("{}")
    folders.remove(mine)  # a folder the user chose: never removed
    folders.remove_all()
    assert not made.exists() and (mine / "routing.json").read_text() == "{}"
    assert made.name.startswith("napari-dmoe-routing-")


def test_a_dataset_run_into_a_locked_folder_is_refused_before_starting(tmp_path):
    import json
    import os
    import socket

    out = tmp_path / "out"
    out.mkdir()
    (out / ".napari-dmoe.lock").write_text(json.dumps({
        "pid": os.getppid(), "host": socket.gethostname(), "started": "2026-01-01T09:30",
        "command": "training.fit", "token": "t"}))
    with pytest.raises(ValueError, match=(
            rf"^Nothing was written: {out} is in use by another run \(training.fit, process "
            rf"{os.getppid()} on .*, started 2026-01-01T09:30\)\. Wait for it to finish, or "
            r"choose another output folder\. If no such run exists, delete .*\.lock\.$")):
        _batch.refuse_folder_in_use(out)
    _batch.refuse_folder_in_use(tmp_path)  # no lock: nothing to say
