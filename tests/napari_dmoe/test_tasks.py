"""The widget's work without a viewer: array order, running/cancelling, routing placement,
measurements, disagreement, ground-truth lookup."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from napari_dmoe import _tasks
from napari_dmoe._reader import META
from training.inference import Cancelled, RoutingMap


class FakeSegmenter:
    """Counts windows like a 3D sliding-window run; labels = attribute index."""

    vocabulary = ["A", "B"]

    def __init__(self, windows: int = 5, delay: float = 0.0, fail: Exception | None = None):
        self.windows, self.delay, self.fail = windows, delay, fail
        self.stopped_at: int | None = None

    def segment(self, image, value, *, channel_axis, return_routing, progress, should_cancel):
        for done in range(1, self.windows + 1):
            if should_cancel():
                self.stopped_at = done - 1
                raise Cancelled(f"cancelled after {done - 1} windows")
            time.sleep(self.delay)
            if self.fail is not None:
                raise self.fail
            progress(done, self.windows)
        fill = self.vocabulary.index(value) + 1 if value in self.vocabulary else 0
        return SimpleNamespace(labels=np.full(np.shape(image), fill), attribute_value=value)


def drain(gen):
    """Run a generator to its end: (yielded items, return value)."""
    items = []
    while True:
        try:
            items.append(next(gen))
        except StopIteration as stop:
            return items, stop.value


def test_model_input_and_back():
    volume = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # layer (Z, Y, X)
    array, axis = _tasks.model_input(volume, rgb=False)
    assert array.shape == (4, 3, 2) and axis is None
    assert array[3, 2, 1] == volume[1, 2, 3]
    np.testing.assert_array_equal(_tasks.layer_labels(array), volume)
    rgb = np.zeros((5, 6, 3))
    array, axis = _tasks.model_input(rgb, rgb=True)
    assert array.shape == (5, 6, 3) and axis == -1
    assert _tasks.layer_labels(np.zeros((5, 6), int)).dtype == np.uint8


def test_segment_steps_yields_progress_and_returns_every_value():
    steps, results = drain(_tasks.segment_steps(FakeSegmenter(windows=3, delay=0.01),
                                                np.zeros((4, 4)), ["A", "B", "unknown"],
                                                poll=0.001))
    assert set(results) == {"A", "B", "unknown"}
    assert int(results["B"].labels[0, 0]) == 2
    assert [(s.run, s.runs) for s in steps if s.done == s.total == 3] == [(1, 3), (2, 3),
                                                                          (3, 3)]
    assert all(0 <= s.done <= s.total for s in steps if s.total)


def test_cancel_event_stops_the_run_at_the_next_window():
    seg = FakeSegmenter(windows=1000, delay=0.01)
    cancel = threading.Event()
    gen = _tasks.segment_steps(seg, np.zeros((4, 4)), ["A"], cancel=cancel, poll=0.01)
    next(gen)  # start
    next(gen)  # first real progress
    cancel.set()
    start = time.perf_counter()
    with pytest.raises(Cancelled):
        drain(gen)
    assert time.perf_counter() - start < 1.0
    assert seg.stopped_at is not None and seg.stopped_at < 1000


def test_closing_the_generator_cancels_the_helper_thread():
    seg = FakeSegmenter(windows=1000, delay=0.01)
    gen = _tasks.segment_steps(seg, np.zeros((4, 4)), ["A"], poll=0.01)
    next(gen)
    next(gen)
    gen.close()  # what worker.quit() does at a yield
    assert seg.stopped_at is not None and seg.stopped_at < 1000
    assert not any(t.name == "napari-dmoe-segment" for t in threading.enumerate())


def test_errors_reach_the_caller():
    gen = _tasks.segment_steps(FakeSegmenter(fail=ValueError("too small")), np.zeros(3), ["A"])
    with pytest.raises(ValueError, match="too small"):
        drain(gen)


def _extent(scale, translate, n):
    scale, translate = np.asarray(scale, float), np.asarray(translate, float)
    return translate - scale / 2, translate + (np.asarray(n) - 0.5) * scale


@pytest.mark.parametrize("stride,offset,grid,image", [
    ((25.0, 30.0), (0.0, 0.0), (4, 4), (100, 120)),
    ((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), (16, 32, 32), (32, 64, 64)),
])
def test_routing_grid_covers_the_image_exactly(stride, offset, grid, image):
    image_scale, image_translate = [2.5, 0.9, 0.7][-len(grid):], [-40.0, 3.0, 1.0][-len(grid):]
    scale, translate = _tasks.routing_geometry(stride, offset, image_scale, image_translate)
    lo, hi = _extent(scale, translate, grid)
    lo_img, hi_img = _extent(image_scale, image_translate, image)
    np.testing.assert_allclose(lo, lo_img)
    np.testing.assert_allclose(hi, hi_img)


def test_routing_layers_transpose_3d_maps_to_layer_order():
    gates = np.zeros((4, 2, 3, 5), np.float32)  # (E, X, Y, Z)
    gates[3, 1, 2, 4] = 0.9
    gates[0] = 0.1
    routing = RoutingMap("encoder.stage0", gates, (2.0, 4.0, 8.0), (0.0, 0.0, 0.0))
    out = _tasks.routing_layers(routing, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    assert out["experts"].shape == (5, 3, 2)  # (Z, Y, X)
    assert out["experts"][4, 2, 1] == 4 and out["experts"][0, 0, 0] == 1  # expert e -> e+1
    assert out["gate"][4, 2, 1] == pytest.approx(0.9)
    assert out["scale"] == [8.0, 4.0, 2.0]
    assert out["num_experts"] == 4


def test_measure_units_and_scores():
    labels = np.zeros((10, 10), int)
    labels[:2, :5] = 1
    labels[5:, 5:] = 2
    assert _tasks.measure(labels, ["bg", "a", "b"], [0.5, 2.0]) == [10.0, 25.0]
    assert _tasks.unit_of(("millimeter", "millimeter"), 2) == "mm²"
    assert _tasks.unit_of(("pixel", "pixel", "pixel"), 3) == "voxels"
    scores = _tasks.scores_vs_truth(labels, labels, 3)
    np.testing.assert_allclose(scores["dice"], [1.0, 1.0])
    with pytest.raises(ValueError, match="only 2 classes"):
        _tasks.scores_vs_truth(labels, labels, 2)


def test_disagreement_counts_maps_against_the_majority():
    a = np.array([[0, 1], [2, 2]])
    b = np.array([[0, 1], [2, 1]])
    c = np.array([[1, 1], [0, 1]])
    majority, count = _tasks.disagreement([a, b, c], 3)
    np.testing.assert_array_equal(majority, [[0, 1], [2, 1]])
    np.testing.assert_array_equal(count, [[1, 0], [1, 1]])


def _layer(kind, name, shape, meta=None):
    layer = type(kind, (), {})()
    layer.name, layer.data, layer.metadata = name, np.zeros(shape), meta or {}
    return layer


def test_find_ground_truth_and_preselect():
    image = _layer("Image", "case", (8, 8))
    marked = _layer("Labels", "anything", (8, 8), {META: {"role": "ground_truth",
                                                          "image": "case"}})
    named = _layer("Labels", "case ground truth", (8, 8))
    wrong_shape = _layer("Labels", "case ground truth", (4, 4))
    assert _tasks.find_ground_truth([named, marked], image, (8, 8)) is marked
    assert _tasks.find_ground_truth([wrong_shape, named], image, (8, 8)) is named
    assert _tasks.find_ground_truth([wrong_shape], image, (8, 8)) is None
    meta = {META: {"attributes": {"race": "Black"}}}
    assert _tasks.preselect_value(meta, "race", ["Asian", "Black"]) == "Black"
    assert _tasks.preselect_value(meta, "race", ["Asian"]) == "unknown"
    assert _tasks.preselect_value({}, "race", ["Asian"]) == "unknown"
