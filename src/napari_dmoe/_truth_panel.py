"""The widget's ground-truth, region and live-score wiring, and its clean shutdown.

Mixins of ``DMoEWidget`` (kept apart so the widget module stays readable):

- :class:`TruthMixin`: the Ground truth chooser (``_truth.truth_candidates``: same shape
  and placement, remembered per image), the Region chooser (Shapes rectangles) and the
  Dice/IoU table that follows edits of the prediction or the truth (Labels ``paint`` and
  ``data`` events, debounced by a 300 ms timer).
- :class:`ShutdownMixin`: closing the viewer during a job cancels it and waits for the
  worker thread (and the model loader) to end before the window goes.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from qtpy.QtCore import QEvent, QObject, QThreadPool
from qtpy.QtWidgets import QApplication

from . import _actions, _tables, _truth, _view
from ._reader import META

NO_TRUTH = "None"
WHOLE_IMAGE = "Whole image"


class TruthMixin:
    """Ground truth, region and live scores (needs the widget's combos and viewer)."""

    # -- ground truth and region ----------------------------------------------------------
    def _refresh_truth(self) -> None:
        image = self.image_layer()
        candidates = _truth.truth_candidates(self.viewer.layers, image)
        names = [layer.name for layer in candidates]
        if image is not None and image.name in self._truth_choice:
            wanted = self._truth_choice[image.name] or NO_TRUTH
        else:
            default = _truth.default_truth(candidates, image) if image is not None else None
            wanted = default.name if default is not None else NO_TRUTH
        self.truth_combo.blockSignals(True)
        self.truth_combo.clear()
        self.truth_combo.addItems([NO_TRUTH, *names])
        self.truth_combo.setCurrentText(wanted if wanted in names else NO_TRUTH)
        self.truth_combo.blockSignals(False)
        self._style_chosen_truth()

    def _style_chosen_truth(self) -> None:
        """Outline the chosen truth in the truth palette (once), so it never looks like a
        prediction."""
        truth = self.truth_layer()
        if truth is None or truth.contour != 0:
            return
        names = ((truth.metadata or {}).get(META) or {}).get("class_names")
        if self.segmenter is not None:
            names = names or self.segmenter.class_names
        _view.style_truth(truth, len(names) if names else int(np.max(truth.data)) + 1)

    def _on_truth_chosen(self, _: int) -> None:
        image = self.image_layer()
        if image is not None:
            text = self.truth_combo.currentText()
            self._truth_choice[image.name] = "" if text == NO_TRUTH else text
        self._style_chosen_truth()
        if self._scored.get("image") is image:
            self._watch_scores(self._scored["pred"], self.truth_layer(),
                               self._scored["names"], image)
            self.rescore()

    def truth_layer(self) -> Any:
        """The chosen ground-truth Labels layer, or None."""
        name = self.truth_combo.currentText()
        if name == NO_TRUTH or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def _refresh_regions(self) -> None:
        current = self.region_combo.currentText()
        names = [layer.name for layer in self.viewer.layers
                 if type(layer).__name__ == "Shapes" and "rectangle" in layer.shape_type]
        self.region_combo.blockSignals(True)
        self.region_combo.clear()
        self.region_combo.addItems([WHOLE_IMAGE, *names])
        self.region_combo.setCurrentText(current if current in names else WHOLE_IMAGE)
        self.region_combo.blockSignals(False)

    def region(self) -> tuple[int, int, int, int] | None:
        """The chosen Shapes rectangle as image pixels ``(row0, row1, col0, col1)``."""
        name = self.region_combo.currentText()
        if name == WHOLE_IMAGE or name not in self.viewer.layers:
            return None
        return _actions.rectangle_region(self.viewer.layers[name], self.image_layer())

    # -- live scores ----------------------------------------------------------------------
    def _watch_scores(self, pred: Any, truth: Any, names: list[str], image: Any) -> None:
        for layer in (self._scored.get("pred"), self._scored.get("truth")):
            if layer is not None:
                for event in (layer.events.paint, layer.events.data):
                    try:
                        event.disconnect(self._schedule_rescore)
                    except (TypeError, ValueError, RuntimeError):
                        pass
        self._scored = {"pred": pred, "truth": truth, "names": names, "image": image}
        for layer in (pred, truth):
            if layer is not None:
                layer.events.paint.connect(self._schedule_rescore)
                layer.events.data.connect(self._schedule_rescore)
        if truth is not None and _view.role_of(truth) != "segmentation":
            _view.style_truth(truth, len(names))

    def _schedule_rescore(self, *_: Any) -> None:
        self._rescore_timer.start()

    def _score_now(self) -> None:
        pred, truth = self._scored.get("pred"), self._scored.get("truth")
        if pred is None or truth is None or pred not in self.viewer.layers \
                or truth not in self.viewer.layers:
            self._sections["scores"] = ""
            return
        names = self._scored["names"]
        try:
            scores = _truth.score(pred, truth, len(names))
            self._sections["scores"] = (_tables.scores_table(names, scores, truth.name)
                                        + _view.truth_legend(names))
        except ValueError as exc:
            self._sections["scores"] = _tables.message(f"No Dice against '{truth.name}': {exc}")

    def rescore(self) -> None:
        """Recompute Dice/IoU against the chosen truth (after an edit of either layer)."""
        if "scores" not in self._sections:
            return
        self._score_now()
        self._render()

    def _render(self) -> None:
        order = ("head", "scores", "body")
        self.results.setHtml(_tables.page(*(self._sections.get(k, "") for k in order)))


class ShutdownMixin:
    """Cancel and join the running job before the viewer window closes."""

    # -- closing --------------------------------------------------------------------------
    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        super().showEvent(event)
        window = self.window()
        if window is not self and window is not self._filtered:
            window.installEventFilter(self)
            self._filtered = window

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt name)
        if obj is getattr(self, "_filtered", None) and event.type() == QEvent.Type.Close:
            self.shutdown()
        return False

    def shutdown(self, timeout: float = 60.0) -> None:
        """Cancel any job and wait for its worker thread to end, then remove the widget's
        temporary output folders (called before closing)."""
        self._stop_jobs(timeout)
        if self.worker is None:  # nothing writes into them any more
            self.temporary_folders.remove_all()

    def _stop_jobs(self, timeout: float) -> None:
        if self.worker is None and self.loader is None:
            return
        self._closing = True
        self._cancel.set()
        deadline = time.monotonic() + timeout
        while (self.worker is not None or self.loader is not None) \
                and time.monotonic() < deadline:
            QApplication.processEvents()
            time.sleep(0.01)
        QThreadPool.globalInstance().waitForDone(int(max(deadline - time.monotonic(), 1) * 1000))
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt name)
        self.shutdown()
        super().closeEvent(event)
