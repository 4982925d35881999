"""training.run_folder's lock on its own, and held by ``predict``, ``evaluate`` and
``routing`` while they write into ``--out``: a second run is refused naming the first, the
lock of a killed run is taken over with a note, and the lock is gone when the run ends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from training import evaluate as evaluate_cli
from training import predict as predict_cli
from training import routing as routing_cli
from training.run_folder import (
    LOCK_NAME,
    FolderInUseError,
    lock_folder,
    lock_holder,
    read_lock,
)

# CLI name -> (main, the first file it writes, whose temporary file stands for a write of
# the other run in progress)
CLIS = {"predict": (predict_cli.main, "predictions.csv"),
        "evaluate": (evaluate_cli.main, "metrics.json"),
        "routing": (routing_cli.main, "routing.json")}


@pytest.fixture(scope="module")
def fundus(tmp_path_factory):
    from training.data import make_synthetic_dataset

    return make_synthetic_dataset("fundus", tmp_path_factory.mktemp("fundus"), n=9, seed=4)


def _argv(checkpoint: Path, data: Path, out: Path) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--data", str(data), "--split", "all",
            "--out", str(out), "--device", "cpu"]


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


def _write_lock(folder: Path, pid: int, command: str | None = "training.predict") -> dict:
    holder = {"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T09:30:00+00:00",
              "token": "t", **({"command": command} if command else {})}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps(holder))
    return holder


# -- the lock on its own -----------------------------------------------------------------
def test_a_held_lock_refuses_a_second_one_naming_the_holder(tmp_path):
    with lock_folder(tmp_path / "out", "training.predict") as lock:
        info = read_lock(lock.path)
        assert info["command"] == "training.predict" and info["pid"] == os.getpid()
        assert lock_holder(tmp_path / "out") == info
        with pytest.raises(FolderInUseError) as err:
            lock_folder(tmp_path / "out", "training.evaluate")
        assert err.value.folder == tmp_path / "out" and err.value.holder == info
        assert str(err.value) == (
            f"{tmp_path / 'out'} is in use by another run (training.predict, process "
            f"{os.getpid()} on {socket.gethostname()}, started {info['started']}); nothing "
            "was changed. Wait for it to finish, stop it, or choose another --out. If no "
            f"such run exists, delete {lock.path}.")
    assert not (tmp_path / "out" / LOCK_NAME).exists()
    assert lock_holder(tmp_path / "out") is None


def test_a_stale_lock_is_not_a_holder_and_is_taken_over(tmp_path):
    _write_lock(tmp_path, _dead_pid(), command=None)  # a lock from before locks named it
    assert lock_holder(tmp_path) is None
    notes = []
    with lock_folder(tmp_path, "training.routing", log=notes.append) as lock:
        assert read_lock(lock.path)["pid"] == os.getpid()
    assert len(notes) == 1 and "took over the stale lock of process" in notes[0]
    assert str(tmp_path) in notes[0]


def test_a_file_is_refused_as_a_folder(tmp_path):
    (tmp_path / "out").write_text("mine")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        lock_folder(tmp_path / "out", "training.predict")
    assert (tmp_path / "out").read_text() == "mine"


def test_a_failed_run_removes_only_the_empty_folder_its_lock_created(tmp_path):
    for name, make, write, fail in [("new", False, False, True), ("mine", True, False, True),
                                    ("wrote", False, True, True), ("done", False, False, False)]:
        folder = tmp_path / name
        if make:
            folder.mkdir()
        try:
            with lock_folder(folder, "training.evaluate"):
                if write:
                    (folder / "metrics.json").write_text("{}")
                if fail:
                    raise RuntimeError("the run failed")
        except RuntimeError:
            pass
        assert folder.is_dir() == (name != "new"), name  # only the empty one it made goes
        assert not (folder / LOCK_NAME).exists()
    assert (tmp_path / "wrote" / "metrics.json").read_text() == "{}"


def test_an_evaluate_that_fails_leaves_no_empty_out(fundus_checkpoint, fundus, tmp_path,
                                                    monkeypatch):
    """It locks (and so creates) --out before decoding any case; a case that cannot be
    read then fails the run, which must not leave an empty folder behind."""
    import training.data as data_module

    def unreadable(*args, **kwargs):
        raise OSError("unreadable case")

    monkeypatch.setattr(data_module, "read_case", unreadable)
    out = tmp_path / "ev"
    with pytest.raises(OSError, match="unreadable case"):
        evaluate_cli.evaluate(fundus_checkpoint, fundus, out, split="all", device="cpu")
    assert not out.exists()


# -- held by the CLIs --------------------------------------------------------------------
@pytest.mark.parametrize("cli", CLIS)
def test_a_run_into_a_folder_another_run_is_writing_is_refused(cli, fundus_checkpoint, fundus,
                                                                tmp_path, capsys):
    main, first = CLIS[cli]
    out = tmp_path / "out"
    holder = _write_lock(out, os.getppid())  # alive, on this host, not this process
    theirs = out / f".{first}.abcd1234.tmp"  # the other run's write in progress
    theirs.write_bytes(b"half")
    with pytest.raises(SystemExit) as exc:
        main(_argv(fundus_checkpoint, fundus, out))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert (f"{out} is in use by another run (training.predict, process {os.getppid()} on "
            f"{socket.gethostname()}, started 2026-01-01T09:30:00+00:00); nothing was "
            "changed. Wait for it to finish, stop it, or choose another --out. If no such "
            f"run exists, delete {out / LOCK_NAME}.") in err
    assert theirs.read_bytes() == b"half"
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK_NAME, theirs.name])
    assert json.loads((out / LOCK_NAME).read_text()) == holder


@pytest.mark.parametrize("cli", CLIS)
def test_the_lock_of_a_killed_run_is_taken_over_with_a_note(cli, fundus_checkpoint, fundus,
                                                             tmp_path, capsys):
    main, first = CLIS[cli]
    out = tmp_path / "out"
    dead = _dead_pid()
    _write_lock(out, dead)
    main(_argv(fundus_checkpoint, fundus, out))
    printed = capsys.readouterr().out
    assert (f"{out}: took over the stale lock of process {dead} on {socket.gethostname()} "
            "(that run was killed)") in printed
    assert (out / first).is_file() and not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("cli", CLIS)
def test_the_lock_is_held_while_every_output_is_written(cli, fundus_checkpoint, fundus, tmp_path,
                                                        monkeypatch):
    main, first = CLIS[cli]
    out = tmp_path / "out"
    seen: dict[str, dict | None] = {}
    real_replace = os.replace

    def replace(src, dst):  # every atomic write ends in os.replace
        seen[Path(dst).name] = read_lock(out / LOCK_NAME)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    main(_argv(fundus_checkpoint, fundus, out))
    assert first in seen
    for name, lock in seen.items():
        assert lock is not None, f"{name} was written without the lock"
        assert (lock["command"], lock["pid"]) == (f"training.{cli}", os.getpid())
    assert not (out / LOCK_NAME).exists()


def test_compare_holds_the_lock_too(fundus_checkpoint, fundus, tmp_path, capsys):
    evaluate_cli.main(_argv(fundus_checkpoint, fundus, tmp_path / "ev"))
    out = tmp_path / "cmp"
    _write_lock(out, os.getppid(), command="training.evaluate")
    with pytest.raises(SystemExit) as exc:
        evaluate_cli.main(["--compare", str(tmp_path / "ev"), "--out", str(out)])
    assert exc.value.code == 2
    assert "is in use by another run (training.evaluate" in capsys.readouterr().err
    assert not (out / "compare.md").exists()
