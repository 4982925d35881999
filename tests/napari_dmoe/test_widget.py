"""The "dMoE segmentation" widget in a real viewer (Xvfb): runs, routing, compare, cancel,
bad inputs, settings; screenshots of each state go to /tmp/shots/."""

from __future__ import annotations

import time

import nibabel as nib
import numpy as np
import pytest

from napari_dmoe import _widget
from napari_dmoe.__main__ import add_layer_data
from napari_dmoe._models import bundled_models
from napari_dmoe._reader import META
from napari_dmoe._sample_data import load_sample
from napari_dmoe._settings import load_settings
from napari_dmoe._widget import DMoEWidget
from napari_dmoe._writer import write_labels_nifti

from .conftest import SHOTS, corner_extent

pytestmark = pytest.mark.gui
TIMEOUT = 60_000


@pytest.fixture
def errors(monkeypatch) -> list[str]:
    """Messages the widget sent to napari's notifications with show_error."""
    seen: list[str] = []
    original = _widget.show_error

    def record(message: str) -> None:
        seen.append(message)
        original(message)

    monkeypatch.setattr(_widget, "show_error", record)
    return seen


def wait_idle(qtbot, widget: DMoEWidget, timeout: int = TIMEOUT) -> None:
    qtbot.waitUntil(lambda: widget.loader is None and widget.worker is None, timeout=timeout)


@pytest.fixture
def open_widget(make_napari_viewer, qtbot, checkpoints):
    def factory(sample: str | None = "fundus", model: str | None = "fundus"):
        viewer = make_napari_viewer(show=True)
        viewer.window._qt_window.resize(1500, 950)
        if sample:
            add_layer_data(viewer, load_sample(sample))
        widget = DMoEWidget(viewer, model=checkpoints[model] if model else None)
        viewer.window.add_dock_widget(widget, name="dMoE segmentation", area="right")
        wait_idle(qtbot, widget)
        qtbot.wait(200)
        return viewer, widget

    return factory


def shot(viewer, qtbot, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    qtbot.wait(250)
    viewer.screenshot(str(SHOTS / name), canvas_only=False)


def run_and_wait(qtbot, widget: DMoEWidget, compare: bool = False) -> None:
    (widget.compare if compare else widget.run)()
    wait_idle(qtbot, widget)


def test_run_on_fundus_sample_adds_aligned_labels(open_widget, qtbot):
    viewer, widget = open_widget("fundus")
    assert widget.attribute_combo.currentText() == "Black"  # from the layer's metadata
    assert widget.attribute_label.text() == "Attribute (race)"
    image = widget.image_layer()
    shot(viewer, qtbot, "01_fundus_ready.png")
    run_and_wait(qtbot, widget)
    name = f"{image.name} · fundus_tiny · Black"
    assert name in viewer.layers
    labels = viewer.layers[name]
    assert type(labels).__name__ == "Labels"
    assert labels.data.shape == image.data.shape
    np.testing.assert_allclose(labels.scale, image.scale)
    np.testing.assert_allclose(labels.translate, image.translate)
    assert list(labels.features["class"]) == ["background", "rim", "cup"]
    assert labels.editable
    html = widget.results.toPlainText()
    assert "Against ground truth" in html and "Dice" in html and "rim" in html
    assert widget.status.text() == "Done."
    shot(viewer, qtbot, "02_fundus_result.png")


def test_routing_layers_cover_the_image_exactly(open_widget, qtbot, tmp_path):
    viewer, widget = open_widget("ct", model="ct")
    widget.routing_check.setChecked(True)
    image = widget.image_layer()
    run_and_wait(qtbot, widget)
    routing = [layer for layer in viewer.layers
               if layer.metadata.get(META, {}).get("role") == "routing"]
    assert len(routing) == 2 * 5  # resunet: one dMoE per encoder stage, expert + gate each
    assert [layer.visible for layer in routing] == [True] + [False] * 9
    for layer in routing:
        np.testing.assert_allclose(corner_extent(layer), corner_extent(image), atol=1e-6)
    experts = [layer for layer in routing if layer.name.startswith("E top-1 · ")]
    assert len(experts) == 5
    assert all(int(layer.data.min()) >= 1 for layer in experts)  # experts are E1..En
    assert all(layer.name.endswith(" · T3") for layer in routing)
    text = widget.results.toPlainText()
    assert "Expert usage" in text and "E1" in text and "label value n = expert En" in text
    shot(viewer, qtbot, "03_ct_routing.png")
    # the clinician saves the (editable) result: the NIfTI carries the source affine
    seg = viewer.layers[f"{image.name} · ct_tiny · T3"]
    data, attributes, _ = seg.as_layer_data_tuple()
    out, = write_labels_nifti(str(tmp_path / "seg.nii.gz"), data, attributes)
    source = nib.load(image.metadata[META]["source"])
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, source.affine)
    assert written.shape == source.shape
    np.testing.assert_array_equal(np.asarray(written.dataobj), data.transpose(2, 1, 0))


def test_routing_on_2d_rgb_sample(open_widget, qtbot):
    viewer, widget = open_widget("skin", model="skin")
    widget.routing_check.setChecked(True)
    image = widget.image_layer()
    run_and_wait(qtbot, widget)
    seg = [layer for layer in viewer.layers if layer.name.endswith("· 40-59")]
    assert seg and seg[0].data.shape == image.data.shape[:2]
    routing = [layer for layer in viewer.layers
               if layer.metadata.get(META, {}).get("role") == "routing"]
    assert routing
    for layer in routing:
        np.testing.assert_allclose(corner_extent(layer), corner_extent(image), atol=1e-6)
    shot(viewer, qtbot, "04_skin_routing.png")


def test_compare_attributes_gives_one_layer_per_value(open_widget, qtbot):
    viewer, widget = open_widget("fundus")
    image = widget.image_layer()
    run_and_wait(qtbot, widget, compare=True)
    for value in ("Asian", "Black", "White", "unknown"):
        assert f"{image.name} · fundus_tiny · {value}" in viewer.layers
    disagreement = viewer.layers[f"{image.name} · fundus_tiny · disagreement"]
    assert disagreement.data.shape == image.data.shape
    assert 0 <= disagreement.data.min() and disagreement.data.max() <= 3
    html = widget.results.toPlainText()
    for value in ("Asian", "Black ★", "White", "unknown", "majority", "truth"):
        assert value in html
    shot(viewer, qtbot, "05_fundus_compare.png")


def test_cancel_stops_a_3d_run_early(open_widget, qtbot, errors):
    viewer, widget = open_widget(None, model="ct")
    volume = np.random.default_rng(0).normal(0, 50, (64, 96, 128)).astype(np.float32)
    viewer.add_image(volume, name="big ct", scale=(2.5, 0.9, 0.9))
    widget.image_combo.setCurrentText("big ct")
    n_layers = len(viewer.layers)
    widget.run()
    qtbot.waitUntil(lambda: widget.progress_bar.value() >= 1, timeout=TIMEOUT)
    total = widget.progress_bar.maximum()
    shot(viewer, qtbot, "06_ct_running.png")
    start = time.perf_counter()
    widget.cancel_button.click()
    wait_idle(qtbot, widget, timeout=5000)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"cancel took {elapsed:.1f} s"
    assert widget.progress_bar.value() < total
    assert len(viewer.layers) == n_layers  # no half result
    assert widget.status.text().startswith("Cancelled")
    assert not errors
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()


def test_bad_inputs_notify_and_leave_the_viewer_working(open_widget, qtbot, errors,
                                                        checkpoints):
    viewer, widget = open_widget(None, model="fundus")
    n_errors = 0

    def expect(fragment: str) -> None:
        nonlocal n_errors
        assert len(errors) == n_errors + 1, errors
        assert fragment in errors[-1], errors[-1]
        assert fragment in widget.status.text()
        n_errors += 1

    viewer.add_image(np.random.rand(40, 64, 64).astype(np.float32), name="volume")
    widget.image_combo.setCurrentText("volume")
    assert "Ready: the 2D model segments this stack slice by slice" in widget.status.text()
    run_and_wait(qtbot, widget)  # a 2D model on a stack: slice by slice, in place
    stack = viewer.layers["volume · fundus_tiny · unknown"]
    assert stack.data.shape == (40, 64, 64) and not errors
    viewer.add_image(np.random.rand(2, 40, 64, 64).astype(np.float32), name="4d")
    widget.image_combo.setCurrentText("4d")
    assert "This model segments 2D images; '4d' has 4 spatial" in widget.status.text()
    assert "4D model" not in widget.status.text()
    assert not widget.run_button.isEnabled()  # said before running
    widget._start(["unknown"], compare=False)
    expect("This model segments 2D images")
    shot(viewer, qtbot, "07_bad_volume.png")

    nan = np.random.rand(64, 64).astype(np.float32)
    nan[3, 5] = np.nan
    viewer.add_image(nan, name="with nan")
    widget.image_combo.setCurrentText("with nan")
    widget._start(["unknown"], compare=False)
    expect("NaN")

    viewer.add_image(np.ones((1, 1), np.float32), name="one pixel")
    widget.image_combo.setCurrentText("one pixel")
    widget._start(["unknown"], compare=False)
    expect("too small")

    widget.load_model(checkpoints["bad"])
    wait_idle(qtbot, widget)
    expect("Cannot load the model")
    assert widget.model_combo.currentText() == "fundus_tiny"  # the previous model stays
    shot(viewer, qtbot, "08_bad_checkpoint.png")

    # the viewer and the widget still work
    viewer.add_image(np.random.rand(80, 72).astype(np.float32), name="good")
    widget.image_combo.setCurrentText("good")
    run_and_wait(qtbot, widget)
    assert "good · fundus_tiny · unknown" in viewer.layers
    assert len(errors) == n_errors


def test_open_checkpoint_dialog_and_settings_are_remembered(open_widget, qtbot, checkpoints,
                                                            monkeypatch):
    viewer, widget = open_widget(None, model="fundus")
    assert widget.model_combo.itemText(widget.model_combo.count() - 1) == "Open checkpoint…"
    monkeypatch.setattr(_widget.QFileDialog, "getOpenFileName",
                        staticmethod(lambda *a, **k: (str(checkpoints["skin"]), "")))
    widget.model_combo.activated.emit(widget.model_combo.count() - 1)  # "Open checkpoint…"
    wait_idle(qtbot, widget)
    assert widget.model_combo.currentText() == "skin_tiny"
    assert widget.attribute_label.text() == "Attribute (age_group)"
    assert [widget.attribute_combo.itemText(i) for i in range(widget.attribute_combo.count())] \
        == ["20-39", "40-59", "60-79", "<20", ">=80", "unknown"]
    widget.routing_check.setChecked(True)
    saved = load_settings()
    assert saved["model"] == str(checkpoints["skin"])
    assert saved["show_routing"] is True
    assert str(checkpoints["skin"]) in saved["recent_checkpoints"]
    again = DMoEWidget(viewer)  # a new launch: last model, options and device come back
    wait_idle(qtbot, again)
    assert again.routing_check.isChecked()
    assert again.model_combo.currentText() == "skin_tiny"
    assert again.device_combo.currentText() == "auto"
    assert set(again.device_combo.itemText(i) for i in range(again.device_combo.count())) \
        >= {"auto", "cpu"}
    again.deleteLater()


@pytest.mark.skipif(not bundled_models(), reason="no demo checkpoints in "
                    "src/napari_dmoe/models/ yet (the lead trains them); this test checks "
                    "Dice > 0.8 of each bundled model on its sample")
@pytest.mark.parametrize("kind", ["fundus", "skin", "ct"])
def test_demo_models_segment_their_samples(make_napari_viewer, qtbot, kind):
    from napari_dmoe._models import suggest_model
    from napari_dmoe._tasks import scores_vs_truth

    entry = suggest_model(bundled_models(), kind)
    assert entry is not None, f"no bundled model for {kind}"
    viewer = make_napari_viewer()
    add_layer_data(viewer, load_sample(kind))
    widget = DMoEWidget(viewer)
    wait_idle(qtbot, widget)
    assert widget.model_entry == entry  # picked from the sample's kind
    run_and_wait(qtbot, widget)
    image = widget.image_layer()
    truth = viewer.layers[f"{image.name} ground truth"]
    pred = [layer for layer in viewer.layers if layer.name.startswith(f"{image.name} · ")][0]
    dice = scores_vs_truth(pred.data, truth.data, len(widget.segmenter.class_names))["dice"]
    assert dice.mean() > 0.8, dice
