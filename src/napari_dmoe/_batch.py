"""Batch work for the widget, as generators a Qt worker runs (no Qt here).

- :func:`segment_folder`: a dataset (manifest / FairSeg / HAM10000 folder: every case) or a
  plain folder of images, segmented through one ``training.predict.predict`` call (the
  CLI's code path: label files in the input's format family and ``predictions.csv``) with
  the model loaded once; Cancel stops it at the next case or 3D window, keeping the
  finished files (``predictions.csv`` lists exactly them). :func:`earlier_outputs` lists
  the files of an earlier run it would replace, so the widget can ask first; the run
  replaces them only with ``overwrite=True`` (otherwise ``predict`` refuses them).
- :func:`segment_layers`: every open image layer (arrays already in model order).
- :func:`dataset_routing`: ``training.routing.routing_report`` (JSON + figure).

All yield :class:`_tasks.Progress` and stop at the next item when ``cancel`` is set.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _tasks
from ._reader import file_suffix

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npz")


@dataclass
class BatchOutput:
    """What a batch job finished: ``rows`` (CSV rows or ``(layer, result)``) of ``total``."""

    rows: list[Any] = field(default_factory=list)
    cancelled: bool = False
    total: int | None = None


def check_folders(source: Path, out: Path) -> None:
    """Refuse an output folder that is, or is inside, the input folder."""
    source, out = Path(source).resolve(), Path(out).resolve()
    if out == source or source in out.parents:
        raise ValueError(f"The output folder {out} is inside the input folder {source}; "
                         "choose a folder outside it (outputs never go among the inputs).")


def is_dataset(source: Path) -> bool:
    from ._compat import prepare_torch

    prepare_torch()
    from training.data import DataError, detect_format

    try:
        detect_format(source)
    except DataError:
        return False
    return True


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and file_suffix(p) in IMAGE_SUFFIXES)


def earlier_outputs(source: Path, out: Path) -> list[Path]:
    """The files in ``out`` that :func:`segment_folder` of ``source`` would replace: label
    files with its cases' ids and suffixes, and ``predictions.csv`` (an earlier run's);
    reads only the dataset's listing (no image is decoded), so it is quick enough to call
    before starting.

    Raises:
        ValueError: the dataset cannot be read, or two images share an id (the message
            names them, as ``predict`` would).
    """
    from ._compat import prepare_torch

    prepare_torch()
    from training.data import load_cases
    from training.predict import existing_outputs, image_cases

    cases = load_cases(source) if is_dataset(source) else image_cases(image_files(source))
    return existing_outputs(cases, out)


def segment_folder(checkpoint: Path, source: Path, out: Path, value: str, *,
                   device: str = "auto", segmenter: Any = None,
                   cancel: threading.Event | None = None, poll: float = 0.05,
                   overwrite: bool = False) -> Generator[_tasks.Progress, None, BatchOutput]:
    """Segment a dataset folder/manifest (all cases, each with its own attribute value) or
    every image file of a plain folder (all as ``value``) into ``out``.

    ``segmenter``: the widget's already loaded model of ``checkpoint``, used when it runs on
    ``device`` (otherwise the checkpoint is loaded once, through the plugin's model cache).
    Progress is per case. On cancel the result has ``cancelled=True`` and the rows of the
    cases written (``predictions.csv`` lists exactly those). ``overwrite``: replace an
    earlier run's files in ``out`` (:func:`earlier_outputs`); without it ``predict``
    refuses them (ValueError naming them) before the model runs.
    """
    from ._compat import prepare_torch

    prepare_torch()
    from training.inference import Cancelled, resolve_device
    from training.predict import predict

    from ._models import load_segmenter

    cancel = cancel or threading.Event()
    check_folders(source if Path(source).is_dir() else Path(source).parent, out)
    yield _tasks.Progress(0, 0, value)
    if is_dataset(source):
        inputs: dict[str, Any] = {"data": source, "split": "all"}
        label = "each case's own value"
    else:
        files = image_files(source)
        if not files:
            raise ValueError(f"{source} holds no image files ({', '.join(IMAGE_SUFFIXES)}) "
                             "and no manifest.csv; choose another folder.")
        inputs = {"image": files, "attribute_value": None if value == _tasks.UNKNOWN else value}
        label = value

    def call(progress, should_cancel):
        seg = segmenter
        if seg is None or seg.device != resolve_device(device):
            seg = load_segmenter(checkpoint, device)
        return predict(checkpoint, out, device=device, progress=progress, segmenter=seg,
                       should_cancel=should_cancel, overwrite=overwrite, **inputs)

    try:
        rows = yield from _tasks.run_in_thread(call, cancel, label, 1, 1, poll)
    except Cancelled as exc:
        return BatchOutput(list(getattr(exc, "rows", [])), cancelled=True,
                           total=getattr(exc, "total", None))
    return BatchOutput(list(rows), total=len(rows))


def segment_layers(segmenter: Any, jobs: Sequence[tuple[Any, Any, int | None, str]], *,
                   cancel: threading.Event | None = None, poll: float = 0.05,
                   ) -> Generator[_tasks.Progress, None, BatchOutput]:
    """``jobs`` = ``[(layer, model-order array, channel axis, value)]`` -> ``[(layer, result)]``."""
    cancel = cancel or threading.Event()
    out = BatchOutput()
    for i, (layer, array, axis, value) in enumerate(jobs, start=1):
        if cancel.is_set():
            out.cancelled = True
            break
        options = _tasks.RunOptions(channel_axis=axis)
        run = yield from _tasks.segment_steps(segmenter, array, [value], options=options,
                                              cancel=cancel, poll=poll)
        if run.cancelled:
            out.cancelled = True
            break
        out.rows.append((layer, run.results[value]))
        yield _tasks.Progress(i, len(jobs), layer.name)
    return out


def dataset_routing(checkpoint: Path, data: Path, out: Path, split: str = "test", *,
                    device: str = "auto", cancel: threading.Event | None = None,
                    poll: float = 0.05) -> Generator[_tasks.Progress, None, Any]:
    """``training.routing.routing_report`` in a helper thread; None when cancelled.

    Data that differ from the checkpoint's training data (manifest hash) are accepted, as
    before the CLI checked them: the dialog has no ``--allow-changed-data`` to offer, and the
    bundled models' training data are not the user's (the figure's ``split`` may then
    include training cases)."""
    from ._compat import prepare_torch

    prepare_torch()
    from training.inference import Cancelled
    from training.routing import routing_report

    cancel = cancel or threading.Event()

    def call(progress, should_cancel):
        return routing_report(checkpoint, data, out, split=split, device=device,
                              progress=progress, should_cancel=should_cancel,
                              allow_changed_data=True)

    try:
        return (yield from _tasks.run_in_thread(call, cancel, "cases", 1, 1, poll))
    except Cancelled:
        return None
