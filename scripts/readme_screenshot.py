"""Regenerate docs/screenshot.png: the widget at work on the fundus sample.

Run with a display, or headless: ``xvfb-run -a -s "-screen 0 1920x1080x24" python
scripts/readme_screenshot.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from napari_dmoe._compat import prepare_torch

prepare_torch()  # before any canvas exists (see napari_dmoe._compat)

import napari  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_dmoe.__main__ import add_layer_data  # noqa: E402
from napari_dmoe._sample_data import load_sample  # noqa: E402
from napari_dmoe._widget import DMoEWidget  # noqa: E402


def _wait(predicate, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            sys.exit("timed out waiting for the widget")
        QApplication.processEvents()
        time.sleep(0.05)


def main(out: str = "docs/screenshot.png", kind: str = "fundus") -> None:
    viewer = napari.Viewer()
    viewer.window._qt_window.resize(1500, 950)
    add_layer_data(viewer, load_sample(kind))
    widget = DMoEWidget(viewer)
    viewer.window.add_dock_widget(widget, name="dMoE segmentation", area="right")
    _wait(lambda: widget.loader is None and widget.worker is None)
    widget.routing_check.setChecked(True)
    widget.run()
    _wait(lambda: widget.worker is None)
    for layer in viewer.layers:  # show the first block's top-1 expert map only
        if "block" in layer.name:
            layer.visible = layer.name.endswith("top-1 expert") and "block0" in layer.name
    for _ in range(10):
        QApplication.processEvents()
        time.sleep(0.05)
    QApplication.processEvents()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(out, canvas_only=False)
    print(f"wrote {out}")
    viewer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
