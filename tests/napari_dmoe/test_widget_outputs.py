"""The widget's output folders in a real viewer (Xvfb): Batch… into a folder another run is
writing is refused in the status line; Dataset routing… asks before using data other than
the model's training data, and removes the temporary folder it wrote into (never a folder
the user chose)."""

from __future__ import annotations

import json
import os
import socket

import pytest
from qtpy.QtWidgets import QFileDialog, QLabel, QMessageBox

from napari_dmoe import _actions, _batch

from .test_widget import open_widget, shot, wait_idle  # noqa: F401
from .test_widget_features import fundus_viewer, scan_folder, tiny_checkpoint

pytestmark = pytest.mark.gui
LOCK = ".napari-dmoe.lock"


def _lock(folder, pid: int) -> dict:
    holder = {"pid": pid, "host": socket.gethostname(), "started": "2026-01-01T09:30:00+00:00",
              "command": "training.predict", "token": "t"}
    folder.mkdir(exist_ok=True)
    (folder / LOCK).write_text(json.dumps(holder))
    return holder


def _refusal(out) -> str:
    return (f"Nothing was written: {out} is in use by another run (training.predict, process "
            f"{os.getppid()} on {socket.gethostname()}, started 2026-01-01T09:30:00+00:00). "
            "Wait for it to finish, or choose another output folder. If no such run exists, "
            f"delete {out / LOCK}.")


@pytest.fixture
def no_question(monkeypatch):
    monkeypatch.setattr(QMessageBox, "exec", lambda box: pytest.fail(f"asked: {box.text()}"))


# -- Batch… ------------------------------------------------------------------------------
def test_batch_into_a_folder_another_run_is_writing_is_refused_at_once(
        open_widget, qtbot, tmp_path, no_question):  # noqa: F811
    viewer, widget = open_widget("fundus")
    source = scan_folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    holder = _lock(out, os.getppid())  # alive, on this host, not this process
    (out / "scan0.png").write_bytes(b"earlier mask")  # no replace question is asked first
    _actions.start_batch_folder(widget, source, out)
    assert widget.worker is None
    assert widget.status.text() == _refusal(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([LOCK, "scan0.png"])
    assert json.loads((out / LOCK).read_text()) == holder
    shot(viewer, qtbot, "batch_folder_in_use.png")


def test_batch_whose_folder_is_locked_after_the_check_shows_the_refusal(
        open_widget, qtbot, tmp_path, monkeypatch):  # noqa: F811
    """The lock training.predict takes is what decides: a run that finds the folder held
    (another run started after the widget's check) ends with the refusal in the status line,
    not a traceback, and writes nothing."""
    viewer, widget = open_widget("fundus")
    source = scan_folder(tmp_path / "images", 2)
    out = tmp_path / "out"
    monkeypatch.setattr(_batch, "refuse_folder_in_use", lambda out: _lock(out, os.getppid()))
    _actions.start_batch_folder(widget, source, out)
    wait_idle(qtbot, widget)
    assert widget.status.text() == _refusal(out)
    assert sorted(p.name for p in out.iterdir()) == [LOCK]
    assert widget.batch_button.isEnabled()


# -- Dataset routing… --------------------------------------------------------------------
@pytest.fixture
def made(monkeypatch) -> list:
    """The folders the widgets' ``temporary_folders`` make, in order."""
    folders = []
    real = _batch.TemporaryFolders.make

    def make(self, purpose):
        folders.append(real(self, purpose))
        return folders[-1]

    monkeypatch.setattr(_batch.TemporaryFolders, "make", make)
    return folders


@pytest.fixture
def changed_data(make_napari_viewer, qtbot, tmp_path):
    """``changed_data() -> (viewer, widget, manifest)``: a viewer with a dMoE model whose
    checkpoint records other data's manifest hash, and a 9-case fundus manifest (a
    factory: a fixture value holding the viewer would outlive napari's leak check)."""
    from training.data import make_synthetic_dataset

    def factory():
        data = make_synthetic_dataset("fundus", tmp_path / "data", n=9, seed=2)
        ckpt = tiny_checkpoint(tmp_path / "fundus_dmoe.safetensors", "dmoe", provenance={
            "data_manifest_hash": "0" * 16, "data_cases": 400,
            "config": {"seed": 0, "val_fraction": 0.1, "test_fraction": 0.1}})
        viewer, widget = fundus_viewer(make_napari_viewer, qtbot, ckpt)
        return viewer, widget, data

    return factory


def test_dataset_routing_asks_before_using_changed_data(changed_data, qtbot, tmp_path,
                                                        monkeypatch):
    viewer, widget, data = changed_data()
    asked, answer = [], {"button": QMessageBox.StandardButton.No}

    def ask(box):
        no = box.button(QMessageBox.StandardButton.No)
        assert box.defaultButton() is no and box.escapeButton() is no
        asked.append((box.windowTitle(), box.text()))
        return answer["button"]

    monkeypatch.setattr(QMessageBox, "exec", ask)
    out = tmp_path / "routing"
    _actions.start_dataset_routing(widget, data, out)
    assert widget.worker is None and not out.exists()
    title, text = asked[0]
    assert title == "Use changed data?"
    assert text.startswith(f"{data}: these data are not the data "
                           f"{tmp_path / 'fundus_dmoe.safetensors'} was trained on")
    assert ("The 'test' split is drawn again from these data, so it may hold cases "
            "fundus_dmoe was trained on") in text
    assert widget.status.text() == (f"Nothing was run: {data} does not hold the data "
                                    "fundus_dmoe was trained on. Choose its training data, "
                                    "or answer Yes to use these anyway.")
    answer["button"] = QMessageBox.StandardButton.Yes
    _actions.start_dataset_routing(widget, data, out)
    wait_idle(qtbot, widget)
    assert len(asked) == 2
    assert widget.status.text() == f"Wrote {out / 'routing.json'} and routing.png"
    widget.routing_figure.close()


def test_escape_on_the_changed_data_question_runs_nothing(changed_data, qtbot, made):
    from qtpy.QtCore import Qt, QTimer

    viewer, widget, data = changed_data()
    seen = {}

    def press_escape():
        box = next(w for w in widget.findChildren(QMessageBox) if w.isVisible())
        seen["text"] = box.text()
        qtbot.keyClick(box, Qt.Key.Key_Escape)

    QTimer.singleShot(300, press_escape)
    out = widget.temporary_folders.make("routing")
    _actions.start_dataset_routing(widget, data, out)
    assert "may hold cases fundus_dmoe was trained on" in seen["text"]
    assert widget.worker is None and widget.status.text().startswith("Nothing was run:")
    assert made == [out] and not out.exists()  # the unused temporary folder is gone


def test_dataset_routing_removes_its_temporary_folder_when_the_figure_closes(
        open_widget, qtbot, tmp_path, monkeypatch, made):  # noqa: F811
    from training.data import make_synthetic_dataset

    data = make_synthetic_dataset("fundus", tmp_path / "data", n=9, seed=2)
    viewer, widget = open_widget("fundus")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(data), ""))
    widget.dataset_button.click()
    wait_idle(qtbot, widget)
    dialog = widget.routing_figure
    assert len(made) == 1 and str(made[0]) in dialog.windowTitle()
    assert (made[0] / "routing.png").is_file()
    caption = " ".join(label.text() for label in dialog.findChildren(QLabel))
    assert "A temporary folder: it is removed when this window closes." in caption
    dialog.close()
    qtbot.waitUntil(lambda: not made[0].exists(), timeout=2000)

    widget.dataset_button.click()  # the figure is still open when the widget closes
    wait_idle(qtbot, widget)
    assert len(made) == 2 and (made[1] / "routing.png").is_file()
    widget.shutdown()
    assert not made[1].exists()


def test_dataset_routing_removes_its_temporary_folder_when_there_is_no_figure(
        open_widget, qtbot, tmp_path, monkeypatch, made):  # noqa: F811
    """Cancelled or failed (here: a manifest listing a missing image): no figure, so the
    temporary folder goes at once; a folder the caller chose stays."""
    data = tmp_path / "manifest.csv"
    data.write_text("image,label,split,id,race\nmissing.png,,test,a,Black\n")
    viewer, widget = open_widget("fundus")
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(data), ""))
    widget.dataset_button.click()
    wait_idle(qtbot, widget)
    assert "missing.png" in widget.status.text()
    assert len(made) == 1 and not made[0].exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    _actions.start_dataset_routing(widget, data, mine, split="test")
    wait_idle(qtbot, widget)
    assert mine.is_dir()
