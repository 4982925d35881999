"""Settings remembered from one napari launch to the next (a small JSON file).

Stored in ``platformdirs.user_config_dir("napari-dmoe")/settings.json``; the environment
variable ``NAPARI_DMOE_CONFIG_DIR`` moves it (tests use a temporary folder). A missing or
corrupt file gives the defaults; writes are atomic.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    "model": None,  # path of the last model used
    "device": "auto",
    "show_routing": False,
    "recent_checkpoints": [],  # paths opened with "Open checkpoint…", newest first
    "last_dir": None,  # folder of the last opened checkpoint
}
MAX_RECENT = 8


def settings_path() -> Path:
    """Where the settings live."""
    override = os.environ.get("NAPARI_DMOE_CONFIG_DIR")
    if override:
        return Path(override) / "settings.json"
    from platformdirs import user_config_dir

    return Path(user_config_dir("napari-dmoe")) / "settings.json"


def load_settings() -> dict[str, Any]:
    """The saved settings merged over ``DEFAULTS`` (unknown keys are dropped)."""
    out = json.loads(json.dumps(DEFAULTS))
    try:
        saved = json.loads(settings_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return out
    if isinstance(saved, dict):
        for key, default in DEFAULTS.items():
            value = saved.get(key, default)
            if default is None or isinstance(value, type(default)):
                out[key] = value
    return out


def save_settings(settings: dict[str, Any]) -> Path | None:
    """Write the known keys of ``settings``; returns the path, or None if it failed."""
    path = settings_path()
    data = {k: settings.get(k, v) for k, v in DEFAULTS.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".settings.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except OSError:
        return None
    return path


def remember_checkpoint(settings: dict[str, Any], path: str | Path) -> None:
    """Put ``path`` first in the recent checkpoints and remember its folder."""
    path = str(Path(path))
    recent = [p for p in settings.get("recent_checkpoints", []) if p != path]
    settings["recent_checkpoints"] = [path, *recent][:MAX_RECENT]
    settings["last_dir"] = str(Path(path).parent)
