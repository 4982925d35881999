"""Checkpoints: one ``.safetensors`` file, rebuilt from its own metadata, never unpickled.

Layout (shared/DATA_FORMATS.md §6): tensors = the model's ``state_dict``; the safetensors
header's ``__metadata__`` holds one key, ``napari_dmoe``, whose value is a JSON object::

    {"format_version": 1,
     "model": {"name": "transunet", "kwargs": {...}},      # create_model(name, **kwargs)
     "spatial_dims": 2, "in_channels": 1, "class_names": [...],
     "attribute": {"name": "race", "vocabulary": [...], "unknown_router": true},
     "preprocessing": {...}, "provenance": {...}, ...any further keys the caller passes}

Loading parses and checks the header itself before any tensor is touched, so a pickle,
a truncated file or a foreign safetensors file is refused with a message naming the
problem instead of a stack trace from deep inside a library.

Checkpoints, run state, ``history.csv``, predicted label files and every report and figure
of ``evaluate``, ``routing`` and ``benchmark`` go through one atomic write,
:func:`atomic_write_bytes` (a writer callback), with :func:`write_bytes_atomic` (bytes),
:func:`atomic_write_text` (text) and :func:`atomic_savefig` (a matplotlib figure) over it:
a kill leaves the earlier file or the new one, never a torn one.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

FORMAT_VERSION = 1
METADATA_KEY = "napari_dmoe"
_MAX_HEADER = 100 * 2**20
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


def _library_versions() -> dict[str, str]:
    import numpy
    import safetensors

    from . import __version__

    return {
        "napari_dmoe": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
    }


def plain_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no storage shared between two names."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        out[name] = t
    return out


FAULT_ENV = "NAPARI_DMOE_FAULT"
"""Environment hook for fault-injection tests: ``checkpoint-write:N`` ends the process with
``os._exit(137)`` (as SIGKILL would) at the N-th write boundary (1-based, counted over the
process). Each :func:`atomic_write_bytes` call has three boundaries: ``torn`` (the temporary
file holds half its bytes), ``written`` (complete temporary file, not yet renamed) and
``replaced`` (renamed into place)."""
FAULT_PHASES = ("torn", "written", "replaced")
_write_steps = [0]
TEMP_SUFFIX = ".tmp"
_TEMP_RANDOM = re.compile(r"[A-Za-z0-9_]{8}")


class CheckpointWriteError(OSError):
    """A checkpoint or state file could not be written (disk full, read-only folder...).

    The message names the file, the cause and says that the previous file is unchanged,
    then what to do on the command line; ``reason`` is the message without that advice,
    for a caller (the plugin) that gives its own.
    """

    def __init__(self, reason: str, advice: str) -> None:
        super().__init__(f"{reason}. {advice}")
        self.reason = reason


def fault_point(phase: str, path: Path, tmp: str) -> None:
    """Fault-injection boundary (see :data:`FAULT_ENV`); a no-op unless the variable is set."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec.startswith("checkpoint-write:"):
        return
    _write_steps[0] += 1
    try:
        target = int(spec.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"{FAULT_ENV} must look like checkpoint-write:N, got {spec!r}") from None
    if _write_steps[0] != target:
        return
    if phase == "torn" and os.path.exists(tmp):
        os.truncate(tmp, os.path.getsize(tmp) // 2)
    print(f"{FAULT_ENV}: killed at write step {target} ({phase} {path.name})", flush=True)
    os._exit(137)


def temp_files(folder: str | os.PathLike,
               targets: Mapping[str, str] | None = None) -> list[Path]:
    """Temporary files left in ``folder`` by :func:`atomic_write_bytes` calls that were killed.

    Without ``targets``, every name of the form ``.<target>.<8 random characters>.tmp``.
    With ``targets`` (``{file name: the temp_suffix its writes use}``, e.g.
    ``{"metrics.json": ".tmp", "case1.nii.gz": ".nii.gz"}``), only the temporary files of
    those names: ``.<name>.<8 random characters><temp_suffix>``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if targets is None:
        return sorted(p for p in folder.iterdir()
                      if p.is_file() and _temp_target(p.name, TEMP_SUFFIX))
    suffixes = set(targets.values())
    return sorted(p for p in folder.iterdir() if p.is_file() and any(
        targets.get(_temp_target(p.name, s)) == s for s in suffixes))


def _temp_target(name: str, temp_suffix: str) -> str | None:
    """The target of a temporary file named ``.<target>.<8 random characters><temp_suffix>``
    (as :func:`atomic_write_bytes` names them), or None for any other name."""
    if not (name.startswith(".") and name.endswith(temp_suffix)):
        return None
    core = name[1:len(name) - len(temp_suffix)]
    target, dot, random = core[:-9], core[-9:-8], core[-8:]
    return target if target and dot == "." and _TEMP_RANDOM.fullmatch(random) else None


def atomic_write_bytes(path: str | os.PathLike, write, temp_suffix: str = TEMP_SUFFIX) -> Path:
    """Call ``write(tmp_path)`` then move the file into place (same folder, ``os.replace``).

    A crash at any instant leaves either the old file or the new one, never a torn file
    (a killed write leaves a ``.<name>.XXXXXXXX.tmp`` file, see :func:`temp_files`).
    ``temp_suffix``: the temporary file's suffix, e.g. ``".nii.gz"`` for writers that pick
    the format from the file name (such temporary files are not listed by ``temp_files``).

    Raises:
        CheckpointWriteError: the write failed (e.g. no space left on the device); the
            temporary file is removed and the previous ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=temp_suffix, dir=path.parent)
    os.close(fd)
    try:
        try:
            write(tmp)
            fault_point("torn", path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as exc:
            raise CheckpointWriteError(*_write_failure(path, exc)) from None
        except Exception as exc:  # safetensors reports disk-full as SafetensorError
            if type(exc).__name__ != "SafetensorError":
                raise
            raise CheckpointWriteError(*_write_failure(path, exc)) from None
        fault_point("written", path, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fault_point("replaced", path, tmp)
    return path


def _write_failure(path: Path, exc: BaseException) -> tuple[str, str]:
    """``(reason, advice)`` of a :class:`CheckpointWriteError`."""
    import errno
    import shutil

    text = str(exc)
    full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MB free"
    except OSError:
        free = "free space unknown"
    keep = (f"the previous {path.name} is unchanged" if path.exists()
            else f"no {path.name} was written")
    if full:
        return (f"cannot write {path}: no space left on the device ({free} in {path.parent}); "
                f"{keep}", "Free some space (or choose another --out), then run again "
                "(training runs: add --resume).")
    return f"cannot write {path}: {text}; {keep}", "Check the folder is writable, then run again."


def checkpoint_header(model: nn.Module, **metadata: Any) -> str:
    """The JSON text stored under ``napari_dmoe`` for ``model`` and ``metadata``."""
    name = getattr(model, "model_name", None)
    kwargs = getattr(model, "model_kwargs", None)
    if name is None or kwargs is None:
        raise ValueError(
            "save_checkpoint needs a model built by training.networks.create_model "
            "(it records model_name and model_kwargs so the file can rebuild it)"
        )
    header: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": {"name": name, "kwargs": kwargs},
        "spatial_dims": kwargs.get("spatial_dims"),
        "in_channels": kwargs.get("in_channels"),
    }
    header.update(metadata)
    prov = dict(header.get("provenance") or {})
    prov.setdefault("library_versions", _library_versions())
    prov.setdefault("date", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    header["provenance"] = prov
    try:
        return json.dumps(header, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {exc}") from None


def checkpoint_bytes(tensors: dict[str, torch.Tensor], header_text: str) -> bytes:
    """The bytes of a checkpoint file: ``tensors`` (plain CPU tensors) + the header text.

    Deterministic: the same tensors and text give the same bytes (and SHA-256).
    """
    from safetensors.torch import save

    return save(tensors, {METADATA_KEY: header_text})


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`atomic_write_bytes` for bytes already in memory."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write_bytes(path, write)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8",
                      newline: str | None = None) -> Path:
    """:func:`atomic_write_bytes` for text: the same bytes as ``open(path, "w",
    encoding=encoding, newline=newline).write(text)`` (``newline=""`` for CSV text that
    already holds its line endings), but an earlier ``path`` is replaced only once the new
    text is complete.

    Raises:
        CheckpointWriteError: as :func:`atomic_write_bytes` (``path`` unchanged, no
            temporary file left).
    """

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding=encoding, newline=newline) as f:
            f.write(text)

    return atomic_write_bytes(path, write)


def atomic_savefig(figure: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """``figure.savefig(path, **savefig_kwargs)`` through :func:`atomic_write_bytes`: the
    matplotlib figure is written to a temporary file beside ``path`` and renamed into place.

    The format comes from ``path``'s suffix (passed on as ``format=``, since the temporary
    name ends in ``.tmp``) unless ``savefig_kwargs`` names one.

    Raises:
        CheckpointWriteError: as :func:`atomic_write_bytes` (``path`` unchanged, no
            temporary file left).
    """
    path = Path(path)
    if "format" not in savefig_kwargs:
        if not path.suffix:
            raise ValueError(f"{path}: no suffix to choose the figure format from; "
                             "name it e.g. figure.png or pass format=")
        savefig_kwargs["format"] = path.suffix[1:].lower()
    return atomic_write_bytes(path, lambda tmp: figure.savefig(tmp, **savefig_kwargs))


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write ``model`` and JSON-serialisable ``metadata`` to one ``.safetensors`` file.

    The model must come from ``training.networks.create_model`` (it carries ``model_name``
    and ``model_kwargs``). Common metadata keys: ``class_names``, ``attribute``
    (``{"name", "vocabulary", "unknown_router"}``), ``preprocessing``, ``provenance``.
    The write is atomic (temporary file + rename); a failed write (disk full) raises
    :class:`CheckpointWriteError` and leaves the previous file in place.
    """
    text = checkpoint_header(model, **metadata)
    return write_bytes_atomic(path, checkpoint_bytes(plain_tensors(model), text))


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse and check a checkpoint's header without loading tensors.

    Returns:
        ``(metadata, tensor_index)``: our JSON metadata and the safetensors tensor table.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a valid napari-dmoe checkpoint (the message says why).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else -1
        looks_safetensors = 0 < n <= min(_MAX_HEADER, size - 8) and head[8:9] == b"{"
        if not looks_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):
            raise ValueError(
                f"{path} is a pickle-based PyTorch file (torch.save). napari-dmoe never "
                "unpickles files, since that can run arbitrary code; save the model with "
                "training.checkpoint.save_checkpoint (a .safetensors file)."
            )
        if len(head) < 9:
            raise ValueError(f"{path} is not a safetensors file: only {size} bytes long")
        if not looks_safetensors:
            raise ValueError(
                f"{path} is not a valid safetensors file (header length {n} does not fit in "
                f"{size} bytes, or no JSON header): truncated or another format"
            )
        f.seek(8)
        try:
            index = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} has a corrupt safetensors header: {exc}") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path} has a corrupt safetensors header (not a JSON object)")
    meta_raw = (index.pop("__metadata__", None) or {}).get(METADATA_KEY)
    if meta_raw is None:
        raise ValueError(
            f"{path} is a safetensors file but not a napari-dmoe checkpoint (no "
            f"'{METADATA_KEY}' metadata); it cannot say which network to build"
        )
    try:
        meta = json.loads(meta_raw)
        model_name, model_kwargs = meta["model"]["name"], meta["model"]["kwargs"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path}: napari-dmoe metadata is incomplete or corrupt ({exc!r})"
        ) from None
    if not isinstance(model_name, str) or not isinstance(model_kwargs, dict):
        raise ValueError(f"{path}: metadata 'model' must hold a name and a kwargs object")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {version!r}; this napari-dmoe reads "
            f"versions up to {FORMAT_VERSION}. Update napari-dmoe."
        )
    end = 0
    for name, info in index.items():
        try:
            lo, hi = info["data_offsets"]
            numel = 1
            for d in info["shape"]:
                numel *= d
            nbytes = numel * _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt entry for tensor '{name}' in the header") from None
        if hi - lo != nbytes or lo > hi:
            raise ValueError(f"{path}: tensor '{name}' has inconsistent byte offsets")
        end = max(end, hi)
    if 8 + n + end != size:
        raise ValueError(
            f"{path} is truncated or padded: the header promises {8 + n + end} bytes, the file "
            f"has {size}. Re-copy or re-save the checkpoint."
        )
    return meta, index


def check_metadata(path: str | os.PathLike, meta: dict[str, Any]) -> None:
    """Refuse metadata whose fields disagree with each other (naming the field).

    Checks ``class_names`` against ``model.kwargs.out_channels``, the attribute vocabulary
    against ``num_attributes`` (dMoE), and ``in_channels``/``spatial_dims`` (top level and
    in ``preprocessing``) against the network's arguments.

    Raises:
        ValueError: the first disagreement, naming the file and both fields.
    """
    kwargs = meta["model"]["kwargs"]
    fix = "the checkpoint file is inconsistent; re-save it with training.fit or use another file"

    def refuse(field: str, says: Any, other: str, other_says: Any) -> None:
        raise ValueError(f"{path}: metadata field '{field}' ({says!r}) disagrees with "
                         f"'{other}' ({other_says!r}); {fix}.")

    out_channels = kwargs.get("out_channels")
    names = meta.get("class_names")
    if names is not None:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"{path}: metadata field 'class_names' must be a list of names, "
                             f"got {names!r}; {fix}.")
        if out_channels is not None and len(names) != out_channels:
            refuse("class_names", names, "model.kwargs.out_channels", out_channels)
    attribute = meta.get("attribute") or {}
    vocabulary = attribute.get("vocabulary")
    if vocabulary is not None:
        if not isinstance(vocabulary, list) or not all(isinstance(v, str) for v in vocabulary):
            raise ValueError(f"{path}: metadata field 'attribute.vocabulary' must be a list of "
                             f"strings, got {vocabulary!r}; {fix}.")
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError(f"{path}: metadata field 'attribute.vocabulary' repeats a value "
                             f"({vocabulary!r}); {fix}.")
        if kwargs.get("moe") == "dmoe" and "num_attributes" in kwargs \
                and kwargs["num_attributes"] != max(len(vocabulary), 1):
            refuse("attribute.vocabulary", vocabulary, "model.kwargs.num_attributes",
                   kwargs["num_attributes"])
    pre = meta.get("preprocessing") or {}
    for key in ("in_channels", "spatial_dims"):
        want = kwargs.get(key)
        if want is None:
            continue
        if meta.get(key) is not None and meta[key] != want:
            refuse(key, meta[key], f"model.kwargs.{key}", want)
        if pre.get(key) is not None and pre[key] != want:
            refuse(f"preprocessing.{key}", pre[key], f"model.kwargs.{key}", want)


def expected_shapes(path: str | os.PathLike, meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """``state_dict`` shapes of the network the metadata describes, built on the ``meta``
    device (no memory is allocated for weights, whatever sizes the metadata claims).

    Raises:
        ValueError: the metadata does not describe a network this version can build.
    """
    from .networks import create_model

    try:
        with torch.device("meta"):
            model = create_model(meta["model"]["name"], **meta["model"]["kwargs"])
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as exc:
        raise ValueError(f"{path}: cannot rebuild the network from its metadata: {exc}") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_tensor_shapes(path: str | os.PathLike, meta: dict[str, Any],
                        index: dict[str, Any]) -> None:
    """Compare the tensor table of the header with :func:`expected_shapes`, before any
    network is allocated.

    Raises:
        ValueError: missing or unexpected tensor names, or a shape mismatch (the message
            names the first keys and both shapes).
    """
    expected = expected_shapes(path, meta)
    found = {k: tuple(v["shape"]) for k, v in index.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k}: file {found[k]} vs model {v}" for k, v in expected.items()
                   if k in found and found[k] != v)
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise ValueError(
            f"{path}: tensors do not match the '{meta['model']['name']}' network its metadata "
            f"describes; {'; '.join(parts)}. The metadata or the tensors were altered; use "
            "the original file."
        )


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model described by a checkpoint and load its weights.

    Everything is checked before memory is allocated: the header (:func:`read_header`),
    the metadata fields against each other (:func:`check_metadata`) and the tensor shapes
    against the architecture built on the ``meta`` device (:func:`check_tensor_shapes`).

    Returns:
        ``(model, metadata)`` with the model in eval mode on ``device``.

    Raises:
        ValueError: the file is not a valid napari-dmoe checkpoint, its metadata fields
            disagree, or its tensors do not match the network its metadata describes
            (missing/unexpected names, shapes).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .networks import create_model

    meta, index = read_header(path)
    check_metadata(path, meta)
    check_tensor_shapes(path, meta, index)
    try:
        model = create_model(meta["model"]["name"], **meta["model"]["kwargs"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: cannot rebuild the network from its metadata: {exc}") from None
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: cannot read tensors: {exc}") from None
    model.load_state_dict(tensors, strict=True)
    model.to(device).eval()
    return model, meta
