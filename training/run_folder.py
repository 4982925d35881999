"""Output folders: refuse to replace a run, lock a folder while a run writes into it, and
remove the temporary files of killed writes.

**The lock.** :func:`lock_folder` creates ``.napari-dmoe.lock`` in a folder atomically
(JSON: pid, host, start time, the command, a random token) and returns a
:class:`FolderLock` (a context manager). A second run on the same folder is refused
(:class:`FolderInUseError`, naming the holder's command, pid, host and start time and what
to do). A lock whose process no longer exists on this host is stale (the run was killed)
and is taken over, with a note; a lock from another host is never guessed about. Every CLI
that writes into a folder holds it while it writes: ``training.fit`` (through
:func:`open_run_folder`), ``training.predict``, ``training.evaluate`` and
``training.routing`` (and the plugin's Batch… and Dataset routing…, which call them), so two
runs never delete each other's temporary files or interleave their outputs.

:func:`open_run_folder` is called once at the start of ``training.fit``:

1. a folder that already holds a run (``best.safetensors``, ``last.safetensors``,
   ``last.state.safetensors``, ``history.csv`` or ``config.yaml``) is refused unless
   ``resume`` (continue it) or ``overwrite`` (delete those files and start over) is given;
2. the folder is locked (:func:`lock_folder`);
3. with the lock held, ``.<name>.XXXXXXXX.tmp`` files left by killed atomic writes
   (:func:`training.checkpoint.temp_files`) are deleted.

The lock is released (its file removed) by :meth:`RunFolder.close`, also on errors.

The other CLIs that write into an ``--out`` (``training.predict``, ``training.evaluate``,
``training.routing``) call :func:`refuse_earlier_outputs` with the files they are about to
write that already exist, before loading a model: an earlier run's outputs are replaced
only with ``--overwrite``. Once that check (and their data checks) have passed they lock
``--out`` (:func:`lock_folder`), check the earlier outputs again under the lock (another
run may have finished meanwhile), and call :func:`remove_temp_files` with the names they
write: the temporary files that killed writes of those names left are deleted (and named
in one printed line); other files, other names' temporary files included, are never
touched.
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
    """The output folder cannot be used: it holds a run, another run holds its lock, or it
    holds an earlier run's outputs that this run would replace."""


class FolderInUseError(RunFolderError):
    """Another run holds the folder's lock.

    Attributes:
        folder: the locked folder.
        lock: its lock file.
        holder: the lock's JSON (``pid``, ``host``, ``started``, ``command``).
    """

    def __init__(self, folder: Path, lock: Path, holder: dict[str, Any]) -> None:
        self.folder, self.lock, self.holder = folder, lock, holder
        super().__init__(
            f"{folder} is in use by another run ({describe_holder(holder)}); nothing was "
            "changed. Wait for it to finish, stop it, or choose another --out. If no such "
            f"run exists, delete {lock}.")


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
    """The lock file's JSON (``pid``, ``host``, ``started``, ``command``, ``token``), or None
    if absent or unreadable."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def lock_is_stale(info: dict[str, Any] | None) -> bool:
    """A lock is stale when its process is gone: same host and no such pid, or this very
    process without the lock in its list of held locks (a run that ended abnormally)."""
    if info is None:
        return True
    if info.get("host") != socket.gethostname():
        return False
    pid = int(info.get("pid") or 0)
    if pid == os.getpid():
        return info.get("token") not in _HELD
    return not process_alive(pid)


def describe_holder(holder: dict[str, Any]) -> str:
    """``"training.predict, process 1234 on host, started 2026-…"`` (a lock written before
    locks named their command: without the command)."""
    command = f"{holder['command']}, " if holder.get("command") else ""
    return (f"{command}process {holder.get('pid')} on {holder.get('host')}, started "
            f"{holder.get('started')}")


def lock_holder(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON of the live lock on ``folder`` (another run writes there), or None when the
    folder is free or its lock is stale; for a caller that wants to say so before starting
    (:func:`lock_folder` is what decides)."""
    info = read_lock(Path(folder) / LOCK_NAME)
    return None if info is None or lock_is_stale(info) else info


class FolderLock:
    """This process's lock on one folder (:func:`lock_folder`); a context manager. Leaving
    it on an exception also removes the folder if locking created it and nothing else was
    written there (a failed run leaves no empty ``--out`` behind; a folder the user made
    stays).

    Attributes:
        folder: the locked folder.
        notes: one line per thing done on locking (a stale lock taken over), for the log.
        created: locking created ``folder``.
    """

    def __init__(self, folder: Path, token: str, notes: list[str], created: bool = False) -> None:
        self.folder, self.token, self.notes, self.created = folder, token, notes, created

    @property
    def path(self) -> Path:
        """The lock file."""
        return self.folder / LOCK_NAME

    def release(self) -> None:
        """Remove the lock file (only if this process still holds it)."""
        if self.token in _HELD:
            _HELD.discard(self.token)
            info = read_lock(self.path)
            if info is not None and info.get("token") == self.token:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.release()
        if exc_type is not None and self.created:
            try:
                self.folder.rmdir()  # only if empty: never a file of anyone's
            except OSError:
                pass


def lock_folder(folder: str | os.PathLike, command: str, *,
                log: Callable[[str], None] | None = None) -> FolderLock:
    """Create ``folder`` if missing and lock it for ``command`` (e.g. ``"training.predict"``,
    recorded in the lock and named to a run that finds it held).

    A stale lock (its process is gone from this host) is taken over; ``log`` (if given)
    receives the note, which is also in the returned lock's ``notes``.

    Raises:
        FolderInUseError: another live run holds the lock (nothing is changed).
        RunFolderError: ``folder`` is a file, or its lock keeps changing.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} is a file, not a folder; choose a folder")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "token": token,
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    lock, notes = folder / LOCK_NAME, []
    tmp = folder / f".{LOCK_NAME}.{token}"
    tmp.write_text(json.dumps(info), encoding="utf-8")
    try:
        for _ in range(3):
            try:
                os.link(tmp, lock)  # atomic: fails if the lock exists, never half-written
                _HELD.add(token)
                for note in notes if log is not None else ():
                    log(f"{folder}: {note}")
                return FolderLock(folder, token, notes, created)
            except FileExistsError:
                held = read_lock(lock)
                if not lock_is_stale(held):
                    raise FolderInUseError(folder, lock, held) from None
                lock.unlink(missing_ok=True)
                who = (f"process {held.get('pid')} on {held.get('host')}" if held
                       else "an unreadable lock")
                notes.append(f"took over the stale lock of {who} (that run was killed)")
        raise RunFolderError(f"could not lock {folder}: {lock} keeps changing; another run "
                             "is starting there. Choose another --out.")
    finally:
        tmp.unlink(missing_ok=True)


class RunFolder:
    """A locked run folder (see the module docstring); use as a context manager.

    Attributes:
        path: the folder.
        notes: one line per thing done on opening (stale lock taken over, temp files
            removed, files of a replaced run deleted), for the log.
    """

    def __init__(self, lock: FolderLock) -> None:
        self.lock, self.path, self.notes = lock, lock.folder, lock.notes

    @property
    def lock_path(self) -> Path:
        return self.lock.path

    def close(self) -> None:
        """Release the lock (only if this process still holds it)."""
        self.lock.release()

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


def lock_outputs(out: str | os.PathLike, command: str, targets: Mapping[str, str], *,
                 overwrite: bool = False,
                 log: Callable[[str], None] | None = print) -> FolderLock:
    """Lock ``out`` for a run of ``command`` that is about to write ``targets``
    (``{file name: temp_suffix}``, as :func:`remove_temp_files`); call it once the run is
    accepted, and hold the returned lock until the last file is written.

    Under the lock, an earlier run's files among ``targets`` are refused again unless
    ``overwrite`` (another run may have written them since the caller's first check), then
    the temporary files killed writes of ``targets`` left are deleted. ``log`` receives the
    note of a stale lock taken over and the line naming deleted temporary files.

    Raises:
        FolderInUseError: another run holds the lock; nothing is changed.
        RunFolderError: ``out`` holds files of ``targets`` and not ``overwrite`` (the lock
            is released; nothing is written or deleted).
    """
    lock = lock_folder(out, command, log=log)
    try:
        if not overwrite:
            refuse_earlier_outputs(existing_files(out, list(targets)), out)
        remove_temp_files(out, targets, log=log)
    except BaseException:
        lock.release()
        raise
    return lock


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
        RunFolderError: ``out`` holds a run and neither flag was given.
        FolderInUseError: another run holds the lock.
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
    folder = RunFolder(lock_folder(out, "training.fit"))
    notes = folder.notes
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
