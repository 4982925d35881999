"""The "dMoE segmentation" dock widget: Qt wiring only; the work lives in ``_tasks``.

Pick an image layer, a model (bundled demo checkpoints or "Open checkpoint…"), the
patient's attribute value, a ground truth (or none) and a device; Run segments in a
background worker with a progress bar and a Cancel button; "Compare attributes" segments
under every attribute value and shows where the value switches the experts. Results become
layers aligned with the image, and tables in the results area. Save…, Batch… and
Dataset routing… live in ``_actions``. Errors are napari notifications; the viewer never
blocks.

Every job ends in the worker's ``finished`` signal (a cancel is a normal return with the
values already finished), and closing the viewer during a job cancels it and waits for the
worker thread before the window goes.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Qt, QTimer
from qtpy.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from . import _actions, _batch, _tables, _tasks, _view
from ._models import ModelEntry, available_devices, load_segmenter, model_choices, suggest_model
from ._reader import META
from ._settings import load_settings, remember_checkpoint, save_settings
from ._truth_panel import WHOLE_IMAGE, ShutdownMixin, TruthMixin

log = logging.getLogger(__name__)
OPEN_CHECKPOINT = "Open checkpoint…"
LOADING = "Loading…"
PROBABILITY = {"No probability layer": None, "Max probability": "max", "Entropy": "entropy"}
_ADJUST = QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon


class DMoEWidget(TruthMixin, ShutdownMixin, QWidget):
    """Segment the selected image with a dMoE checkpoint (see module docstring)."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None, *,
                 model: str | Path | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.settings = load_settings()
        self.segmenter: Any = None
        self.model_entry: ModelEntry | None = None
        self.worker: Any = None
        self.loader: Any = None
        self._cancel = threading.Event()
        self._pbar: progress | None = None
        self._job: dict[str, Any] = {}
        self._entries: list[ModelEntry] = []
        self._load_failed = False
        self._loading: Path | None = None
        self._closing = False
        self._filtered: QObject | None = None
        self._truth_choice: dict[str, str] = {}  # image name -> truth layer name ("" = none)
        self._sections: dict[str, str] = {}
        self._scored: dict[str, Any] = {}
        self.temporary_folders = _batch.TemporaryFolders()  # Dataset routing…'s outputs
        self._rescore_timer = QTimer(self)
        self._rescore_timer.setSingleShot(True)
        self._rescore_timer.setInterval(300)
        self._rescore_timer.timeout.connect(self.rescore)
        self._build()
        self._refresh_layers()
        self._refresh_models()
        for event in ("inserted", "removed", "moved", "changed"):
            getattr(self.viewer.layers.events, event).connect(self._refresh_layers)
        self.viewer.layers.events.inserted.connect(self._watch_name)
        self.viewer.layers.selection.events.active.connect(self._follow_active)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._refresh_layers)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)
        self._initial_model(model)

    # -- layout ---------------------------------------------------------------------------
    def _build(self) -> None:
        self.image_combo = QComboBox()
        self.model_combo = QComboBox()
        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)
        self.model_info.setStyleSheet("color: gray; font-size: 11px")
        self.attribute_label = QLabel("Attribute")
        self.attribute_combo = QComboBox()
        self.truth_combo = QComboBox()
        self.region_combo = QComboBox()
        self.probability_combo = QComboBox()
        self.probability_combo.addItems(list(PROBABILITY))
        self.device_combo = QComboBox()
        self.device_combo.addItem(self.settings.get("device") or "auto")
        self.routing_check = QCheckBox("Show routing heatmaps")
        self.routing_check.setChecked(bool(self.settings.get("show_routing")))
        self.attribute_combo.setToolTip(
            "The patient's value of the attribute the model routes on; 'unknown' uses the "
            "model's unknown-attribute path. Pre-selected from the image's metadata.")
        self.truth_combo.setToolTip(
            "A Labels layer with the image's shape and placement to score against (Dice, "
            "IoU, updated when either layer is edited); remembered per image")
        self.region_combo.setToolTip(
            "2D: limit the run to the last rectangle of a Shapes layer; the result is "
            "pasted in place into a full-size mask")
        self.probability_combo.setToolTip(
            "Also add the model's confidence: the maximum softmax probability, or the "
            "entropy (0 = certain, 1 = uniform)")
        self.device_combo.setToolTip("auto: the GPU when there is one, else the CPU")
        self.routing_check.setToolTip(
            "Add, for every dMoE layer, the top-1 expert per patch (labels, E1…En) and its "
            "gate weight (image, 0–1), placed over the image, and a table of expert usage")
        for combo in (self.image_combo, self.model_combo, self.attribute_combo,
                      self.truth_combo, self.region_combo, self.probability_combo,
                      self.device_combo):
            combo.setSizeAdjustPolicy(_ADJUST)
            combo.setMinimumContentsLength(12)
            combo.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.addRow("Image", self.image_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("", self.model_info)
        form.addRow(self.attribute_label, self.attribute_combo)
        form.addRow("Ground truth", self.truth_combo)
        form.addRow("Region", self.region_combo)
        form.addRow("Confidence", self.probability_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("", self.routing_check)

        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.compare_button = QPushButton("Compare attributes")
        self.compare_button.setToolTip("Segment the image under every attribute value, show "
                                       "where the contours disagree and where the value "
                                       "switches the experts")
        self.cancel_button.setEnabled(False)
        buttons = QHBoxLayout()
        for button in (self.run_button, self.cancel_button, self.compare_button):
            buttons.addWidget(button)
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Save the selected Labels layer with the plugin's "
                                    "writers (NIfTI, TIFF; DICOM-SEG/RTSTRUCT for DICOM images)")
        self.batch_button = QPushButton("Batch…")
        self.batch_button.setToolTip("Segment a folder of images (or every open image) into "
                                     "an output folder with predictions.csv")
        self.dataset_button = QPushButton("Dataset routing…")
        self.dataset_button.setToolTip("Which experts serve which group across a dataset "
                                       "(python -m training.routing), shown as a figure")
        more = QHBoxLayout()
        for button in (self.save_button, self.batch_button, self.dataset_button):
            more.addWidget(button)
        self.progress_bar = QProgressBar()
        self.progress_bar.setVisible(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.results = QTextBrowser()
        self.results.setMinimumHeight(180)
        self.results.setOpenLinks(False)
        self.results.setPlaceholderText(
            "Run segments the image as the chosen attribute value; Compare attributes "
            "segments it under every value. Dice/IoU against the chosen ground truth, areas "
            "or volumes, expert legend and usage appear here.")

        layout = QVBoxLayout(self)
        self.setMinimumWidth(360)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addLayout(more)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        layout.addWidget(QLabel("Results"))
        layout.addWidget(self.results, stretch=1)

        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.model_combo.activated.connect(self._on_model_activated)
        self.attribute_combo.currentIndexChanged.connect(lambda _: self._update_fit())
        self.truth_combo.activated.connect(self._on_truth_chosen)
        self.region_combo.activated.connect(lambda _: self._update_fit())
        self.device_combo.activated.connect(self._on_device_activated)
        self.routing_check.toggled.connect(self._on_routing_toggled)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.compare_button.clicked.connect(self.compare)
        self.save_button.clicked.connect(lambda: _actions.save_dialog(self))
        self.batch_button.clicked.connect(lambda: _actions.batch_dialog(self))
        self.dataset_button.clicked.connect(lambda: _actions.dataset_routing_dialog(self))

    # -- layers ---------------------------------------------------------------------------
    def _follow_active(self, event: Any) -> None:
        layer = event.value
        if layer is not None and self.image_combo.findText(layer.name) >= 0:
            self.image_combo.setCurrentText(layer.name)

    def _watch_name(self, event: Any) -> None:
        event.value.events.name.connect(self._refresh_layers)

    def _refresh_layers(self, *_: Any) -> None:
        current = self.image_combo.currentText()
        names = [layer.name for layer in self.viewer.layers
                 if type(layer).__name__ == "Image" and not self._is_derived(layer)]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        active = self.viewer.layers.selection.active
        if current in names:
            self.image_combo.setCurrentText(current)
        elif active is not None and active.name in names:
            self.image_combo.setCurrentText(active.name)
        self.image_combo.blockSignals(False)
        if self.image_combo.currentText() != current:
            self._on_image_changed()
        else:
            self._refresh_truth()
            self._refresh_regions()

    @staticmethod
    def _is_derived(layer: Any) -> bool:
        return _view.role_of(layer) in _view.DERIVED_ROLES

    def image_layer(self) -> Any:
        """The selected Image layer, or None."""
        name = self.image_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _on_image_changed(self, *_: Any) -> None:
        self._refresh_truth()
        self._refresh_regions()
        layer = self.image_layer()
        if layer is not None and self.loader is None and self.worker is None and (
                self.segmenter is None or self.fit_problem() is not None):
            # a sample (or a layer tagged with its kind) and a bundled model made for it
            kind = ((layer.metadata or {}).get(META) or {}).get("kind")
            suggestion = suggest_model(self._entries, kind)
            if suggestion is not None and suggestion != self.model_entry:
                self.load_model(suggestion.path)
                return
        self._preselect_attribute()
        self._update_fit()

    # -- models ---------------------------------------------------------------------------
    def _refresh_models(self) -> None:
        self._entries = model_choices(self.settings.get("recent_checkpoints"))
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for entry in self._entries:
            self.model_combo.addItem(entry.name, str(entry.path))
            self.model_combo.setItemData(self.model_combo.count() - 1, str(entry.path),
                                         Qt.ItemDataRole.ToolTipRole)
        self.model_combo.addItem(OPEN_CHECKPOINT, None)
        self._select_entry(self.model_entry)
        self.model_combo.blockSignals(False)

    def _select_entry(self, entry: ModelEntry | None) -> None:
        index = self.model_combo.count() - 1
        if entry is not None:
            found = self.model_combo.findData(str(entry.path))
            index = found if found >= 0 else index
        self.model_combo.setCurrentIndex(index)

    def _initial_model(self, model: str | Path | None = None) -> None:
        layer = self.image_layer()
        kind = ((layer.metadata or {}).get(META) or {}).get("kind") if layer else None
        entry = ModelEntry(Path(model).stem, Path(model)) if model else None
        entry = entry or suggest_model(self._entries, kind)
        saved = self.settings.get("model")
        if entry is None and saved and Path(saved).is_file():
            entry = ModelEntry(Path(saved).stem, Path(saved))
        if entry is None and self._entries:
            entry = self._entries[0]
        if entry is not None:
            self.load_model(entry.path)
        else:
            self.model_info.setText("No bundled model found: open a .safetensors checkpoint.")
            self._update_fit()

    def _on_model_activated(self, index: int) -> None:
        path = self.model_combo.itemData(index)
        if path is None:
            start = self.settings.get("last_dir") or str(Path.home())
            path, _ = QFileDialog.getOpenFileName(
                self, "Open dMoE checkpoint", start,
                "napari-dmoe checkpoints (*.safetensors);;All files (*)")
            if not path:
                self._select_entry(self.model_entry)
                return
        self.load_model(path)

    def load_model(self, path: str | Path) -> None:
        """Load a checkpoint in the background; the attribute list follows when done."""
        if self.loader is not None or self.worker is not None:
            show_info("Wait for the current job to finish before switching models.")
            self._select_entry(self.model_entry)
            return
        path = Path(path)
        device = self.device_combo.currentText() or "auto"
        first = "" if "torch" in sys.modules else " (the first load also starts PyTorch)"
        self._set_busy(True, f"Loading {path.name}{first}…")
        if self.model_entry is None:  # nothing loaded yet: say so in the Model box
            self.model_combo.blockSignals(True)
            self.model_combo.insertItem(0, LOADING, "")
            self.model_combo.setCurrentIndex(0)
            self.model_combo.blockSignals(False)
        self._load_failed = False
        self._loading = path
        self.loader = create_worker(
            _load_model, path, device,
            _connect={"returned": self._on_model_loaded, "errored": self._on_model_error,
                      "finished": self._on_loader_finished})

    def _on_model_loaded(self, out: tuple[Any, list[str], Path]) -> None:
        segmenter, devices, path = out
        entry = next((e for e in self._entries if e.path == path), None)
        if entry is None:
            remember_checkpoint(self.settings, path)
            self._entries = model_choices(self.settings.get("recent_checkpoints"))
            entry = next((e for e in self._entries if e.path == path),
                         ModelEntry(path.stem, path))
        self.segmenter, self.model_entry = segmenter, entry
        self.settings["model"] = str(path)
        save_settings(self.settings)
        self._refresh_models()
        self._set_devices(devices)
        demo = " Demo model trained on synthetic data." if entry.bundled else ""
        self.model_info.setText(f"{segmenter.description}.{demo}")
        described = (segmenter.metadata.get("description") or "").strip()
        self.model_info.setToolTip(f"{described}\n{path}" if described else str(path))
        self._fill_attributes()

    def _on_model_error(self, exc: Exception) -> None:
        text = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        path = self._loading
        if path is not None:  # name the file once
            text = text.replace(f"{path}: ", "").replace(str(path), path.name)
            text = f"{path.name}: {text}" if path.name not in text else text
        if not isinstance(exc, ValueError):
            log.error("loading the model failed", exc_info=exc)
        self._refresh_models()
        self._report_error(f"Cannot load the model: {text}")
        self._load_failed = True

    def _on_loader_finished(self) -> None:
        self.loader = None
        if self.model_combo.findText(LOADING) >= 0:
            self._refresh_models()
        self._set_busy(False)
        if not self._load_failed:  # keep the error message visible
            self._update_fit()

    def _set_devices(self, devices: list[str]) -> None:
        wanted = self.device_combo.currentText() or self.settings.get("device") or "auto"
        self.device_combo.clear()
        self.device_combo.addItems(devices)
        self.device_combo.setCurrentText(wanted if wanted in devices else "auto")

    def _on_device_activated(self, _: int) -> None:
        self.settings["device"] = self.device_combo.currentText()
        save_settings(self.settings)
        if self.model_entry is not None:
            self.load_model(self.model_entry.path)

    def _on_routing_toggled(self, checked: bool) -> None:
        self.settings["show_routing"] = bool(checked)
        save_settings(self.settings)

    # -- attribute ------------------------------------------------------------------------
    def _fill_attributes(self) -> None:
        seg = self.segmenter
        vocabulary = list(seg.vocabulary) if seg is not None else []
        name = seg.attribute_name if seg is not None else None
        self.attribute_label.setText(f"Attribute ({name})" if name else "Attribute")
        self.attribute_combo.blockSignals(True)
        self.attribute_combo.clear()
        self.attribute_combo.addItems([*vocabulary, _tasks.UNKNOWN])
        self.attribute_combo.blockSignals(False)
        self._preselect_attribute()

    def _preselect_attribute(self) -> None:
        seg, layer = self.segmenter, self.image_layer()
        if seg is None:
            return
        value = _tasks.preselect_value(layer.metadata if layer else None,
                                       seg.attribute_name, seg.vocabulary)
        self.attribute_combo.setCurrentText(value)

    # -- fit check ------------------------------------------------------------------------
    def slice_mode(self) -> bool:
        """A 2D model on a 3D stack: segmented slice by slice."""
        layer, seg = self.image_layer(), self.segmenter
        if layer is None or seg is None:
            return False
        spatial = _tasks.layer_spatial_ndim(np.ndim(layer.data), layer.rgb)
        return seg.spatial_dims == 2 and spatial == 3

    def fit_problem(self) -> str | None:
        """Why the selected image cannot go through the selected model (None if it can)."""
        layer, seg = self.image_layer(), self.segmenter
        if layer is None:
            return "Open or add an image layer first."
        if seg is None:
            return "Choose a model (or Open checkpoint…) first."
        if getattr(layer, "multiscale", False):
            return "Multiscale images are not supported; open the full-resolution image."
        spatial = _tasks.layer_spatial_ndim(np.ndim(layer.data), layer.rgb)
        shape = tuple(np.shape(layer.data))
        if spatial != seg.spatial_dims and not self.slice_mode():
            return (f"This model segments {seg.spatial_dims}D images; '{layer.name}' has "
                    f"{spatial} spatial dimension(s) {shape}. Choose a model for "
                    f"{spatial}D images" + (" or a single 2D slice." if spatial > 2 else "."))
        array, channel_axis = _tasks.model_input(layer.data, rgb=layer.rgb)
        if self.slice_mode():
            array = np.asarray(array)[:, :, 0]
        try:
            seg.check_image(array, channel_axis=channel_axis)
        except ValueError as exc:
            return str(exc)
        if self.region_combo.currentText() != WHOLE_IMAGE:
            if spatial != 2:
                return "A Shapes rectangle limits 2D runs only; choose 'Whole image'."
            try:
                self.region()
            except ValueError as exc:
                return str(exc)
        return None

    def _update_fit(self) -> None:
        if self.worker is not None or self.loader is not None:
            return
        problem = self.fit_problem()
        ready = "Ready." if not self.slice_mode() else (
            f"Ready: the 2D model segments this stack slice by slice "
            f"({np.shape(self.image_layer().data)[0]} slices).")
        self._set_status(problem or ready, "#d08770" if problem else "gray")
        for button in (self.run_button, self.compare_button):
            button.setEnabled(problem is None)

    # -- running --------------------------------------------------------------------------
    def run(self) -> None:
        """Segment the selected image under the selected attribute value."""
        self._start([self.attribute_combo.currentText() or _tasks.UNKNOWN], compare=False)

    def compare(self) -> None:
        """Segment the selected image under every attribute value (plus unknown)."""
        if self.segmenter is None:
            self._report_error("Choose a model (or Open checkpoint…) first.")
            return
        self._start([*self.segmenter.vocabulary, _tasks.UNKNOWN], compare=True)

    def _start(self, values: list[str], compare: bool) -> None:
        if self.worker is not None or self.loader is not None:
            return
        problem = self.fit_problem()
        if problem:
            self._report_error(problem)
            return
        layer, seg = self.image_layer(), self.segmenter
        array, channel_axis = _tasks.model_input(layer.data, rgb=layer.rgb)
        slices = self.slice_mode()
        kind = PROBABILITY[self.probability_combo.currentText()]
        options = _tasks.RunOptions(
            channel_axis=channel_axis, region=self.region(), slices=slices,
            return_routing=not slices and (compare or self.routing_check.isChecked()),
            return_probabilities=kind is not None and not compare,
            affine=None if slices else _tasks.voxel_affine(layer))
        self._job = {"layer": layer, "segmenter": seg, "entry": self.model_entry,
                     "compare": compare, "values": values, "probability": kind,
                     "slices": slices,
                     "truth": self.truth_layer(),
                     "patient": self.attribute_combo.currentText() or _tasks.UNKNOWN}
        self._cancel = threading.Event()
        self._pbar = progress(total=0, desc=f"dMoE: {layer.name}")
        self._set_busy(True, "Segmenting…" if not compare else
                       f"Comparing {len(values)} attribute values…", running=True)
        self.worker = create_worker(
            _tasks.segment_steps, seg, array, values, options=options, cancel=self._cancel,
            _connect={"yielded": self._on_progress, "returned": self._on_done,
                      "errored": self._on_error, "finished": self._on_finished})

    def cancel(self) -> None:
        """Stop the running segmentation at its next window (within about a second).

        The worker then returns normally with the values already finished, so its
        ``finished`` signal always comes.
        """
        self._cancel.set()
        if self.worker is not None:
            self._set_status("Cancelling…", "gray")

    def _on_progress(self, p: _tasks.Progress) -> None:
        if self.worker is None or self._closing:
            return
        total = max(p.total, 0) * p.runs
        done = (p.run - 1) * p.total + p.done
        self.progress_bar.setRange(0, total)
        self.progress_bar.setValue(done)
        unit = "slice" if self._job.get("slices") else self._job.get("unit", "window")
        steps = f" · {unit} {p.done}/{p.total}" if p.total > 1 else ""
        runs = f" ({p.run}/{p.runs})" if p.runs > 1 else ""
        if not self._cancel.is_set():
            self._set_status(f"Segmenting as '{p.value}'{runs}{steps}…", "gray")
        pbar = self._pbar  # last: napari's progress may process pending events here
        if pbar is not None:
            pbar.set_description(f"dMoE: {p.value}{runs}")
            if pbar.total != total:
                pbar.total = total
            pbar.update(done - pbar.n)

    def _on_done(self, out: _tasks.RunOutput) -> None:
        if self._closing:
            return
        job, results = self._job, out.results
        try:
            if not results:
                self._set_status("Cancelled: no layer was added.", "gray")
                return
            if job["compare"]:
                html = _view.add_compare_layers(
                    self.viewer, job["layer"], job["entry"].name, job["segmenter"], results,
                    truth=job["truth"], patient=job["patient"], cancelled=out.cancelled)
                self._sections = {"body": html}
                if job["truth"] is not None and job["truth"] in self.viewer.layers:
                    _view.style_truth(job["truth"], len(job["segmenter"].class_names))
            else:
                self._show_run(job, next(iter(results.values())))
            self._render()
            self._set_status("Cancelled: kept the values that finished." if out.cancelled
                             else "Done.", "#d08770" if out.cancelled else "#a3be8c")
        except Exception as exc:  # a bug in layer building must not freeze the UI
            log.error("showing the results failed", exc_info=exc)
            self._report_error(f"Could not show the results: {exc}")

    def _show_run(self, job: dict[str, Any], result: Any) -> None:
        image, seg = job["layer"], job["segmenter"]
        labels = _view.segmentation_layer(self.viewer, image, job["entry"].name, seg, result)
        names = list(seg.class_names)
        body = _view.measurements(image, np.asarray(labels.data), names,
                                  result.attribute_value)
        if result.routing:
            body += _view.add_routing_layers(self.viewer, image, labels, seg, result)
        if job["probability"] and result.probabilities is not None:
            _view.add_probability_layer(self.viewer, image, result, job["probability"])
        head = _tables.message(f"{labels.name}: {result.seconds:.1f} s")
        for notice in getattr(result, "notices", None) or []:
            head += _tables.message(notice)
        self._sections = {"head": head, "scores": "", "body": body}
        self._watch_scores(labels, job["truth"], names, image)
        self._score_now()

    def _on_error(self, exc: Exception) -> None:
        if self._closing:
            return
        if isinstance(exc, ValueError):
            self._report_error(str(exc))
        else:
            log.error("segmentation failed", exc_info=exc)
            self._report_error(f"Segmentation failed: {type(exc).__name__}: {exc}")

    def _on_job_returned(self, out: Any) -> None:
        """A Batch…/Dataset routing… job returned: its ``done`` callback shows the result."""
        done = self._job.pop("done", None)
        if done is None or self._closing:
            return
        try:
            done(out)
        except Exception as exc:  # a bug in layer building must not freeze the UI
            log.error("showing the results failed", exc_info=exc)
            self._report_error(f"Could not show the results: {exc}")

    def _on_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.worker = None
        finished = self._job.get("finished")
        self._job = {}  # no layers or callbacks kept alive after the job
        if finished is not None:
            finished()
        if not self._closing:
            self._set_busy(False)
            for button in (self.run_button, self.compare_button):
                button.setEnabled(self.fit_problem() is None)

    # -- helpers --------------------------------------------------------------------------
    def _set_busy(self, busy: bool, text: str = "", running: bool = False) -> None:
        for w in (self.run_button, self.compare_button, self.model_combo, self.device_combo,
                  self.batch_button, self.dataset_button):
            w.setEnabled(not busy)
        self.cancel_button.setEnabled(busy and running)
        self.progress_bar.setVisible(busy)
        if busy:
            self.progress_bar.setRange(0, 0)
            self._set_status(text, "gray")

    def _set_status(self, text: str, colour: str) -> None:
        self.status.setText(text)
        self.status.setStyleSheet(f"color: {colour}")

    def _report_error(self, text: str) -> None:
        """Full message in the (word-wrapped) status line and in one notification line."""
        self._set_status(text, "#bf616a")
        show_error(" ".join(text.split()))


def _load_model(path: Path, device: str) -> tuple[Any, list[str], Path]:
    """Worker body: load the checkpoint and list the devices (imports torch)."""
    devices = available_devices()
    return load_segmenter(path, device if device in devices else "auto"), devices, path
