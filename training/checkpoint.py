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
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import struct
import tempfile
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


def _plain_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
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


def atomic_write_bytes(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp_path)`` then move the file into place (same folder, ``os.replace``).

    A crash at any instant leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write ``model`` and JSON-serialisable ``metadata`` to one ``.safetensors`` file.

    The model must come from ``training.networks.create_model`` (it carries ``model_name``
    and ``model_kwargs``). Common metadata keys: ``class_names``, ``attribute``
    (``{"name", "vocabulary", "unknown_router"}``), ``preprocessing``, ``provenance``.
    The write is atomic (temporary file + rename).
    """
    from safetensors.torch import save_file

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
        text = json.dumps(header, sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {exc}") from None
    tensors = _plain_tensors(model)
    return atomic_write_bytes(path, lambda tmp: save_file(tensors, tmp, {METADATA_KEY: text}))


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


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model described by a checkpoint and load its weights.

    Returns:
        ``(model, metadata)`` with the model in eval mode on ``device``.

    Raises:
        ValueError: the file is not a valid napari-dmoe checkpoint, or its tensors do not
            match the network its metadata describes (missing/unexpected names, shapes).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .networks import create_model

    meta, _ = read_header(path)
    try:
        model = create_model(meta["model"]["name"], **meta["model"]["kwargs"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: cannot rebuild the network from its metadata: {exc}") from None
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: cannot read tensors: {exc}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    )
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise ValueError(
            f"{path}: tensors do not match the '{meta['model']['name']}' network its metadata "
            f"describes; {'; '.join(parts)}"
        )
    model.load_state_dict(tensors, strict=True)
    model.to(device).eval()
    return model, meta
