"""Model discovery and loading: bundled demo checkpoints plus any opened ``.safetensors``.

Bundled models live in ``napari_dmoe/models/*.safetensors`` (demo models trained on
synthetic data). Loading goes through ``training.inference.Segmenter`` (imported lazily:
torch is heavy) and is cached per (file, modification time, device), so switching back
and forth between models is instant after the first load.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._compat import prepare_torch

MODELS_DIR = Path(__file__).parent / "models"
_CACHE: dict[tuple[str, float, str], Any] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelEntry:
    """A model the widget can offer: display name, checkpoint path, bundled or not."""

    name: str
    path: Path
    bundled: bool = False


def bundled_models(folder: Path | None = None) -> list[ModelEntry]:
    """The demo checkpoints shipped with the plugin, sorted by name."""
    folder = MODELS_DIR if folder is None else Path(folder)
    out = []
    for path in sorted(folder.glob("*.safetensors")):
        name = path.stem if "demo" in path.stem.lower() else f"{path.stem} (demo)"
        out.append(ModelEntry(name, path, bundled=True))
    return out


def model_choices(recent: list[str] | None = None, folder: Path | None = None
                  ) -> list[ModelEntry]:
    """Bundled models, then recently opened checkpoints that still exist."""
    entries = bundled_models(folder)
    known = {e.path.resolve() for e in entries}
    for item in recent or []:
        path = Path(item)
        if path.is_file() and path.resolve() not in known:
            known.add(path.resolve())
            entries.append(ModelEntry(path.stem, path))
    return entries


def suggest_model(entries: list[ModelEntry], kind: str | None) -> ModelEntry | None:
    """A bundled model whose file name starts with the image's kind (fundus, skin, ct)."""
    if not kind:
        return None
    for entry in entries:
        if entry.bundled and entry.path.stem.lower().startswith(kind.lower()):
            return entry
    return None


def load_segmenter(path: str | Path, device: str = "auto") -> Any:
    """A ``training.inference.Segmenter`` for ``path`` on ``device`` (cached).

    Raises:
        ValueError: the file is missing or not a valid napari-dmoe checkpoint (the message
            is meant for the user).
    """
    prepare_torch()
    from training.inference import Segmenter

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"No checkpoint at {path}; pick another model or open a "
                         ".safetensors checkpoint.")
    key = (str(path.resolve()), path.stat().st_mtime, device)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    try:
        segmenter = Segmenter.from_checkpoint(path, device=device)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path.name} is not a usable napari-dmoe checkpoint ({exc!r}).") \
            from None
    with _LOCK:
        _CACHE[key] = segmenter
    return segmenter


def available_devices() -> list[str]:
    """Devices usable here (``"auto"`` first), from ``training.inference``."""
    prepare_torch()
    from training.inference import available_devices as _devices

    return list(_devices())
