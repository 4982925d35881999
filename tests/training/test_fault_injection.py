"""Fault injection: a fit killed at any checkpoint-write boundary resumes with --resume to
the same result as an uninterrupted run, with a complete history.csv and no temp files.

Every atomic write (``training.checkpoint.atomic_write_bytes``) has three boundaries: a torn
temporary file, a complete temporary file not yet renamed, and the renamed file. The fast
tests take a snapshot of the run folder at every boundary of one in-process run (the files a
kill there would leave) and resume each snapshot, plus real ``os._exit(137)`` kills through
``NAPARI_DMOE_FAULT`` at a few boundaries; the slow test kills a subprocess at every one.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import training.checkpoint as ckpt
from training import fit as fit_cli
from training.data import make_synthetic_dataset
from training.run_folder import LOCK_NAME

FAST = ["--attribute", "race", "--classes", "background,rim,cup", "--image-size", "32",
        "--batch-size", "8", "--lr", "3e-3", "--quiet", "--val-every", "1",
        "--model-kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}']
EPOCHS = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run of this module on one thread, as the killed subprocesses (OMP_NUM_THREADS=1):
    resume is exact for the same thread count; with another, products sum in another order
    (MKL splits the reduction of weight gradients) and rounding differences grow."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_dataset("fundus", tmp_path_factory.mktemp("fundus"), n=20, seed=5)


def _args(data, out, *extra) -> list[str]:
    return ["--data", str(data), "--epochs", str(EPOCHS), "--out", str(out), *FAST, *extra]


@pytest.fixture(scope="module")
def snapshots(data, tmp_path_factory):
    """An uninterrupted run, with a copy of its folder at every write boundary."""
    root = tmp_path_factory.mktemp("faults")
    out, snaps = root / "straight", []

    def snapshot(phase, path, tmp):
        copy = root / f"snap{len(snaps) + 1:02d}"
        shutil.copytree(out, copy)
        if phase == "torn" and os.path.exists(tmp):  # a kill in the middle of the write
            torn = copy / Path(tmp).name
            os.truncate(torn, torn.stat().st_size // 2)
        snaps.append((copy, f"{phase} {path.name}"))

    mp = pytest.MonkeyPatch()
    mp.setattr(ckpt, "fault_point", snapshot)
    try:
        result = fit_cli.main(_args(data, out))
    finally:
        mp.undo()
    return out, result, snaps


def _history(out: Path) -> list[dict[str, str]]:
    with open(out / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _assert_complete(out: Path, result, reference) -> None:
    """Same epochs and figures as the uninterrupted run; nothing left behind."""
    from safetensors.torch import load_file

    rows = _history(out)
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    for got, want in zip(rows, reference.history):
        for key in ("loss", "val_dice", "lr"):
            assert float(got[key]) == pytest.approx(want[key], abs=1e-4), (got["epoch"], key)
    assert result.best_epoch == reference.best_epoch
    a = load_file(out / "last.safetensors")
    b = load_file(reference.out / "last.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert ckpt.temp_files(out) == []
    assert not (out / LOCK_NAME).exists()


def test_every_write_boundary_is_snapshotted(snapshots):
    _, result, snaps = snapshots
    phases = [what for _, what in snaps]
    # per epoch: state, last, history (and best when it improved), three boundaries each
    assert len(snaps) >= EPOCHS * 9
    assert [p.split()[0] for p in phases] == ["torn", "written", "replaced"] * (len(phases) // 3)
    names = [p.split()[1] for p in phases[::3]]
    # the state comes before its checkpoint, the history last
    assert names[names.index("last.state.safetensors"):][:3] == [
        "last.state.safetensors", "last.safetensors", "history.csv"]
    assert names.count("history.csv") == EPOCHS == result.epochs_run


def test_resume_from_every_boundary_snapshot(data, snapshots):
    out, reference, snaps = snapshots
    for copy, what in snaps:
        result = fit_cli.main(_args(data, copy, "--resume"))
        try:
            _assert_complete(copy, result, reference)
        except AssertionError as exc:
            raise AssertionError(f"resume after a kill at '{what}' ({copy.name}): {exc}") from exc


def _killed_run(data, out: Path, step: int) -> subprocess.CompletedProcess:
    env = {**os.environ, ckpt.FAULT_ENV: f"checkpoint-write:{step}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "training.fit", *_args(data, out)],
                          env=env, capture_output=True, text=True, timeout=600)


def _kill_then_resume(data, snapshots, tmp_path, step: int) -> None:
    _, reference, snaps = snapshots
    out = tmp_path / f"killed{step}"
    proc = _killed_run(data, out, step)
    if step <= len(snaps):
        assert proc.returncode == 137, proc.stderr[-2000:]
        assert f"write step {step}" in proc.stdout
        assert (out / LOCK_NAME).exists()  # the killed run's lock stays behind, stale
    else:
        assert proc.returncode == 0, proc.stderr[-2000:]
    result = fit_cli.main(_args(data, out, "--resume"))
    _assert_complete(out, result, reference)


@pytest.mark.parametrize("phase", [
    pytest.param("torn", marks=pytest.mark.slow), "written",
    pytest.param("replaced", marks=pytest.mark.slow)])
def test_real_kill_in_the_first_state_write_then_resume(data, snapshots, tmp_path, phase):
    """SIGKILL-like exits while the first training state is written (the case that used to
    need --resume-fallback): the torn temp file is removed, resume is exact."""
    _, _, snaps = snapshots
    steps = [i + 1 for i, (_, what) in enumerate(snaps)
             if what == f"{phase} last.state.safetensors"]
    _kill_then_resume(data, snapshots, tmp_path, steps[0])


@pytest.mark.slow
@pytest.mark.parametrize("step", range(1, 3 * 4 * EPOCHS + 2))
def test_real_kill_at_every_write_step_then_resume(data, snapshots, tmp_path, step):
    _kill_then_resume(data, snapshots, tmp_path, step)


def test_second_run_into_a_finished_folder_is_refused(data, snapshots, capsys):
    out, _, _ = snapshots
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(SystemExit) as exc:
        fit_cli.main(_args(data, out))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--resume" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
