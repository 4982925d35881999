"""A training run's output folder: refuse to replace a run, lock it while a fit writes, and
remove the temporary files of killed writes.

:func:`open_run_folder` is called once at the start of ``training.fit``:

1. a folder that already holds a run (``best.safetensors``, ``last.safetensors``,
   ``last.state.safetensors``, ``history.csv`` or ``config.yaml``) is refused unless
   ``resume`` (continue it) or ``overwrite`` (delete those files and start over) is given;
2. the lock file ``.napari-dmoe.lock`` is created atomically (JSON: pid, host, start time,
   a random token). A second fit on the same folder is refused with the holder's pid, host
   and start time. A lock whose process no longer exists on this host is stale (the fit
   was killed) and is taken over; a lock from another host is never guessed about;
3. with the lock held, ``.<name>.XXXXXXXX.tmp`` files left by killed atomic writes
   (:func:`training.checkpoint.temp_files`) are deleted.

The lock is released (its file removed) by :meth:`RunFolder.close`, also on errors.

The other CLIs that write into an ``--out`` (``training.predict``, ``training.evaluate``,
``training.routing``) call :func:`refuse_earlier_outputs` with the files they are about to
write that already exist, before loading a model: an earlier run's outputs are replaced
only with ``--overwrite``. Once that check (and their data checks) have passed they call
:func:`remove_temp_files` with the names they write: the temporary files that killed
writes of those names left are deleted (and named in one printed line); other files,
other names' temporary files included, are never touched.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import temp_files
from .train_state import BEST_NAME, HISTORY_NAME, LAST_NAME, STATE_NAME

LOCK_NAME = ".napari-dmoe.lock"
RUN_FILES = (BEST_NAME, LAST_NAME, STATE_NAME, HISTORY_NAME, "config.yaml")
_HELD: set[str] = set()  # tokens of the locks this process holds
SHOWN = 3  # file names a refusal lists before "and N more"


class RunFolderError(ValueError):
    """The output folder cannot be used: it holds a run, another fit holds its lock, or it
    holds an earlier run's outputs that this run would replace."""


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (``False`` for pid <= 0)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(path: str | os.PathLike) -> dict[str, Any] | None:
    """The lock file's JSON (``pid``, ``host``, ``started``, ``token``), or None if absent
    or unreadable."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def lock_is_stale(info: dict[str, Any] | None) -> bool:
    """A lock is stale when its process is gone: same host and no such pid, or this very
    process without the lock in its list of held locks (a fit that ended abnormally)."""
    if info is None:
        return True
    if info.get("host") != socket.gethostname():
        return False
    pid = int(info.get("pid") or 0)
    if pid == os.getpid():
        return info.get("token") not in _HELD
    return not process_alive(pid)


class RunFolder:
    """A locked run folder (see the module docstring); use as a context manager.

    Attributes:
        path: the folder.
        notes: one line per thing done on opening (stale lock taken over, temp files
            removed, files of a replaced run deleted), for the log.
    """

    def __init__(self, path: Path, token: str, notes: list[str]) -> None:
        self.path, self.token, self.notes = path, token, notes

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_NAME

    def close(self) -> None:
        """Release the lock (only if this process still holds it)."""
        if self.token in _HELD:
            _HELD.discard(self.token)
            info = read_lock(self.lock_path)
            if info is not None and info.get("token") == self.token:
                self.lock_path.unlink(missing_ok=True)

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def existing_run_files(out: str | os.PathLike) -> list[str]:
    """Names of :data:`RUN_FILES` present in ``out``."""
    out = Path(out)
    return [n for n in RUN_FILES if (out / n).exists()]


def existing_files(out: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """The files ``out/<name>`` of ``names`` that exist (a dangling link counts: writing
    the name would replace it)."""
    return [Path(out) / n for n in names if os.path.lexists(Path(out) / n)]


def refuse_earlier_outputs(existing: Sequence[str | os.PathLike],
                           out: str | os.PathLike) -> None:
    """Refuse a run whose outputs would replace ``existing`` files of an earlier run in
    ``out`` (the caller lists the files it would write that exist; none: nothing happens).

    Raises:
        RunFolderError: naming the first few files and their number, saying they are an
            earlier run's and what to do (``--overwrite``, or another ``--out``).
    """
    if not existing:
        return
    names = [Path(p).name for p in existing]
    shown = ", ".join(names[:SHOWN])
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    raise RunFolderError(
        f"{out} already holds {len(names)} file(s) from an earlier run that this run would "
        f"replace: {shown}{more}. Nothing was written; pass --overwrite to replace them "
        "(overwrite=True in Python), or choose another --out.")


def remove_temp_files(out: str | os.PathLike, targets: Mapping[str, str] | None, *,
                      log: Callable[[str], None] | None = print) -> list[Path]:
    """Delete the temporary files that killed writes of ``targets`` left in ``out``.

    ``targets``: ``{file name: temp_suffix}`` of the files this run writes
    (:func:`training.checkpoint.temp_files`; None: every name, for a run folder that is
    only ever written by fit); call it once the run is accepted (after
    :func:`refuse_earlier_outputs`), so that a refused run changes nothing. Other files,
    the temporary files of other names included, are never touched. ``log`` receives one
    line naming the deleted files, when there are any. Returns them.
    """
    removed = temp_files(out, targets)
    for p in removed:
        p.unlink(missing_ok=True)
    if removed and log is not None:
        log(f"removed {len(removed)} temporary file(s) left by killed writes: "
            f"{', '.join(p.name for p in removed)}")
    return removed


def _acquire(out: Path) -> tuple[str, list[str]]:
    notes: list[str] = []
    token = secrets.token_hex(8)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "token": token,
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    lock = out / LOCK_NAME
    tmp = out / f".{LOCK_NAME}.{token}"
    tmp.write_text(json.dumps(info), encoding="utf-8")
    try:
        for _ in range(3):
            try:
                os.link(tmp, lock)  # atomic: fails if the lock exists, never half-written
                _HELD.add(token)
                return token, notes
            except FileExistsError:
                held = read_lock(lock)
                if not lock_is_stale(held):
                    raise RunFolderError(
                        f"{out} is in use by another training run (process "
                        f"{held.get('pid')} on {held.get('host')}, started "
                        f"{held.get('started')}); wait for it to finish, stop it, or choose "
                        f"another --out. If no such run exists, delete {lock}.") from None
                lock.unlink(missing_ok=True)
                who = (f"process {held.get('pid')} on {held.get('host')}" if held
                       else "an unreadable lock")
                notes.append(f"took over the stale lock of {who} (that run was killed)")
        raise RunFolderError(f"could not lock {out}: {lock} keeps changing; another run is "
                             "starting there. Choose another --out.")
    finally:
        tmp.unlink(missing_ok=True)


def refuse_data_inside(out: str | os.PathLike, data: str | os.PathLike) -> None:
    """Refuse an ``--out`` that is, or contains, the training data: ``--overwrite`` deletes
    run files by name there (``config.yaml``, …) and a run's outputs would mix with the data.

    Raises:
        RunFolderError: naming both paths and what to do.
    """
    out_path = Path(out).resolve()
    data_path = Path(data).resolve()
    data_folder = data_path if data_path.is_dir() else data_path.parent
    if data_folder == out_path or out_path in data_folder.parents:
        raise RunFolderError(f"--out {out} holds the training data {data}; a run's files "
                             "would mix with (and --overwrite could delete) the data's own "
                             "files. Choose an --out outside the data folder (e.g. runs/NAME).")


def open_run_folder(out: str | os.PathLike, *, resume: bool = False,
                    overwrite: bool = False) -> RunFolder:
    """Check, lock and tidy ``out`` before a fit writes to it (module docstring).

    Args:
        out: the run's output folder (created if missing).
        resume: the fit continues the run in ``out`` (``--resume``).
        overwrite: the run in ``out`` may be replaced (``--overwrite``): its files are
            deleted once the lock is held.

    Raises:
        ValueError: both ``resume`` and ``overwrite``.
        RunFolderError: ``out`` holds a run and neither flag was given, or another fit
            holds the lock.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: --resume continues "
                         "the run in --out, --overwrite replaces it")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder; choose a folder")
    existing = existing_run_files(out)
    if existing and not (resume or overwrite):
        kind = "finished or started"
        raise RunFolderError(
            f"{out} already holds a {kind} training run ({', '.join(existing)}); nothing was "
            "changed. Pass --resume to continue it, --overwrite to replace it, or choose "
            "another --out.")
    out.mkdir(parents=True, exist_ok=True)
    token, notes = _acquire(out)
    folder = RunFolder(out, token, notes)
    try:
        remove_temp_files(out, None, log=notes.append)
        if overwrite and existing:
            for name in existing:
                (out / name).unlink(missing_ok=True)
            notes.append(f"--overwrite: deleted the previous run's {', '.join(existing)}")
    except BaseException:
        folder.close()
        raise
    return folder


def open_shared_run_folder(out: str | os.PathLike, *, resume: bool = False,
                           overwrite: bool = False) -> RunFolder | None:
    """:func:`open_run_folder` on rank 0 (which writes the files); its refusal raised on
    every rank. Returns None on the other ranks; in one process it is
    :func:`open_run_folder`.

    Raises:
        RunFolderError, ValueError: as :func:`open_run_folder`, on every rank.
    """
    from .distributed import broadcast_object, get_rank, is_distributed

    if not is_distributed():
        return open_run_folder(out, resume=resume, overwrite=overwrite)
    folder, error = None, None
    if get_rank() == 0:
        try:
            folder = open_run_folder(out, resume=resume, overwrite=overwrite)
        except ValueError as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error:
        raise RunFolderError(error)
    return folder
