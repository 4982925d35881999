"""The widget's secondary buttons: Save…, Batch…, Dataset routing…, and the Shapes region.

- **Save…** writes the selected Labels layer (or the last segmentation of the selected
  image) through the plugin's own writers in ``_writer`` (NIfTI, TIFF; DICOM-SEG and
  RTSTRUCT only for images that came from a DICOM series, ``dicom_source`` in the
  metadata); an existing file is replaced only after the user confirms, and the image's
  own source file never.
- **Batch…** segments a folder (``_batch.segment_folder``, through ``training.predict``)
  or every open image layer, in a worker, with the widget's progress bar and Cancel. An
  output folder holding an earlier run's files that the run would replace (same case ids,
  ``predictions.csv``) is used only after the user confirms replacing them.
  An output folder another run is writing into (its ``training`` lock) is refused at once,
  naming that run.
- **Dataset routing…** runs ``training.routing`` on a manifest or dataset folder in a
  worker, into a temporary folder removed when the figure's dialog (or the widget) closes,
  and shows ``routing.png`` in a small dialog. A model without dMoE/MoE layers has no
  routing, which the status line says at once (nothing runs); data other than the model's
  training data are used only after the user confirms (their test split may hold training
  cases).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from qtpy.QtCore import Qt
from qtpy.QtGui import QPixmap
from qtpy.QtWidgets import (
    QDialog,
    QFileDialog,
    QLabel,
    QMessageBox,
    QScrollArea,
    QVBoxLayout,
)

from . import _batch, _tables, _tasks, _view
from ._reader import META, file_suffix

FORMATS = {"NIfTI (*.nii.gz)": ("write_labels_nifti", ".nii.gz"),
           "TIFF (*.tif)": ("write_labels_tiff", ".tif")}
DICOM_FORMATS = {"DICOM-SEG (*.dcm)": ("write_labels_dicom_seg", ".dcm"),
                 "RTSTRUCT (*.dcm)": ("write_labels_rtstruct", ".dcm")}


# -- region -----------------------------------------------------------------------------
def rectangle_region(shapes: Any, image: Any) -> tuple[int, int, int, int]:
    """The last rectangle of a Shapes layer as image pixels ``(row0, row1, col0, col1)``.

    Corners go data → world (the Shapes layer's transform) → image data, are rounded
    outwards and clipped to the image. Raises ValueError naming what to do.
    """
    rects = [i for i, kind in enumerate(shapes.shape_type) if kind == "rectangle"]
    if not rects:
        raise ValueError(f"'{shapes.name}' holds no rectangle; draw one with the rectangle "
                         "tool or choose 'Whole image'.")
    corners = np.asarray(shapes.data[rects[-1]], dtype=float)[:, -2:]
    pixels = []
    for corner in corners:
        world = shapes.data_to_world(np.r_[np.zeros(shapes.ndim - 2), corner])
        pixels.append(np.asarray(image.world_to_data(world), dtype=float)[-2:])
    pixels = np.array(pixels)
    shape = _tasks.layer_spatial_ndim(np.ndim(image.data), image.rgb)
    h, w = np.shape(image.data)[shape - 2:shape]
    r0, c0 = np.floor(pixels.min(0) + 0.5).astype(int)
    r1, c1 = np.ceil(pixels.max(0) + 0.5).astype(int)
    r0, r1, c0, c1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
    if r1 - r0 < 8 or c1 - c0 < 8:
        raise ValueError(f"The rectangle in '{shapes.name}' covers {max(r1 - r0, 0)}×"
                         f"{max(c1 - c0, 0)} pixels of '{image.name}'; draw it over the "
                         "image, at least 8×8 pixels.")
    return int(r0), int(r1), int(c0), int(c1)


# -- save -------------------------------------------------------------------------------
def is_dicom(layer: Any) -> bool:
    meta = layer.metadata or {}
    return bool(meta.get("dicom_source") or (meta.get(META) or {}).get("dicom_source"))


def save_formats(layer: Any) -> dict[str, tuple[str, str]]:
    """Name filter -> (writer function name in ``_writer``, suffix) offered for ``layer``."""
    return {**FORMATS, **(DICOM_FORMATS if is_dicom(layer) else {})}


def output_path(path: str | Path, suffix: str) -> Path:
    path = Path(path)
    return path if file_suffix(path) == suffix or path.name.endswith(suffix) else \
        path.with_name(path.name + suffix)


def layer_sources(layer: Any) -> list[str]:
    """Files ``layer`` was read from: the plugin reader's ``source`` (copied onto every
    derived layer) and napari's own ``layer.source.path`` (any reader)."""
    paths = [((layer.metadata or {}).get(META) or {}).get("source"),
             getattr(getattr(layer, "source", None), "path", None)]
    return [str(p) for p in paths if p]


def save_labels(layer: Any, path: str | Path, name_filter: str,
                confirm: Callable[[Path], bool], protected: Sequence[str] = ()) -> list[str]:
    """Write ``layer`` with the plugin's writer for ``name_filter``.

    Refuses the layer's own source file and every path in ``protected`` (the files the
    open layers were read from); asks ``confirm(path)`` before replacing another existing
    file (returns [] when the user says no), except a DICOM file, which is never replaced.
    The writers replace a file only once the new one is complete (``_writer``).
    """
    from . import _writer

    function, suffix = save_formats(layer)[name_filter]
    out = output_path(path, suffix)
    for source in [*layer_sources(layer), *protected]:
        if Path(source).resolve() == out.resolve():
            raise ValueError(f"{out} is an input (a file an open layer was read from); "
                             "choose another file name (outputs never replace inputs).")
    if out.exists() and name_filter in DICOM_FORMATS:
        raise ValueError(f"{out} exists, and DICOM-SEG and RTSTRUCT files are never "
                         "replaced; choose another file name.")
    if out.exists() and not confirm(out):
        return []
    writer = getattr(_writer, function, None)
    if writer is None:
        raise ValueError(f"This version of napari-dmoe cannot write {name_filter}; save as "
                         "NIfTI or TIFF.")
    data, attributes, _ = layer.as_layer_data_tuple()
    return writer(str(out), data, attributes)


def layer_to_save(widget: Any) -> Any:
    active = widget.viewer.layers.selection.active
    if active is not None and type(active).__name__ == "Labels":
        return active
    image = widget.image_layer()
    for layer in reversed(list(widget.viewer.layers)):
        meta = (layer.metadata or {}).get(META) or {}
        if meta.get("role") == "segmentation" and image is not None \
                and meta.get("image") == image.name:
            return layer
    return None


def save_dialog(widget: Any) -> None:
    layer = layer_to_save(widget)
    if layer is None:
        widget._report_error("Select a Labels layer (a segmentation) to save.")
        return
    filters = save_formats(layer)
    start = widget.settings.get("last_dir") or str(Path.home())
    path, chosen = QFileDialog.getSaveFileName(
        widget, f"Save '{layer.name}'", str(Path(start) / _safe(layer.name)),
        ";;".join(filters), options=QFileDialog.Option.DontConfirmOverwrite)
    if not path:
        return

    def confirm(out: Path) -> bool:
        answer = QMessageBox.question(widget, "Replace file?",
                                      f"{out} exists. Replace it?")
        return answer == QMessageBox.StandardButton.Yes

    try:
        protected = [p for other in widget.viewer.layers for p in layer_sources(other)]
        written = save_labels(layer, path, chosen or next(iter(filters)), confirm, protected)
    except (ValueError, OSError) as exc:
        widget._report_error(f"Cannot save '{layer.name}': {exc}")
        return
    if written:
        widget._set_status(f"Saved {', '.join(written)}", "#a3be8c")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") or "labels"


# -- batch ------------------------------------------------------------------------------
def batch_dialog(widget: Any) -> None:
    if widget.segmenter is None or widget.model_entry is None:
        widget._report_error("Choose a model (or Open checkpoint…) first.")
        return
    box = QMessageBox(widget)
    box.setWindowTitle("Batch segmentation")
    box.setText("Segment a folder of images into an output folder (label files and "
                "predictions.csv), or every open image layer into new layers?")
    folder = box.addButton("A folder…", QMessageBox.ButtonRole.AcceptRole)
    layers = box.addButton("All open images", QMessageBox.ButtonRole.AcceptRole)
    box.addButton(QMessageBox.StandardButton.Cancel)
    box.exec()
    if box.clickedButton() is folder:
        source = QFileDialog.getExistingDirectory(widget, "Folder of images (or a dataset)")
        if not source:
            return
        out = QFileDialog.getExistingDirectory(widget, "Output folder (not the input folder)")
        if out:
            start_batch_folder(widget, Path(source), Path(out))
    elif box.clickedButton() is layers:
        start_batch_layers(widget)


def _run_job(widget: Any, function: Callable[..., Any], *args: Any,
             done: Callable[[Any], None], unit: str = "window",
             finished: Callable[[], None] | None = None, **kwargs: Any) -> None:
    """Run a generator job with the widget's progress bar, Cancel and error display;
    ``unit`` names its progress steps in the status line; ``done(result)`` when it returns,
    ``finished()`` when it ends in any way (returned, cancelled or failed)."""
    import threading

    widget._cancel = threading.Event()
    widget._job = {"slices": False, "unit": unit, "done": done,  # dropped when finished
                   "finished": finished}
    widget._set_busy(True, "Working…", running=True)
    widget.worker = create_worker(
        function, *args, cancel=widget._cancel, **kwargs,
        _connect={"yielded": widget._on_progress, "returned": widget._on_job_returned,
                  "errored": widget._on_error, "finished": widget._on_finished})


def confirm_replace(widget: Any, out: Path, existing: Sequence[Path]) -> bool:
    """Ask whether a Batch… run may replace ``existing``, an earlier run's files in ``out``
    (No is the default). The message names the first five; "Show Details…" lists all."""
    names = [p.name for p in existing]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    box = QMessageBox(QMessageBox.Icon.Question, "Replace files?",
                      f"Replace {len(names)} file(s) from an earlier run in {out}?\n\n"
                      f"{shown}\n\nThey cannot be recovered afterwards. Other files in "
                      "that folder are not touched.",
                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, widget)
    box.setDefaultButton(QMessageBox.StandardButton.No)
    box.setEscapeButton(QMessageBox.StandardButton.No)
    if len(names) > 5:
        box.setDetailedText("\n".join(names))
    return box.exec() == QMessageBox.StandardButton.Yes


def start_batch_folder(widget: Any, source: Path, out: Path) -> None:
    """Segment ``source`` into ``out`` in a worker; first asks (:func:`confirm_replace`)
    when ``out`` holds files of an earlier run that this one would replace."""
    value = widget.attribute_combo.currentText() or _tasks.UNKNOWN

    def done(result: _batch.BatchOutput) -> None:
        n = len(result.rows)
        if result.cancelled:
            of = f" of {result.total}" if result.total is not None else ""
            text = (f"Cancelled: {n}{of} case(s) written to {out}; predictions.csv lists "
                    "only those, the rest were not segmented.")
        else:
            text = f"Wrote {n} label file(s) and predictions.csv to {out}"
        widget._set_status(text, "#d08770" if result.cancelled else "#a3be8c")
        body = _tables.message(f"Batch: {source} → {out}")
        if result.cancelled:
            names = [r["file"] for r in result.rows]
            shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
            body += _tables.message(f"Written ({n}{of}): {shown or 'none'}.")
            body += _tables.message("Batch… again segments every case from the start.")
        widget._sections = {"body": body}
        widget._render()

    try:
        _batch.check_folders(source, out)
        _batch.refuse_folder_in_use(out)
        existing = _batch.earlier_outputs(source, out)
    except (ValueError, OSError) as exc:
        widget._report_error(str(exc))
        return
    if existing and not confirm_replace(widget, out, existing):
        widget._set_status(f"Nothing was written: {out} keeps the earlier run's "
                           f"{len(existing)} file(s); choose another output folder.", "gray")
        return
    _run_job(widget, _batch.segment_folder, widget.model_entry.path, source, out, value,
             device=widget.device_combo.currentText() or "auto", segmenter=widget.segmenter,
             overwrite=bool(existing), done=done, unit="case")


def start_batch_layers(widget: Any) -> None:
    seg = widget.segmenter
    images = [layer for layer in widget.viewer.layers if type(layer).__name__ == "Image"
              and not widget._is_derived(layer)
              and _tasks.layer_spatial_ndim(np.ndim(layer.data), layer.rgb) == seg.spatial_dims]
    if not images:
        widget._report_error(f"No open image fits this {seg.spatial_dims}D model.")
        return
    jobs = []
    for layer in images:
        array, axis = _tasks.model_input(layer.data, rgb=layer.rgb)
        value = _tasks.preselect_value(layer.metadata, seg.attribute_name, seg.vocabulary)
        jobs.append((layer, array, axis, value))
    model = widget.model_entry.name

    def done(out: _batch.BatchOutput) -> None:
        for layer, result in out.rows:
            _view.segmentation_layer(widget.viewer, layer, model, seg, result)
        widget._set_status(f"Segmented {len(out.rows)} of {len(jobs)} images"
                           + (" (cancelled)." if out.cancelled else "."), "#a3be8c")

    _run_job(widget, _batch.segment_layers, seg, jobs, done=done)


# -- dataset routing --------------------------------------------------------------------
def no_routing_reason(widget: Any) -> str | None:
    """Why the widget's model has no routing to show (no dMoE/MoE layers), or None."""
    seg = widget.segmenter
    if seg is None or seg.has_routing:
        return None
    return (f"{widget.model_entry.name} has no dMoE/MoE layers, so there is no expert "
            "routing to show; nothing was run.")


def dataset_routing_dialog(widget: Any) -> None:
    if widget.model_entry is None:
        widget._report_error("Choose a model (or Open checkpoint…) first.")
        return
    reason = no_routing_reason(widget)
    if reason:  # before asking for a manifest
        widget._set_status(reason, "#d08770")
        return
    start = widget.settings.get("last_dir") or str(Path.home())
    data, _ = QFileDialog.getOpenFileName(
        widget, "Dataset manifest (or any file in a FairSeg/HAM10000 folder)", start,
        "Manifests (*.csv);;All files (*)")
    if not data:
        return
    data_path = Path(data) if data.endswith(".csv") else Path(data).parent
    start_dataset_routing(widget, data_path, widget.temporary_folders.make("routing"))


def confirm_changed_data(widget: Any, change: str, split: str, model: str) -> bool:
    """Ask whether Dataset routing… may use data other than the model's training data
    (``change`` says how they differ); No is the default and Escape."""
    box = QMessageBox(QMessageBox.Icon.Question, "Use changed data?",
                      f"{change}.\n\nThe '{split}' split is drawn again from these data, so "
                      f"it may hold cases {model} was trained on, and the routing figure "
                      "would then mix training cases with unseen ones.\n\nRun Dataset "
                      "routing on these data anyway?",
                      QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No, widget)
    box.setDefaultButton(QMessageBox.StandardButton.No)
    box.setEscapeButton(QMessageBox.StandardButton.No)
    return box.exec() == QMessageBox.StandardButton.Yes


def accept_routing_data(widget: Any, data: Path, split: str) -> bool | None:
    """Whether Dataset routing… may run on ``data``: None when not (the model has no
    dMoE/MoE layers, the data cannot be listed, or the user declined data other than the
    model's training data; the status line says which), else whether the data differ
    from the training data (``allow_changed_data``)."""
    name, seg = widget.model_entry.name, widget.segmenter
    reason = no_routing_reason(widget)
    if reason:
        widget._set_status(reason, "#d08770")
        return None
    try:
        change = _batch.routing_data_change(widget.model_entry.path, data, split,
                                            seg.metadata if seg is not None else None)
    except (ValueError, OSError) as exc:
        widget._report_error(str(exc))
        return None
    if change and not confirm_changed_data(widget, change, split, name):
        widget._set_status(f"Nothing was run: {data} does not hold the data {name} was "
                           "trained on. Choose its training data, or answer Yes to use "
                           "these anyway.", "gray")
        return None
    return bool(change)


def start_dataset_routing(widget: Any, data: Path, out: Path, split: str = "test") -> None:
    """Run ``training.routing`` into ``out`` in a worker, then show its figure
    (:func:`show_figure`, kept as ``widget.routing_figure``).

    Nothing runs for a model without dMoE/MoE layers (the status line says so), nor for
    data other than the model's training data unless the user confirms
    (:func:`confirm_changed_data`). ``out``, when the widget's ``temporary_folders`` made
    it, is removed when the figure's dialog closes, or at once when there is no figure;
    any other folder is left as it is."""
    name = widget.model_entry.name
    seg = widget.segmenter
    folders = widget.temporary_folders
    allow_changed_data = accept_routing_data(widget, data, split)
    if allow_changed_data is None:
        folders.remove(out)
        return
    one_router = seg is not None and not seg.uses_attribute
    attribute = (seg.attribute_name if seg is not None else None) or "the attribute"
    shown: list[QDialog] = []

    def done(report: Any) -> None:
        if report is None:
            widget._set_status("Cancelled: no routing figure.", "gray")
            return
        if not report.stats["layers"]:
            widget.routing_figure = None
            widget._set_status(f"{name} has no dMoE/MoE layers, so there is no expert "
                               "routing to show (no figure was made).", "#d08770")
            return
        widget._set_status(f"Wrote {out / 'routing.json'} and routing.png", "#a3be8c")
        note = (f"{name} is an attribute-blind MoE: one router for every group, so swapping "
                f"{attribute} changes no expert; differences between the rows come from the "
                "images alone." if one_router else "")
        if folders.owns(out):
            note = "\n".join(filter(None, [note, "A temporary folder: it is removed when "
                                                  "this window closes."]))
        widget.routing_figure = show_figure(widget, out / "routing.png", note)
        widget.routing_figure.finished.connect(lambda _: folders.remove(out))
        shown.append(widget.routing_figure)

    def finished() -> None:  # no figure (cancelled, failed, no layers): nothing to keep
        if not shown:
            folders.remove(out)

    _run_job(widget, _batch.dataset_routing, widget.model_entry.path, data, out, split,
             device=widget.device_combo.currentText() or "auto", done=done, unit="case",
             finished=finished, allow_changed_data=allow_changed_data)


def show_figure(widget: Any, path: Path, note: str = "") -> QDialog:
    """A dialog with the figure ``path``, its path and ``note`` below it.

    Raises:
        ValueError: ``path`` is not a readable image (no empty dialog is shown).
    """
    pixmap = QPixmap(str(path))
    if pixmap.isNull():
        raise ValueError(f"{path} is missing or not an image; nothing to show.")
    dialog = QDialog(widget)
    dialog.setWindowTitle(f"Dataset routing — {path}")
    label = QLabel()
    label.setPixmap(pixmap)
    label.setAlignment(Qt.AlignmentFlag.AlignCenter)
    scroll = QScrollArea()
    scroll.setWidget(label)
    caption = QLabel(f"{path} (and routing.json beside it)" + (f"\n{note}" if note else ""))
    caption.setWordWrap(True)
    caption.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    layout = QVBoxLayout(dialog)
    layout.addWidget(scroll)
    layout.addWidget(caption)
    dialog.resize(min(pixmap.width() + 40, 1400), min(pixmap.height() + 80, 900))
    dialog.show()
    return dialog
