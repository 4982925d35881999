"""Cancel and close under stress (real viewer, Xvfb): the widget never stays busy, and
closing napari during a run exits 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from napari_dmoe._reader import META

from .test_widget import TIMEOUT, open_widget, wait_idle  # noqa: F401 (fixture)

pytestmark = pytest.mark.gui


def assert_idle(widget) -> None:
    assert widget.worker is None and widget.loader is None
    assert widget.run_button.isEnabled() and widget.compare_button.isEnabled()
    assert widget.model_combo.isEnabled() and widget.device_combo.isEnabled()
    assert not widget.cancel_button.isEnabled()
    assert not widget.progress_bar.isVisible()
    assert widget.status.text() not in ("Cancelling…", "Segmenting…")


def cancel_trials(viewer, widget, qtbot, n: int, seed: int) -> dict[str, int]:
    """Run or Compare, cancel after a random 0–800 ms, wait until idle; ``n`` times."""
    rng = np.random.default_rng(seed)
    keep = set(viewer.layers)
    counts = {"trials": 0, "cancelled": 0, "finished first": 0, "partial compare": 0}
    phases: dict[str, int] = {}
    for i in range(n):
        compare = bool(i % 2)
        delay = int(rng.integers(0, 801))
        (widget.compare if compare else widget.run)()
        qtbot.wait(delay)
        busy = widget.worker is not None
        phase = widget.status.text() if busy else "done"
        key = re.sub(r" · window \d+/\d+", " · window k", phase)
        phases[key] = phases.get(key, 0) + 1
        widget.cancel_button.click() if busy else None
        start = time.perf_counter()
        wait_idle(qtbot, widget, timeout=10_000)
        assert time.perf_counter() - start < 5.0
        assert_idle(widget)
        text = widget.status.text()
        counts["trials"] += 1
        counts["cancelled" if text.startswith("Cancelled") else "finished first"] += 1
        if compare and "kept the values" in text:
            counts["partial compare"] += 1
            values = [layer for layer in viewer.layers if layer not in keep
                      and layer.metadata.get(META, {}).get("role") == "segmentation"]
            assert 1 <= len(values) < 4
        for layer in [layer for layer in viewer.layers if layer not in keep]:
            viewer.layers.remove(layer)
    print("phase at cancel:", phases)
    return counts


def ct_widget(factory):
    """The tiny 3D model on a 48×64×64 volume: a Run is ~20 windows, a Compare 5 runs."""
    viewer, widget = factory(None, model="ct")
    volume = np.random.default_rng(0).normal(0, 50, (48, 64, 64)).astype(np.float32)
    viewer.add_image(volume, name="ct", scale=(2.5, 0.9, 0.9))
    widget.image_combo.setCurrentText("ct")
    return viewer, widget


def test_run_and_compare_cancelled_at_random_delays_never_stay_busy(open_widget, qtbot):  # noqa: F811 (fixture)
    viewer, widget = ct_widget(open_widget)
    counts = cancel_trials(viewer, widget, qtbot, n=24, seed=0)
    print("cancel trials:", counts)
    assert counts["trials"] == 24 and counts["cancelled"] >= 8


def test_cancelled_compare_keeps_the_values_already_finished(open_widget, qtbot):  # noqa: F811 (fixture)
    viewer, widget = ct_widget(open_widget)
    image = widget.image_layer()
    widget.compare()
    qtbot.waitUntil(lambda: "(2/5)" in widget.status.text(), timeout=TIMEOUT)
    widget.cancel_button.click()
    wait_idle(qtbot, widget, timeout=10_000)
    assert_idle(widget)
    assert widget.status.text() == "Cancelled: kept the values that finished."
    kept = [layer.name for layer in viewer.layers
            if layer.metadata.get(META, {}).get("role") == "segmentation"]
    assert kept == [f"{image.name} · ct_tiny · T1"]
    assert "Cancelled: showing the 1 value(s) that finished" in widget.results.toPlainText()


@pytest.mark.slow
def test_cancel_stress_long(open_widget, qtbot):  # noqa: F811 (fixture)
    viewer, widget = ct_widget(open_widget)
    counts = cancel_trials(viewer, widget, qtbot, n=120, seed=1)
    print("cancel trials:", counts)
    assert counts["trials"] == 120


CLOSE_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import napari
    import numpy as np
    from qtpy.QtCore import QTimer

    from napari_dmoe.__main__ import launch

    viewer = napari.Viewer(title="close during a run")
    widget = launch(viewer, sample="none", model=Path(sys.argv[1]))
    viewer.add_image(np.random.default_rng(0).normal(0, 50, (64, 96, 128)).astype("float32"),
                     name="big ct", scale=(2.5, 0.9, 0.9))
    state = {"started": False}

    def tick():
        if not state["started"]:
            if widget.loader is None and widget.segmenter is not None:
                widget.image_combo.setCurrentText("big ct")
                widget.run()
                state["started"] = True
        elif widget.progress_bar.value() >= 1:
            print("closing during the run", widget.progress_bar.value(),
                  widget.progress_bar.maximum(), flush=True)
            viewer.close()
            return
        QTimer.singleShot(20, tick)

    QTimer.singleShot(20, tick)
    napari.run()
    print("event loop left; worker:", widget.worker, flush=True)
""")


@pytest.mark.parametrize("trial", [0, pytest.param(1, marks=pytest.mark.slow),
                                   pytest.param(2, marks=pytest.mark.slow)])
def test_closing_napari_during_a_run_exits_0(tmp_path, checkpoints, trial):
    script = tmp_path / "close_during_run.py"
    script.write_text(CLOSE_SCRIPT)
    env = {**os.environ, "NAPARI_DMOE_CONFIG_DIR": str(tmp_path / "config")}
    env.pop("QT_QPA_PLATFORM", None)
    proc = subprocess.run([sys.executable, str(script), str(checkpoints["ct"])], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "closing during the run" in proc.stdout
    assert "event loop left; worker: None" in proc.stdout
    assert "terminate called" not in proc.stderr
