"""Batch work for the widget, as generators a Qt worker runs (no Qt here).

- :func:`segment_folder`: a dataset (manifest / FairSeg / HAM10000 folder: every case) or a
  plain folder of images, segmented through ``training.predict.predict`` (the CLI's code
  path: label files in the input's format family and ``predictions.csv``).
- :func:`segment_layers`: every open image layer (arrays already in model order).
- :func:`dataset_routing`: ``training.routing.routing_report`` (JSON + figure).

All yield :class:`_tasks.Progress` and stop at the next item when ``cancel`` is set.
"""

from __future__ import annotations

import csv
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
    rows: list[Any] = field(default_factory=list)
    cancelled: bool = False


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


def segment_folder(checkpoint: Path, source: Path, out: Path, value: str, *,
                   device: str = "auto", cancel: threading.Event | None = None,
                   poll: float = 0.05) -> Generator[_tasks.Progress, None, BatchOutput]:
    """Segment a dataset folder/manifest (all cases, each with its own attribute value) or
    every image file of a plain folder (all as ``value``) into ``out``."""
    from ._compat import prepare_torch

    prepare_torch()
    from training.predict import predict

    cancel = cancel or threading.Event()
    check_folders(source if Path(source).is_dir() else Path(source).parent, out)
    yield _tasks.Progress(0, 0, value)
    if is_dataset(source):
        def whole(progress, should_cancel):
            return predict(checkpoint, out, data=source, split="all", device=device,
                           progress=progress)

        rows = yield from _tasks.run_in_thread(whole, cancel, "dataset", 1, 1, poll)
        return BatchOutput(list(rows))
    files = image_files(source)
    if not files:
        raise ValueError(f"{source} holds no image files ({', '.join(IMAGE_SUFFIXES)}) and "
                         "no manifest.csv; choose another folder.")
    attribute_value = None if value == _tasks.UNKNOWN else value

    def each(progress, should_cancel):
        rows = []
        for i, path in enumerate(files):
            if should_cancel():
                break
            rows += predict(checkpoint, out, image=path, attribute_value=attribute_value,
                            device=device)
            progress(i + 1, len(files))
        return rows

    rows = yield from _tasks.run_in_thread(each, cancel, value, 1, 1, poll)
    with open(Path(out) / "predictions.csv", "w", newline="") as f:  # all files, not the last
        writer = csv.DictWriter(f, fieldnames=["id", "attribute_value", "file"])
        writer.writeheader()
        writer.writerows(rows)
    return BatchOutput(rows, cancelled=len(rows) < len(files))


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
    """``training.routing.routing_report`` in a helper thread; None when cancelled."""
    from ._compat import prepare_torch

    prepare_torch()
    from training.inference import Cancelled
    from training.routing import routing_report

    cancel = cancel or threading.Event()

    def call(progress, should_cancel):
        return routing_report(checkpoint, data, out, split=split, device=device,
                              progress=progress, should_cancel=should_cancel)

    try:
        return (yield from _tasks.run_in_thread(call, cancel, "cases", 1, 1, poll))
    except Cancelled:
        return None
