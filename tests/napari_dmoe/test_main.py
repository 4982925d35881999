"""``python -m napari_dmoe`` / ``napari-dmoe``: arguments and the docked start-up state."""

from __future__ import annotations

import subprocess
import sys

import pytest

from napari_dmoe.__main__ import launch, main

from .conftest import SHOTS


def test_help_and_bad_paths(tmp_path, capsys):
    out = subprocess.run([sys.executable, "-m", "napari_dmoe", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--sample" in out.stdout and "--image" in out.stdout
    assert main(["--image", str(tmp_path / "missing.nii.gz")]) == 2
    assert main(["--model", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such" in capsys.readouterr().out


@pytest.mark.gui
def test_launch_opens_the_sample_with_the_widget_docked(make_napari_viewer, qtbot,
                                                        checkpoints):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    widget = launch(viewer, sample="fundus", model=checkpoints["fundus"])
    qtbot.waitUntil(lambda: widget.loader is None, timeout=60_000)
    assert [type(layer).__name__ for layer in viewer.layers] == ["Image", "Labels"]
    assert "dMoE segmentation" in viewer.window.dock_widgets
    assert widget.image_combo.currentText() == viewer.layers[0].name
    assert widget.attribute_combo.currentText() == "Black"
    assert widget.status.text() == "Ready."
    qtbot.wait(300)
    SHOTS.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(SHOTS / "00_launch.png"), canvas_only=False)


@pytest.mark.gui
def test_launch_with_an_image_file_and_no_sample(make_napari_viewer, qtbot, tmp_path):
    import numpy as np
    import tifffile

    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((3, 16, 16), np.uint8), photometric="minisblack")
    viewer = make_napari_viewer()
    widget = launch(viewer, sample="none", images=[path])
    qtbot.waitUntil(lambda: widget.loader is None, timeout=60_000)
    assert [layer.name for layer in viewer.layers] == ["stack"]
    assert widget.image_layer() is viewer.layers["stack"]


SMOKE = r"""
import sys, time
import napari
from qtpy.QtWidgets import QApplication
from napari_dmoe.__main__ import launch

viewer = napari.Viewer(show=True)  # an OpenGL canvas exists before torch is imported
widget = launch(viewer, sample="fundus", model=sys.argv[1])
app = QApplication.instance()

def wait(cond, timeout=240):
    end = time.time() + timeout
    while not cond():
        app.processEvents()
        time.sleep(0.02)
        if time.time() > end:
            raise SystemExit("timeout")

wait(lambda: widget.loader is None)
assert widget.segmenter is not None, widget.status.text()
widget.run()
wait(lambda: widget.worker is None)
print("LAYERS", [layer.name for layer in viewer.layers])
viewer.close()
"""


@pytest.mark.gui
def test_fresh_process_loads_torch_after_the_canvas(tmp_path, checkpoints):
    """The real start-up order: napari's canvas first, then the model (imports torch).

    Without ``_compat.prepare_torch`` this segfaults under Mesa's software OpenGL.
    """
    import os

    env = {**os.environ, "NAPARI_DMOE_CONFIG_DIR": str(tmp_path)}
    env.pop("QT_QPA_PLATFORM", None)
    out = subprocess.run([sys.executable, "-c", SMOKE, str(checkpoints["fundus"])], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fundus_0008 · fundus_tiny · Black" in out.stdout
