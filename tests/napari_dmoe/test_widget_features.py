"""Widget features in a real viewer (Xvfb): ground-truth chooser and live Dice, readable
routing layers, Compare switch maps (MoE vs dMoE), region, probability, Save…, Batch…."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image as PILImage
from qtpy.QtWidgets import QApplication, QDialog, QLabel

from napari_dmoe import _actions, _batch
from napari_dmoe.__main__ import add_layer_data
from napari_dmoe._reader import META
from napari_dmoe._sample_data import load_sample
from napari_dmoe._widget import DMoEWidget

from .test_widget import TIMEOUT, errors, open_widget, run_and_wait, shot, wait_idle  # noqa: F401

pytestmark = pytest.mark.gui


def role(layer) -> str | None:
    return (layer.metadata.get(META) or {}).get("role")


def combo_items(combo) -> list[str]:
    return [combo.itemText(i) for i in range(combo.count())]


def test_truth_chooser_live_dice_region_probability_and_save(make_napari_viewer, qtbot,
                                                             checkpoints, tmp_path,
                                                             monkeypatch):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    add_layer_data(viewer, load_sample("fundus"))
    image = viewer.layers[0]
    widget = DMoEWidget(viewer, model=checkpoints["fundus"])
    assert widget.model_combo.currentText() == "Loading…"  # not "Open checkpoint…"
    viewer.window.add_dock_widget(widget, name="dMoE segmentation", area="right")
    wait_idle(qtbot, widget)
    truth = viewer.layers[f"{image.name} ground truth"]
    shape = image.data.shape
    # candidates: same shape AND placement, never the plugin's outputs, never by name
    viewer.add_labels(np.zeros((10, 10), np.uint8), name=f"{image.name} ground truth small")
    viewer.add_labels(np.zeros(shape, np.uint8), name="shifted truth", translate=(5, 0))
    viewer.add_labels(np.zeros(shape, np.uint8), name="scaled", scale=(2, 2))
    mine = viewer.add_labels(np.zeros(shape, np.uint8), name="my labels")
    widget.image_combo.setCurrentText(image.name)
    assert combo_items(widget.truth_combo) == ["None", truth.name, "my labels"]
    assert widget.truth_combo.currentText() == truth.name  # paired by the sample
    # remembered per image
    widget.truth_combo.setCurrentText("my labels")
    widget.truth_combo.activated.emit(widget.truth_combo.currentIndex())
    other = viewer.add_image(np.random.rand(*shape).astype(np.float32), name="other image")
    widget.image_combo.setCurrentText(other.name)
    assert widget.truth_combo.currentText() == "None"  # nothing paired with it
    assert combo_items(widget.truth_combo) == ["None", truth.name, "my labels"]
    widget.image_combo.setCurrentText(image.name)
    assert widget.truth_combo.currentText() == "my labels"
    widget.truth_combo.setCurrentText(truth.name)
    widget.truth_combo.activated.emit(widget.truth_combo.currentIndex())
    viewer.layers.remove(mine)

    widget.probability_combo.setCurrentText("Entropy")
    run_and_wait(qtbot, widget)
    pred = viewer.layers[f"{image.name} · fundus_tiny · Black"]
    assert truth.contour == 2 and pred.contour == 0  # truth outlined, prediction filled
    assert not np.allclose(truth.colormap.map(1), pred.colormap.map(1))
    prob = [layer for layer in viewer.layers if role(layer) == "probability"]
    assert len(prob) == 1 and prob[0].data.shape == shape
    assert 0.0 <= prob[0].data.min() and prob[0].data.max() <= 1.0
    text = widget.results.toPlainText()
    assert "Against ground truth" in text
    before = text[text.index("Against ground truth"):][:200]
    # editing the prediction updates the scores (debounced)
    pred.data = np.asarray(truth.data).copy()
    qtbot.waitUntil(lambda: widget.results.toPlainText() != text, timeout=5000)
    after = widget.results.toPlainText()
    assert "1.000" in after and before != after[after.index("Against ground truth"):][:200]
    shot(viewer, qtbot, "features_truth_contours.png")

    # a Shapes rectangle limits the run; the result lands in place
    viewer.add_shapes([[[40, 50], [40, 130], [120, 130], [120, 50]]], shape_type="rectangle",
                      name="region")
    widget.image_combo.setCurrentText(image.name)
    widget.region_combo.setCurrentText("region")
    assert widget.region() == (40, 121, 50, 131)  # pixels whose extent the rectangle touches
    widget.probability_combo.setCurrentText("No probability layer")
    widget.attribute_combo.setCurrentText("White")
    run_and_wait(qtbot, widget)
    limited = viewer.layers[f"{image.name} · fundus_tiny · White"]
    assert limited.data.shape == shape
    outside = np.ones(shape, bool)
    outside[40:121, 50:131] = False
    assert not limited.data[outside].any()

    # Save…: the plugin's writers, DICOM only for DICOM images, no silent overwrite
    assert list(_actions.save_formats(limited)) == ["NIfTI (*.nii.gz)", "TIFF (*.tif)"]
    fake_dicom = type("L", (), {"metadata": {META: {"dicom_source": "/x"}}})()
    assert "DICOM-SEG (*.dcm)" in _actions.save_formats(fake_dicom)
    (tmp_path / "seg.dcm").write_bytes(b"an earlier DICOM-SEG")  # never replaced, not asked
    with pytest.raises(ValueError, match="DICOM-SEG and RTSTRUCT files are never replaced"):
        _actions.save_labels(fake_dicom, tmp_path / "seg.dcm", "DICOM-SEG (*.dcm)",
                             lambda p: pytest.fail("asked"))
    assert (tmp_path / "seg.dcm").read_bytes() == b"an earlier DICOM-SEG"
    asked = []
    written = _actions.save_labels(limited, tmp_path / "mask", "NIfTI (*.nii.gz)",
                                   lambda p: asked.append(p) or False)
    assert written == [str(tmp_path / "mask.nii.gz")] and not asked
    stamp = (tmp_path / "mask.nii.gz").stat().st_mtime_ns
    assert _actions.save_labels(limited, tmp_path / "mask.nii.gz", "NIfTI (*.nii.gz)",
                                lambda p: asked.append(p) or False) == []
    assert asked == [tmp_path / "mask.nii.gz"]
    assert (tmp_path / "mask.nii.gz").stat().st_mtime_ns == stamp
    tif, = _actions.save_labels(limited, tmp_path / "mask.tif", "TIFF (*.tif)", lambda p: True)
    assert tif.endswith("mask.tif")
    source = tmp_path / "scan.nii.gz"  # as if the image had been read from this file
    source.write_bytes(b"the user's scan")
    limited.metadata = {**limited.metadata, META: {**limited.metadata[META],
                                                   "source": str(source)}}
    with pytest.raises(ValueError, match="outputs never replace inputs"):
        _actions.save_labels(limited, source, "NIfTI (*.nii.gz)", lambda p: True)
    assert source.read_bytes() == b"the user's scan"


def tiny_checkpoint(path, moe: str, **metadata):
    import torch

    from training.checkpoint import save_checkpoint
    from training.data import Preprocessing
    from training.networks import create_model

    torch.manual_seed(0)
    model = create_model("transunet", preset="tiny", in_channels=1, out_channels=3, moe=moe,
                         num_attributes=3, img_size=64, depth=2)
    with torch.no_grad():  # routers start at zero (ties): give each one its own weights
        for name, param in model.named_parameters():
            if name.endswith("w_gate"):
                param.normal_(0.0, 1.0)
    race = {"name": "race", "vocabulary": ["Asian", "Black", "White"], "unknown_router": True}
    save_checkpoint(model, path, class_names=["background", "rim", "cup"], attribute=race,
                    preprocessing=Preprocessing(spatial_dims=2, image_size=(64, 64),
                                                in_channels=1).to_dict(), **metadata)
    return path


def fundus_viewer(make_napari_viewer, qtbot, checkpoint):
    """A shown 1500x950 viewer with the fundus sample and the plugin's dock on
    ``checkpoint``, model loaded: ``(viewer, widget)``."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    add_layer_data(viewer, load_sample("fundus"))
    widget = DMoEWidget(viewer, model=checkpoint)
    viewer.window.add_dock_widget(widget, name="dMoE segmentation", area="right")
    wait_idle(qtbot, widget)
    return viewer, widget


@pytest.mark.parametrize("moe", ["dmoe", "moe"])
def test_routing_names_and_compare_switch_maps(make_napari_viewer, qtbot, tmp_path, moe):
    ckpt = tiny_checkpoint(tmp_path / f"fundus_{moe}.safetensors", moe)
    viewer, widget = fundus_viewer(make_napari_viewer, qtbot, ckpt)
    widget.routing_check.setChecked(True)
    names = {}
    for value in ("Black", "White"):
        widget.attribute_combo.setCurrentText(value)
        run_and_wait(qtbot, widget)
        names[value] = [layer.name for layer in viewer.layers if role(layer) == "routing"
                        and layer.metadata[META]["attribute_value"] == value]
    assert names["Black"][0] == "E top-1 · block0 · Black"
    assert [n.replace("Black", "White") for n in names["Black"]] == names["White"]
    visible = [layer.name for layer in viewer.layers if role(layer) == "routing"
               and layer.visible]
    assert visible == ["E top-1 · block0 · White"]  # earlier runs hidden, first layer shown
    experts = viewer.layers["E top-1 · block0 · White"]
    label = int(experts.data.flat[0])
    assert list(experts.features["expert"])[label] == f"E{label}"  # hover = legend = table
    assert "E1" in widget.results.toPlainText()
    assert viewer.layers["gate · block0 · White"].colorbar.visible

    widget.attribute_combo.setCurrentText("Black")
    run_and_wait(qtbot, widget, compare=True)
    switches = [layer for layer in viewer.layers if role(layer) == "switch"]
    assert [layer.name for layer in switches][0] == "switch · block0 · vs Black"
    fractions = [x for layer in switches for x in layer.metadata[META]["fraction"].values()]
    text = widget.results.toPlainText()
    assert "Experts switched vs 'Black'" in text
    if moe == "moe":  # the attribute cannot matter: empty switch maps
        assert max(fractions) == 0.0
        assert all(not layer.data.any() for layer in switches)
    else:
        assert max(fractions) > 0.0
        assert any(layer.data.any() for layer in switches)
    shot(viewer, qtbot, f"features_switch_{moe}.png")


def scan_folder(folder, n: int):
    """``folder`` with ``n`` random grey 48x56 PNGs ``scan0.png``, …"""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        PILImage.fromarray((rng.random((48, 56)) * 255).astype(np.uint8)).save(
            folder / f"scan{i}.png")
    return folder


def test_batch_folder_and_open_images(open_widget, qtbot, tmp_path):  # noqa: F811
    viewer, widget = open_widget("fundus")
    source = scan_folder(tmp_path / "images", 3)
    with pytest.raises(ValueError, match="inside the input folder"):
        _batch.check_folders(source, source / "out")
    out = tmp_path / "out"
    _actions.start_batch_folder(widget, source, out)
    wait_idle(qtbot, widget)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["id"] for r in rows] == ["scan0", "scan1", "scan2"]
    assert all((out / r["file"]).is_file() for r in rows)
    assert np.asarray(PILImage.open(out / rows[0]["file"])).shape == (48, 56)
    assert "Wrote 3 label file(s)" in widget.status.text()

    viewer.add_image(np.random.default_rng(1).random((40, 44)).astype(np.float32), name="second")
    n = len(viewer.layers)
    _actions.start_batch_layers(widget)
    wait_idle(qtbot, widget)
    added = [layer for layer in list(viewer.layers)[n:] if role(layer) == "segmentation"]
    assert len(added) == 2 and added[1].data.shape == (40, 44)
    assert widget.run_button.isEnabled()


def test_batch_asks_before_replacing_an_earlier_runs_files(open_widget, qtbot,  # noqa: F811
                                                           tmp_path, monkeypatch):
    from qtpy.QtWidgets import QMessageBox

    viewer, widget = open_widget("fundus")
    source = scan_folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    out.mkdir()
    earlier = {"scan0.png": b"earlier mask", "predictions.csv": b"id,attribute_value,file\n",
               "notes.txt": b"mine"}
    for name, data in earlier.items():
        (out / name).write_bytes(data)
    asked, answer = [], {"button": QMessageBox.StandardButton.No}

    def ask(box):
        no = box.button(QMessageBox.StandardButton.No)
        assert box.defaultButton() is no and box.escapeButton() is no
        asked.append(box.text())
        return answer["button"]

    monkeypatch.setattr(QMessageBox, "exec", ask)
    _actions.start_batch_folder(widget, source, out)  # No: nothing starts, nothing changes
    assert widget.worker is None
    assert len(asked) == 1 and asked[0].startswith(
        f"Replace 2 file(s) from an earlier run in {out}?")
    assert "predictions.csv, scan0.png" in asked[0]
    assert widget.status.text().startswith(f"Nothing was written: {out} keeps")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    answer["button"] = QMessageBox.StandardButton.Yes
    _actions.start_batch_folder(widget, source, out)
    wait_idle(qtbot, widget)
    assert len(asked) == 2
    assert "Wrote 2 label file(s)" in widget.status.text()
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["file"] for r in rows] == ["scan0.png", "scan1.png"]
    assert np.asarray(PILImage.open(out / "scan0.png")).shape == (48, 56)
    assert (out / "notes.txt").read_bytes() == b"mine"


def test_the_replace_question_lists_every_file_under_details(qtbot, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QMessageBox, QWidget

    parent = QWidget()
    qtbot.addWidget(parent)
    existing = [tmp_path / f"case{i}.png" for i in range(7)]
    seen = {}

    def ask(box):
        seen.update(text=box.text(), details=box.detailedText())
        return QMessageBox.StandardButton.No

    monkeypatch.setattr(QMessageBox, "exec", ask)
    assert not _actions.confirm_replace(parent, tmp_path, existing)
    assert "case0.png, case1.png, case2.png, case3.png, case4.png and 2 more" in seen["text"]
    assert "cannot be recovered" in seen["text"]
    assert seen["details"].splitlines() == [p.name for p in existing]


def test_dataset_routing_figure_in_a_dialog(open_widget, qtbot, tmp_path):  # noqa: F811
    from training.data import make_synthetic_dataset

    data = make_synthetic_dataset("fundus", tmp_path / "data", n=9, seed=2)
    viewer, widget = open_widget("fundus")
    out = tmp_path / "routing"
    _actions.start_dataset_routing(widget, data, out, split="all")
    wait_idle(qtbot, widget)
    assert (out / "routing.json").is_file() and (out / "routing.png").is_file()
    dialog = widget.routing_figure
    assert dialog.isVisible() and str(out / "routing.png") in dialog.windowTitle()
    assert "attribute-blind" not in " ".join(label.text() for label in
                                             dialog.findChildren(QLabel))
    qtbot.wait(300)
    dialog.grab().save(str(tmp_path / "dialog.png"))
    dialog.close()


def test_dataset_routing_without_moe_layers_says_so_at_once(make_napari_viewer, qtbot,
                                                            tmp_path, monkeypatch):
    """No MoE layer: said at once in the status line, before a manifest is asked for or
    anything runs (no worker, no file, no folder)."""
    from qtpy.QtWidgets import QFileDialog

    from training.data import make_synthetic_dataset

    data = make_synthetic_dataset("fundus", tmp_path / "data", n=9, seed=2)
    ckpt = tiny_checkpoint(tmp_path / "fundus_none.safetensors", "none")
    viewer, widget = fundus_viewer(make_napari_viewer, qtbot, ckpt)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: 1 / 0)
    message = ("fundus_none has no dMoE/MoE layers, so there is no expert routing to show; "
               "nothing was run.")
    widget.dataset_button.click()  # no manifest is asked for
    assert widget.worker is None and widget.status.text() == message
    widget.status.clear()
    out = tmp_path / "routing"
    _actions.start_dataset_routing(widget, data, out, split="all")
    assert widget.worker is None and widget.status.text() == message
    assert not out.exists() and getattr(widget, "routing_figure", None) is None
    shot(viewer, qtbot, "routing_no_moe.png")


def test_dataset_routing_of_an_attribute_blind_moe_says_one_router(make_napari_viewer, qtbot,
                                                                   tmp_path):
    from training.data import make_synthetic_dataset

    data = make_synthetic_dataset("fundus", tmp_path / "data", n=9, seed=2)
    ckpt = tiny_checkpoint(tmp_path / "fundus_moe.safetensors", "moe")
    viewer, widget = fundus_viewer(make_napari_viewer, qtbot, ckpt)
    out = tmp_path / "routing"
    _actions.start_dataset_routing(widget, data, out, split="all")
    wait_idle(qtbot, widget)
    qtbot.wait(200)
    shown = [w for w in QApplication.topLevelWidgets() if isinstance(w, QDialog)
             and w.isVisible() and str(out) in w.windowTitle()]
    assert widget.status.text() == f"Wrote {out / 'routing.json'} and routing.png"
    assert shown == [widget.routing_figure]
    caption = " ".join(label.text() for label in shown[0].findChildren(QLabel))
    assert ("fundus_moe is an attribute-blind MoE: one router for every group, so "
            "swapping race changes no expert") in caption
    assert "temporary" not in caption  # a folder the caller chose
    shown[0].close()
    assert (out / "routing.png").is_file()  # never removed: not a folder the widget made


def test_a_figure_that_cannot_be_read_opens_no_empty_dialog(qtbot, tmp_path):
    with pytest.raises(ValueError, match="routing.png is missing or not an image"):
        _actions.show_figure(None, tmp_path / "routing.png")
    assert not [w for w in QApplication.topLevelWidgets() if isinstance(w, QDialog)
                and w.isVisible() and str(tmp_path) in w.windowTitle()]


def test_batch_dataset_cancel_says_how_many_cases_were_written(open_widget, qtbot,  # noqa: F811
                                                              tmp_path, monkeypatch):
    import time

    from training.data import make_synthetic_dataset
    from training.inference import Segmenter

    data = make_synthetic_dataset("ct", tmp_path / "ct", n=12, seed=0).parent
    viewer, widget = open_widget(None, model="ct")
    loads = []
    real = Segmenter.from_checkpoint.__func__
    monkeypatch.setattr(Segmenter, "from_checkpoint", classmethod(
        lambda cls, path, device="auto": loads.append(path) or real(cls, path, device)))
    out = tmp_path / "out"
    _actions.start_batch_folder(widget, data, out)
    qtbot.waitUntil(lambda: widget.progress_bar.value() >= 2, timeout=TIMEOUT)
    during = widget.status.text()
    start = time.perf_counter()
    widget.cancel_button.click()
    wait_idle(qtbot, widget, timeout=5000)
    idle = time.perf_counter() - start
    print(f"Batch… Cancel -> idle in {idle:.2f} s; status while running: {during!r}")
    assert idle < 2.0
    assert "case" in during and "window" not in during
    assert loads == []  # the widget's loaded model was used
    assert widget.batch_button.isEnabled() and widget.model_combo.isEnabled()
    assert not widget.cancel_button.isEnabled() and not widget.progress_bar.isVisible()
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert 2 <= len(rows) < 12
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(r["file"] for r in rows), "predictions.csv"])
    text = widget.status.text()
    assert text.startswith(f"Cancelled: {len(rows)} of 12 case(s) written to {out}")
    assert "Wrote" not in text and "Done" not in text
    assert f"Written ({len(rows)} of 12): {rows[0]['file']}" in widget.results.toPlainText()
    shot(viewer, qtbot, "batch_cancelled.png")
