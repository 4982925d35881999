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
    steps, out = drain(_tasks.segment_steps(FakeSegmenter(windows=3, delay=0.01),
                                                np.zeros((4, 4)), ["A", "B", "unknown"],
                                                poll=0.001))
    results = out.results
    assert not out.cancelled
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
    _, out = drain(gen)  # a cancel is a normal end: a Qt worker always reaches "finished"
    assert out.cancelled and out.results == {}
    assert time.perf_counter() - start < 1.0
    assert seg.stopped_at is not None and seg.stopped_at < 1000


def test_cancelled_compare_keeps_the_values_already_finished():
    seg = FakeSegmenter(windows=20, delay=0.005)
    cancel = threading.Event()
    gen = _tasks.segment_steps(seg, np.zeros((4, 4)), ["A", "B", "unknown"], cancel=cancel,
                               poll=0.001)
    for step in gen:
        if step.run == 2 and step.done >= 2:
            cancel.set()
            break
    _, out = drain(gen)
    assert out.cancelled and list(out.results) == ["A"]
    assert int(out.results["A"].labels[0, 0]) == 1


def test_cancelled_raised_by_the_model_is_not_a_runtime_error():
    assert not issubclass(Cancelled, RuntimeError)  # superqt swallows RuntimeError
    assert issubclass(Cancelled, Exception)


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
    assert out["experts"][4, 2, 1] == 4 and out["experts"][0, 0, 0] == 1  # label n = En
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
    assert _tasks.unit_of(("pixel", "pixel"), 2, [1.0, 1.0]) == "px"
    assert _tasks.unit_of(("pixel", "pixel"), 2, [0.5, 0.5]) == "scaled units²"
    assert _tasks.unit_of(("millimeter",) * 2, 2, [0.5, 0.5]) == "mm²"
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


def test_truth_candidates_need_same_shape_and_placement():
    from napari.layers import Image, Labels

    from napari_dmoe._truth import default_truth, truth_candidates

    image = Image(np.zeros((8, 8)), name="case", scale=(0.5, 0.5), translate=(3, 4))
    geometry = {"scale": (0.5, 0.5), "translate": (3, 4)}
    paired = Labels(np.zeros((8, 8), int), name="anything", **geometry,
                    metadata={META: {"role": "ground_truth", "image": "case"}})
    users = Labels(np.zeros((8, 8), int), name="my labels", **geometry)
    wrong_shape = Labels(np.zeros((4, 4), int), name="case ground truth", **geometry)
    shifted = Labels(np.zeros((8, 8), int), name="case ground truth 2", scale=(0.5, 0.5),
                     translate=(3, 5))
    rotated = Labels(np.zeros((8, 8), int), name="rot", **geometry, rotate=10)
    other_scale = Labels(np.zeros((8, 8), int), name="case gt", translate=(3, 4))
    output = Labels(np.zeros((8, 8), int), name="seg", **geometry,
                    metadata={META: {"role": "segmentation"}})
    layers = [wrong_shape, shifted, rotated, other_scale, output, users, paired]
    assert truth_candidates(layers, image) == [users, paired]
    assert default_truth([users, paired], image) is paired
    assert default_truth([users], image) is None  # never guessed from a name
    rgb = Image(np.zeros((8, 8, 3)), rgb=True, **geometry)
    assert truth_candidates(layers, rgb) == [users, paired]


def test_preselect():
    meta = {META: {"attributes": {"race": "Black"}}}
    assert _tasks.preselect_value(meta, "race", ["Asian", "Black"]) == "Black"
    assert _tasks.preselect_value(meta, "race", ["Asian"]) == "unknown"
    assert _tasks.preselect_value({}, "race", ["Asian"]) == "unknown"


class PlaneSegmenter:
    """2D fake: labels = image > 0.5, probabilities (2, H, W), one routing grid."""

    vocabulary = ["A", "B"]

    def segment(self, image, value, *, channel_axis, return_routing, progress,
                should_cancel, return_probabilities=False):
        from training.inference import SegmentationResult

        image = np.asarray(image)
        assert image.ndim == 2, image.shape
        labels = (image > 0.5).astype(np.int32)
        probs = np.stack([1.0 - labels, labels]).astype(np.float32)
        gates = np.zeros((3, image.shape[0] // 2, image.shape[1] // 2), np.float32)
        gates[0] = 1.0
        routing = [RoutingMap("encoder.block0", gates, (2.0, 2.0), (0.0, 0.0))]
        if progress:
            progress(1, 1)
        return SegmentationResult(labels, value, ["bg", "fg"], routing,
                                  probs if return_probabilities else None)


def test_region_runs_the_crop_and_pastes_it_in_place():
    image = np.zeros((20, 30), np.float32)
    image[5:10, 12:20] = 1.0
    image[0, 0] = 1.0  # outside the region: must stay background
    options = _tasks.RunOptions(region=(4, 12, 10, 24), return_probabilities=True)
    result = _tasks.segment_one(PlaneSegmenter(), image, "A", options)
    expected = np.zeros((20, 30), np.int32)
    expected[5:10, 12:20] = 1
    np.testing.assert_array_equal(result.labels, expected)
    assert result.probabilities.shape == (2, 20, 30)
    assert result.probabilities[0, 0, 0] == 1.0  # outside the crop: background
    assert result.routing[0].grid_offset == (4.0, 10.0)


def test_2d_model_on_a_stack_goes_slice_by_slice():
    stack = np.zeros((3, 10, 12), np.float32)  # layer order (Z, Y, X)
    stack[1, 2:4, 5:9] = 1.0
    array, axis = _tasks.model_input(stack, rgb=False)
    seen = []
    options = _tasks.RunOptions(channel_axis=axis, slices=True, return_probabilities=True)
    result = _tasks.segment_one(PlaneSegmenter(), array, "A", options,
                                progress=lambda d, t: seen.append((d, t)))
    np.testing.assert_array_equal(_tasks.layer_labels(result.labels), stack.astype(np.uint8))
    assert seen == [(1, 3), (2, 3), (3, 3)] and result.routing == []
    assert result.probabilities.shape == (2, 12, 10, 3)  # model order (K, X, Y, Z)


def test_switch_maps_count_values_that_change_the_top1_expert():
    from training.inference import SegmentationResult

    def result(value, experts):
        experts = np.asarray(experts)
        gates = np.stack([(experts == e).astype(np.float32) for e in range(3)])
        return SegmentationResult(np.zeros((2, 2), int), value, ["bg", "fg"],
                                  [RoutingMap("encoder.block0", gates, (1.0, 1.0), (0, 0))])

    results = {"A": result("A", [[0, 1], [2, 2]]), "B": result("B", [[0, 1], [2, 2]]),
               "unknown": result("unknown", [[1, 1], [2, 0]])}
    same, = _tasks.switch_maps({"A": results["A"], "B": results["B"]}, "A")
    assert same["fraction"] == {"B": 0.0} and not same["count"].any()  # "empty" map
    item, = _tasks.switch_maps(results, "A")
    np.testing.assert_array_equal(item["count"], [[1, 0], [0, 1]])
    assert item["fraction"] == {"B": 0.0, "unknown": 0.5}
    with pytest.raises(ValueError, match="'C'"):
        _tasks.switch_maps(results, "C")


def test_probability_maps():
    p = np.array([[[1.0, 0.5]], [[0.0, 0.5]]])  # (K=2, 1, 2)
    np.testing.assert_allclose(_tasks.probability_map(p, "max"), [[1.0, 0.5]])
    np.testing.assert_allclose(_tasks.probability_map(p, "entropy"), [[0.0, 1.0]], atol=1e-6)
    with pytest.raises(ValueError, match="'median'"):
        _tasks.probability_map(p, "median")
