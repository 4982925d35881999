"""Session-wide test settings."""

from __future__ import annotations

import os


def pytest_configure(config):
    # pytest-xvfb starts a virtual X server; Qt must then use it (xcb), not "offscreen",
    # which has no OpenGL for napari's canvas (see shared/ENVIRONMENT.md).
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen" and config.pluginmanager.has_plugin(
        "xvfb"
    ):
        del os.environ["QT_QPA_PLATFORM"]
