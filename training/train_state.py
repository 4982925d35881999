"""Training state for ``--resume``: one ``.safetensors`` file + JSON metadata, no pickle.

``last.state.safetensors`` (next to ``last.safetensors``) is a complete, self-contained
snapshot taken at the end of an epoch: the model weights, the optimizer, scheduler,
GradScaler and loss-function states, every RNG (python, numpy, torch CPU and CUDA, named
``torch.Generator`` s such as the DataLoader's), the number of completed epochs, the best
metric and its epoch, the patience counter, the history rows, the run's configuration and
the SHA-256 of the ``last.safetensors`` written just before it.

File layout: tensors (model weights under ``model/<name>``, optimizer moments under
``optimizer/state/<param>/<key>``, RNG byte states under ``rng/...``) in the safetensors
body; the header's ``__metadata__`` holds one key, ``napari_dmoe_state``, a JSON object
that mirrors the nested state with ``{"__tensor__": name}`` where a tensor was, plus a
SHA-256 over all tensor bytes. Loading checks that checksum, so a truncated, padded or
bit-flipped file is refused instead of silently resuming from garbage.

Every write is atomic (``training.checkpoint.atomic_write_bytes``): a kill at any instant
leaves the previous state file readable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import atomic_write_bytes

STATE_KEY = "napari_dmoe_state"
STATE_FORMAT_VERSION = 1
_RESERVED = ("__tensor__", "__tuple__", "__dict__", "__ndarray__")


class StateError(ValueError):
    """A training-state file is missing, corrupt or does not belong to this run."""


@dataclass
class TrainState:
    """Everything needed to continue a run exactly where an epoch ended.

    Attributes:
        epoch: completed epochs.
        best_metric, best_epoch: best validation ES-Dice so far and its epoch
            (``-inf`` and 0 before the first validation).
        since_best: validations without improvement (the patience counter).
        history: one dict per completed epoch (the rows of ``history.csv``).
        model: the network's ``state_dict`` (CPU tensors).
        optimizer, scheduler, scaler, loss: ``state_dict()`` s (``None`` if absent).
        rng: :func:`capture_rng` output.
        config: the run's resolved configuration (checked on resume).
        model_file: ``{"name", "sha256", "epoch"}`` of the ``last.safetensors`` written
            just before this state.
        world_size: processes that trained (resuming with another count is not exact).
    """

    epoch: int
    best_metric: float
    best_epoch: int
    since_best: int
    history: list[dict[str, Any]]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    loss: dict[str, Any] | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    model_file: dict[str, Any] | None = None
    world_size: int = 1

    def load_optimisation(self, optimizer: torch.optim.Optimizer, scheduler: Any,
                          scaler: Any = None, loss_fn: torch.nn.Module | None = None) -> None:
        """Put the saved optimizer, scheduler, GradScaler and loss states into live objects.

        Without a scheduler state (a fallback to ``best.safetensors``) the schedule is
        stepped ``epoch`` times instead, so the learning rate matches the epoch.
        """
        if self.optimizer:
            optimizer.load_state_dict(self.optimizer)
        if self.scheduler:
            scheduler.load_state_dict(self.scheduler)
        else:
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(self.epoch):
                    scheduler.step()
        if scaler is not None and self.scaler:
            scaler.load_state_dict(self.scaler)
        if loss_fn is not None and self.loss:
            loss_fn.load_state_dict(self.loss)


# -- RNG ------------------------------------------------------------------------------------
def capture_rng(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Snapshot of python ``random``, numpy, torch (CPU, every CUDA device) and ``generators``."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any],
                generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back what :func:`capture_rng` took (CUDA states only if CUDA is in use here)."""
    random.setstate(_as_tuple(state["python"]))
    np.random.set_state(_as_tuple(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise StateError(f"the saved state has no RNG for generator {name!r}")
        gen.set_state(saved[name])


def _as_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


# -- (de)serialisation -----------------------------------------------------------------------
def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able mirror of ``obj``; tensors go to ``tensors`` under their path."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _RESERVED for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, f"{path}/key{i}", tensors),
                              _encode(v, f"{path}/{k}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at {path!r} in a training state")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        name = obj["__tensor__"]
        if name not in tensors:
            raise StateError(f"the state's metadata names tensor {name!r}, which the file lacks")
        return tensors[name]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _unshare(tensors: dict[str, torch.Tensor]) -> None:
    """Clone tensors that share storage or view part of one (safetensors refuses them)."""
    seen: set[int] = set()
    for name, t in tensors.items():
        ptr = t.untyped_storage().data_ptr()
        partial = t.untyped_storage().nbytes() != t.numel() * t.element_size()
        if t.numel() and (ptr in seen or partial):
            t = tensors[name] = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 2**22) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_train_state(path: str | os.PathLike, state: TrainState) -> Path:
    """Write ``state`` atomically to a ``.safetensors`` file (see the module docstring)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    body = {
        "format_version": STATE_FORMAT_VERSION,
        "epoch": int(state.epoch), "best_metric": float(state.best_metric),
        "best_epoch": int(state.best_epoch), "since_best": int(state.since_best),
        "history": _encode(state.history, "history", tensors),
        "model": _encode(dict(state.model), "model", tensors),
        "optimizer": _encode(state.optimizer, "optimizer", tensors),
        "scheduler": _encode(state.scheduler, "scheduler", tensors),
        "scaler": _encode(state.scaler, "scaler", tensors),
        "loss": _encode(state.loss, "loss", tensors),
        "rng": _encode(state.rng, "rng", tensors),
        "config": _encode(state.config, "config", tensors),
        "model_file": state.model_file, "world_size": int(state.world_size),
    }  # fmt: skip
    _unshare(tensors)
    body["tensor_sha256"] = _tensor_digest(tensors)
    text = json.dumps(body)
    return atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, {STATE_KEY: text}))


def load_train_state(path: str | os.PathLike) -> TrainState:
    """Read and verify a state file written by :func:`save_train_state`.

    Raises:
        StateError: missing file, not a safetensors state, corrupt header, or tensor bytes
            that do not match the stored checksum (the message names the file and what to do).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise StateError(f"no training state at {path}")
    advice = ("the file is damaged; resume is refused. Use --resume-fallback best (restart "
              "from best.safetensors) or --resume-fallback fresh (start over)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise StateError(f"{path} is not a readable training state ({exc}); {advice}") from None
    if STATE_KEY not in meta:
        raise StateError(f"{path} is a safetensors file but not a napari-dmoe training state")
    try:
        body = json.loads(meta[STATE_KEY])
        version = body["format_version"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise StateError(f"{path}: corrupt training-state metadata ({exc!r}); {advice}") from None
    if not isinstance(version, int) or version > STATE_FORMAT_VERSION:
        raise StateError(f"{path} has state format {version!r}; this napari-dmoe reads up to "
                         f"{STATE_FORMAT_VERSION}. Update napari-dmoe.")
    if _tensor_digest(tensors) != body.get("tensor_sha256"):
        raise StateError(f"{path}: tensor bytes do not match the stored checksum; {advice}")
    try:
        return TrainState(
            epoch=int(body["epoch"]), best_metric=float(body["best_metric"]),
            best_epoch=int(body["best_epoch"]), since_best=int(body["since_best"]),
            history=_decode(body["history"], tensors), model=_decode(body["model"], tensors),
            optimizer=_decode(body["optimizer"], tensors),
            scheduler=_decode(body["scheduler"], tensors),
            scaler=_decode(body["scaler"], tensors), loss=_decode(body["loss"], tensors),
            rng=_decode(body["rng"], tensors), config=_decode(body["config"], tensors),
            model_file=body.get("model_file"), world_size=int(body.get("world_size", 1)),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{path}: incomplete training state ({exc!r}); {advice}") from None


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       ignore: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """``"key: saved → current"`` for every setting in both that differs (``ignore`` skipped).

    Keys present on one side only are skipped (settings added or removed by an upgrade).
    """
    keys = sorted((set(saved) & set(current)) - set(ignore))
    return [f"{k}: {saved.get(k)!r} → {current.get(k)!r}" for k in keys
            if _plain(saved.get(k)) != _plain(current.get(k))]


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


# -- choosing where to resume from ------------------------------------------------------------
LAST_NAME = "last.safetensors"
STATE_NAME = "last.state.safetensors"
BEST_NAME = "best.safetensors"
FALLBACKS = ("refuse", "best", "fresh")


@dataclass
class ResumePoint:
    """Where ``--resume`` continues from.

    Attributes:
        kind: ``"state"`` (exact: the verified last pair), ``"best"`` (weights of
            ``best.safetensors`` only; optimizer, scheduler position and RNG restart),
            ``"fresh"`` (start over, asked for) or ``"new"`` (nothing there yet).
        state: the :class:`TrainState` for ``state``/``best`` (for ``best`` without
            optimizer, scheduler, scaler or RNG), else None.
        message: one line for the log saying what was chosen and why.
    """

    kind: str
    state: TrainState | None
    message: str


HISTORY_NAME = "history.csv"


def history_csv(rows: list[dict[str, Any]]) -> bytes:
    """``history.csv`` bytes: one row per completed epoch, columns in first-seen order."""
    import csv
    import io

    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def write_history(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """Write ``history.csv`` atomically (a kill leaves the old file or the new one)."""
    from .checkpoint import write_bytes_atomic

    return write_bytes_atomic(path, history_csv(rows))


def save_last_pair(out: str | os.PathLike, model: torch.nn.Module, state: TrainState,
                   **checkpoint_metadata: Any) -> tuple[Path, Path]:
    """Write ``last.state.safetensors``, then ``last.safetensors``, then ``history.csv``.

    The state is written first and records the SHA-256 and header of the checkpoint about
    to be written, so the state alone can rebuild ``last.safetensors`` bit for bit
    (:func:`repair_run_folder`). Every write is atomic, and :func:`find_resume_point`
    accepts every on-disk combination a kill can leave: nothing yet (a new run), the new
    state beside the previous (or no) checkpoint, or the complete new set; a stale
    ``history.csv`` is rewritten from the state. ``state.model`` defaults to the model's
    weights; ``state.model_file`` is filled in here.

    Returns:
        ``(checkpoint path, state path)``.
    """
    from .checkpoint import checkpoint_bytes, checkpoint_header, plain_tensors, write_bytes_atomic

    out = Path(out)
    text = checkpoint_header(model, **checkpoint_metadata)
    tensors = plain_tensors(model)
    data = checkpoint_bytes(tensors, text)
    state.model_file = {"name": LAST_NAME, "sha256": hashlib.sha256(data).hexdigest(),
                        "epoch": state.epoch, "header": text}
    if not state.model:
        state.model = tensors
    state_path = save_train_state(out / STATE_NAME, state)
    last = write_bytes_atomic(out / LAST_NAME, data)
    write_history(out / HISTORY_NAME, state.history)
    return last, state_path


def repair_run_folder(out: str | os.PathLike, state: TrainState) -> list[str]:
    """Bring ``last.safetensors`` and ``history.csv`` in line with a verified ``state``.

    A kill between the writes of :func:`save_last_pair` can leave the previous (or no)
    checkpoint and a history without the last epoch; both are rewritten from the state
    (the checkpoint bit for bit, when the state recorded its header).

    Returns:
        One line per file rewritten (empty when nothing was needed).
    """
    from .checkpoint import checkpoint_bytes, write_bytes_atomic

    out = Path(out)
    done = []
    info = state.model_file or {}
    last = out / LAST_NAME
    if info.get("header") and state.model and (
            not last.is_file() or file_sha256(last) != info.get("sha256")):
        data = checkpoint_bytes({k: v.contiguous() for k, v in state.model.items()},
                                info["header"])
        if hashlib.sha256(data).hexdigest() == info.get("sha256"):
            write_bytes_atomic(last, data)
            done.append(f"rewrote {LAST_NAME} of epoch {state.epoch} from {STATE_NAME}")
    history = out / HISTORY_NAME
    want = history_csv(state.history)
    if not history.is_file() or history.read_bytes() != want:
        write_history(history, state.history)
        done.append(f"rewrote {HISTORY_NAME} with the {len(state.history)} completed epoch(s)")
    return done


def verify_last_pair(out: str | os.PathLike) -> TrainState:
    """Load ``last.state.safetensors`` and check ``last.safetensors`` against it.

    The pair is consistent when the checkpoint's SHA-256 is the one the state recorded.
    A kill between the two writes is accepted as well: the checkpoint missing or one
    epoch older than the state (the state is written first), or one epoch newer (files
    written by earlier versions, checkpoint first). The state holds its own copy of the
    weights, so the run resumes exactly from the state's epoch.

    Raises:
        StateError: a file is missing, damaged, or the two do not belong together.
    """
    from .checkpoint import read_header

    out = Path(out)
    last, state_path = out / LAST_NAME, out / STATE_NAME
    hint = ("Refusing to resume. Pass --resume-fallback best to restart from best.safetensors "
            "or --resume-fallback fresh to start over")
    if not state_path.is_file():
        raise StateError(f"{out} has {LAST_NAME} but no {STATE_NAME} (optimizer, RNG and epoch "
                         f"state), so the run cannot continue exactly. {hint}.")
    state = load_train_state(state_path)
    if not last.is_file():
        return state  # killed before the checkpoint's first write: the state is complete
    try:
        meta, _ = read_header(last)
    except ValueError as exc:
        raise StateError(f"{last} is corrupt: {exc}. {hint}.") from None
    recorded = (state.model_file or {}).get("sha256")
    if recorded != file_sha256(last):
        epochs = (meta.get("provenance") or {}).get("epochs")
        if epochs not in (state.epoch - 1, state.epoch + 1):
            raise StateError(f"{last} does not match {STATE_NAME} (its SHA-256 differs from "
                             f"the one recorded at epoch {state.epoch}): the file was damaged "
                             f"or replaced. {hint}.")
    return state


def find_resume_point(out: str | os.PathLike, fallback: str = "refuse") -> ResumePoint:
    """Decide how ``--resume`` continues in ``out`` (see :class:`ResumePoint`).

    Args:
        out: the run's output folder.
        fallback: what to do when the last pair is unusable: ``"refuse"`` (raise),
            ``"best"`` (restart from ``best.safetensors``) or ``"fresh"`` (start over).

    Raises:
        StateError: the pair is unusable and ``fallback`` is ``"refuse"``, or the
            fallback itself is impossible (e.g. no valid ``best.safetensors``).
        ValueError: unknown ``fallback``.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"--resume-fallback must be one of {list(FALLBACKS)}, got {fallback!r}")
    out = Path(out)
    if not (out / LAST_NAME).exists() and not (out / STATE_NAME).exists():
        return ResumePoint("new", None, f"nothing to resume in {out}: starting a new run")
    if not (out / STATE_NAME).exists() and _checkpoint_epoch(out / LAST_NAME) == 1:
        # written by versions that saved the checkpoint first, killed before the first state
        return ResumePoint("new", None, f"{out / LAST_NAME} of epoch 1 has no {STATE_NAME} "
                           "(the run was stopped before its first state was written): "
                           "starting the run again from epoch 1")
    try:
        state = verify_last_pair(out)
        repaired = repair_run_folder(out, state)
        note = f" ({'; '.join(repaired)})" if repaired else ""
        return ResumePoint("state", state,
                           f"resuming after epoch {state.epoch} from {out}{note}")
    except StateError as exc:
        if fallback == "refuse":
            raise
        problem = str(exc).split(" Refusing")[0]
    if fallback == "fresh":
        return ResumePoint("fresh", None, f"{problem}; starting over as asked "
                                          "(--resume-fallback fresh)")
    return ResumePoint("best", _state_from_best(out),
                       f"{problem}; restarting from {BEST_NAME} as asked "
                       "(--resume-fallback best; optimizer and RNG start afresh)")


def shared_resume_point(out: str | os.PathLike, fallback: str = "refuse") -> ResumePoint:
    """:func:`find_resume_point` on rank 0, its answer given to every rank.

    Only rank 0 reads the files (no shared filesystem needed); other ranks get the state
    without the weights, which DistributedDataParallel copies from rank 0 anyway. In one
    process this is :func:`find_resume_point`.

    Raises:
        StateError: on every rank, when rank 0 found no usable resume point.
    """
    from .distributed import broadcast_object, get_rank, is_distributed

    if not is_distributed():
        return find_resume_point(out, fallback)
    point, error = None, None
    if get_rank() == 0:
        try:
            point = find_resume_point(out, fallback)
        except ValueError as exc:
            error = str(exc)
    light = point
    if point is not None and point.state is not None:
        light = ResumePoint(point.kind, replace(point.state, model={}), point.message)
    error, light = broadcast_object((error, light))
    if error:
        raise StateError(error)
    return point if get_rank() == 0 else light


def _checkpoint_epoch(path: Path) -> int | None:
    from .checkpoint import read_header

    try:
        meta, _ = read_header(path)
    except (OSError, ValueError):
        return None
    epochs = (meta.get("provenance") or {}).get("epochs")
    return epochs if isinstance(epochs, int) else None


def _state_from_best(out: Path) -> TrainState:
    from safetensors.torch import load_file

    from .checkpoint import read_header

    path = out / BEST_NAME
    try:
        meta, _ = read_header(path)
        tensors = load_file(str(path))
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot fall back to {path}: {exc}") from None
    prov = meta.get("provenance") or {}
    epoch = int(prov.get("epochs") or 0)
    metric = ((prov.get("validation") or {}).get("mean") or {}).get("es_dice", -math.inf)
    history = [r for r in _read_history(out / HISTORY_NAME) if int(r["epoch"]) <= epoch]
    return TrainState(epoch=epoch, best_metric=float(metric), best_epoch=epoch, since_best=0,
                      history=history, model=tensors, config=prov.get("config") or {})


def _read_history(path: Path) -> list[dict[str, Any]]:
    import csv

    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, Any] = {}
            for k, v in row.items():
                try:
                    parsed[k] = int(v) if k == "epoch" else float(v)
                except (TypeError, ValueError):
                    parsed[k] = v
            rows.append(parsed)
    return rows
