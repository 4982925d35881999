"""Batch work for the widget, as generators a Qt worker runs (no Qt here).

- :func:`segment_folder`: a dataset (manifest / FairSeg / HAM10000 folder: every case) or a
  plain folder of images, segmented through one ``training.predict.predict`` call (the
  CLI's code path: label files in the input's format family and ``predictions.csv``) with
  the model loaded once; Cancel stops it at the next case or 3D window, keeping the
  finished files (``predictions.csv`` lists exactly them). :func:`earlier_outputs` lists
  the files of an earlier run it would replace, so the widget can ask first; the run
  replaces them only with ``overwrite=True`` (otherwise ``predict`` refuses them).
- :func:`segment_layers`: every open image layer (arrays already in model order).
- :func:`dataset_routing`: ``training.routing.routing_report`` (JSON + figure);
  :func:`routing_data_change` says first whether the data differ from the model's training
  data, so the widget can ask before passing ``allow_changed_data``.

All yield :class:`_tasks.Progress` and stop at the next item when ``cancel`` is set.
``training`` locks an output folder while it writes into it; a folder another run holds is
refused with :func:`in_use_message` (before starting: :func:`refuse_folder_in_use`).
:class:`TemporaryFolders` makes the folders Dataset routing… writes into and removes them,
and only them.
"""

from __future__ import annotations

import shutil
import tempfile
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


def in_use_message(folder: Path, holder: dict[str, Any], lock: Path) -> str:
    """The refusal of an output folder another run is writing into (``holder``: its lock's
    JSON, ``training.run_folder.lock_holder``)."""
    from training.run_folder import describe_holder

    return (f"Nothing was written: {folder} is in use by another run "
            f"({describe_holder(holder)}). Wait for it to finish, or choose another output "
            f"folder. If no such run exists, delete {lock}.")


def refuse_folder_in_use(out: Path) -> None:
    """Raise ValueError (:func:`in_use_message`) when another run holds ``out``'s lock."""
    from ._compat import prepare_torch

    prepare_torch()
    from training.run_folder import LOCK_NAME, lock_holder

    holder = lock_holder(out)
    if holder is not None:
        raise ValueError(in_use_message(Path(out), holder, Path(out) / LOCK_NAME))


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
    from training.run_folder import FolderInUseError

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
    except FolderInUseError as exc:
        raise ValueError(in_use_message(exc.folder, exc.holder, exc.lock)) from None
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


def routing_data_change(checkpoint: Path, data: Path, split: str = "test",
                        metadata: dict[str, Any] | None = None) -> str | None:
    """Why ``data`` are not the data ``checkpoint`` was trained on (its recorded manifest
    hash differs), or None: then :func:`dataset_routing` needs ``allow_changed_data``.
    Always None for the split ``"all"`` (no split is claimed). Reads only the listing.

    Raises:
        ValueError: the data cannot be listed (the message names the problem).
    """
    if split == "all":
        return None
    from ._compat import prepare_torch

    prepare_torch()
    from training.checkpoint import read_header
    from training.evaluate import data_change

    metadata = metadata if metadata is not None else read_header(checkpoint)[0]
    return data_change(metadata, checkpoint, data)


def dataset_routing(checkpoint: Path, data: Path, out: Path, split: str = "test", *,
                    device: str = "auto", cancel: threading.Event | None = None,
                    poll: float = 0.05, allow_changed_data: bool = False,
                    ) -> Generator[_tasks.Progress, None, Any]:
    """``training.routing.routing_report`` in a helper thread; None when cancelled.

    Data that differ from the checkpoint's training data (:func:`routing_data_change`) are
    refused (``training.data.DataError``) unless ``allow_changed_data``: the caller asks
    the user first, since the split may then hold training cases."""
    from ._compat import prepare_torch

    prepare_torch()
    from training.inference import Cancelled
    from training.routing import routing_report
    from training.run_folder import FolderInUseError

    cancel = cancel or threading.Event()

    def call(progress, should_cancel):
        return routing_report(checkpoint, data, out, split=split, device=device,
                              progress=progress, should_cancel=should_cancel,
                              allow_changed_data=allow_changed_data)

    try:
        return (yield from _tasks.run_in_thread(call, cancel, "cases", 1, 1, poll))
    except Cancelled:
        return None
    except FolderInUseError as exc:
        raise ValueError(in_use_message(exc.folder, exc.holder, exc.lock)) from None


class TemporaryFolders:
    """Folders the plugin makes for its own outputs (Dataset routing…), removed when they
    are no longer shown. :meth:`remove` removes only a folder :meth:`make` made, so a
    folder the user chose is never removed."""

    def __init__(self, prefix: str = "napari-dmoe-") -> None:
        self.prefix = prefix
        self._made: set[Path] = set()

    def make(self, purpose: str) -> Path:
        """A new empty folder ``<tmp>/<prefix><purpose>-XXXXXXXX``."""
        folder = Path(tempfile.mkdtemp(prefix=f"{self.prefix}{purpose}-"))
        self._made.add(folder)
        return folder

    def owns(self, folder: Path) -> bool:
        return Path(folder) in self._made

    def remove(self, folder: Path) -> None:
        """Remove ``folder`` and its files if :meth:`make` made it; otherwise nothing."""
        folder = Path(folder)
        if folder in self._made:
            self._made.discard(folder)
            shutil.rmtree(folder, ignore_errors=True)

    def remove_all(self) -> None:
        for folder in list(self._made):
            self.remove(folder)
