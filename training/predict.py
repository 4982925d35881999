"""``python -m training.predict``: write label files for new images.

``--checkpoint CKPT (--data PATH [--split S] | --image FILE --attribute-value V) --out DIR``
writes one label file per case, named ``<id>`` + the input's extension family (``.png``
for png/jpg/npz, ``.tif``, ``.nii.gz`` with the input's affine and header, ``.npy``) at the
input's original size, and ``predictions.csv`` (id, attribute value used, file).
``--output-format nifti|tiff|png|dicom-seg|rtstruct`` chooses another family; DICOM series
inputs (a folder or a ``.dcm`` file) default to ``dicom-seg`` (``<id>.seg.dcm``, or
``<id>.rtstruct.dcm``), which reference the source series (training.data.dicom).

An ``--out`` that already holds a file this run would write (a label file with one of the
run's case ids and suffix, or ``predictions.csv``) is refused before the model is loaded,
unless ``--overwrite``: the listing counts as an output, so a run whose case ids are all new
is refused too when an earlier ``predictions.csv`` is there (it would be replaced, and
would no longer list the earlier files). :func:`existing_outputs` lists those files, for a
caller that wants to ask first. Other files in ``--out`` are never touched. While it
writes, ``--out`` is locked (``.napari-dmoe.lock``, as ``training.fit``'s run folder): a
second run into the same ``--out`` is refused (exit 2) naming the first (command, process,
host, start time); the lock of a killed run is taken over with a note.

From Python, :func:`predict` also takes several images at once, an already loaded
``Segmenter`` (no second load) and a ``should_cancel`` callback: a cancelled run keeps the
finished label files, lists exactly those in ``predictions.csv`` and raises
``training.inference.Cancelled`` with ``rows`` (those rows), ``total`` and ``out``. Each
label file is written under a temporary name and renamed when complete, so no
half-written output is left behind; the temporary files a killed run left
(``.predictions.csv.XXXXXXXX.tmp``, ``.<id><suffix>.XXXXXXXX<suffix>``) are deleted by the
next run that writes those names into the same ``--out``, which prints one line naming them.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .cli import add_checkpoint_data_arguments, add_config_argument, parse_with_config

OUTPUT_FORMATS = {"nifti": ".nii.gz", "tiff": ".tif", "png": ".png",
                  "dicom-seg": ".seg.dcm", "rtstruct": ".rtstruct.dcm"}
"""``--output-format`` choices and the suffix each writes."""

PREDICTIONS_CSV = "predictions.csv"
CSV_FIELDS = ("id", "attribute_value", "file")


def _cancelled(rows: list[dict[str, str]], total: int, out: Path) -> Exception:
    """``training.inference.Cancelled`` carrying ``rows`` (written), ``total`` and ``out``."""
    from .inference import Cancelled

    exc = Cancelled(f"cancelled after {len(rows)} of {total} case(s); their label files and "
                    f"{PREDICTIONS_CSV} are in {out}")
    exc.rows, exc.total, exc.out = rows, total, out
    return exc


def _write_prediction(case, labels, meta, result, seg, checkpoint: Path, out: Path,
                      output_format: str | None) -> Path:
    """One label file for one case in ``output_format`` (None: the input's family)."""
    from .data import write_label
    from .data.io import DICOM_SUFFIX

    if output_format is None and meta.get("suffix") == DICOM_SUFFIX:
        output_format = "dicom-seg"
    if output_format not in (None, *OUTPUT_FORMATS):
        raise ValueError(f"output format {output_format!r}: use one of "
                         f"{', '.join(OUTPUT_FORMATS)}")
    from .checkpoint import atomic_write_bytes

    suffix = _planned_suffix(case, output_format)

    def write(tmp: str) -> None:  # the writers pick the format from the suffix
        partial = Path(tmp)
        if output_format not in ("dicom-seg", "rtstruct"):
            write_label(partial, labels, meta)
            return
        from .data.dicom import software_version, write_dicom_seg, write_rtstruct

        writer = write_dicom_seg if output_format == "dicom-seg" else write_rtstruct
        partial.unlink()  # the DICOM writers refuse an existing file, even this empty one
        writer(labels, case.image, seg.class_names, partial, algorithm_name=checkpoint.stem,
               algorithm_version=software_version(), attribute=seg.attribute_name,
               attribute_value=result.attribute_value)

    return atomic_write_bytes(out / f"{case.id}{suffix}", write, temp_suffix=suffix)


def write_predictions_csv(out: Path, rows: Sequence[dict[str, str]]) -> Path:
    """``<out>/predictions.csv`` (id, attribute_value, file), replaced in one step."""
    from .checkpoint import atomic_write_bytes

    def write(partial: str) -> None:
        with open(partial, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write_bytes(Path(out) / PREDICTIONS_CSV, write)


def _list_written(out: Path, rows: Sequence[dict[str, str]]) -> None:
    """``predictions.csv`` of a cancelled run: the files written so far; when there are
    none, an existing ``predictions.csv`` (an earlier run's) is left as it was."""
    if rows or not (out / PREDICTIONS_CSV).exists():
        write_predictions_csv(out, rows)


def _planned_suffix(case, output_format: str | None) -> str:
    """The suffix :func:`_write_prediction` will use for ``case`` (before reading it)."""
    from .data import label_suffix_for
    from .data.io import is_dicom_image

    if output_format is None and is_dicom_image(case.image):
        output_format = "dicom-seg"
    return OUTPUT_FORMATS[output_format] if output_format else label_suffix_for(case.image)


def _planned(cases, output_format: str | None) -> dict[str, str]:
    """Every file a run of ``cases`` writes, ``predictions.csv`` first, then ``<id><suffix>``
    per case, each with the suffix its temporary file ends in (the label files' end in their
    own suffix, see :func:`_write_prediction`): ``{file name: temporary suffix}``."""
    from .checkpoint import TEMP_SUFFIX

    planned = {PREDICTIONS_CSV: TEMP_SUFFIX}
    for case in cases:
        suffix = _planned_suffix(case, output_format)
        planned[f"{case.id}{suffix}"] = suffix
    return planned


def _planned_outputs(cases, out: Path, output_format: str | None) -> list[Path]:
    """The paths of :func:`_planned`'s files in ``out``."""
    return [Path(out) / name for name in _planned(cases, output_format)]


def existing_outputs(cases, out: str | Path, output_format: str | None = None) -> list[Path]:
    """The files a :func:`predict` run of ``cases`` into ``out`` would replace:
    ``predictions.csv`` and each case's label file, those that already exist (an earlier
    run's), in that order.

    ``cases``: anything with ``id`` and ``image`` (``training.data.Case``, e.g. from
    :func:`image_cases` or ``training.data.load_cases``); no file is read.
    """
    return [p for p in _planned_outputs(cases, Path(out), output_format)
            if os.path.lexists(p)]


def image_cases(image: str | Path | Sequence[str | Path], attribute: str | None = None,
                attribute_value: str | None = None) -> list:
    """One ``training.data.Case`` per image file (or DICOM series folder), all with
    ``attribute_value``; the id is the file stem (a folder's name).

    Raises:
        ValueError: two images would be written under the same id.
    """
    from .data import Case, file_stem

    images = [image] if isinstance(image, (str, os.PathLike)) else list(image)
    cases, seen = [], {}
    for path in map(Path, images):
        case_id = path.name if path.is_dir() else file_stem(path)
        if case_id in seen:
            raise ValueError(f"{seen[case_id]} and {path} would both be written as "
                             f"{case_id}: rename one of them (nothing was written).")
        seen[case_id] = path
        cases.append(Case(id=case_id, image=path, label=None,
                          attributes={attribute or "attribute": attribute_value or ""}))
    return cases


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def check_outputs_spare_inputs(cases, out: Path, output_format: str | None = None) -> None:
    """Refuse before anything is written if an output file would replace an input file.

    Outputs are ``<out>/<id><suffix>`` per case and ``<out>/predictions.csv``; inputs are
    every case's image and label (same path, or the same file through a link).

    Raises:
        ValueError: naming the output, the input and the case, and suggesting another --out.
    """
    inputs = [(Path(p), c.id, kind) for c in cases
              for kind, p in (("image", c.image), ("label", c.label)) if p is not None]
    suggestion = out / "predictions"
    for target in _planned_outputs(cases, out, output_format):
        for source, case_id, kind in inputs:
            if _same_file(target, source):
                raise ValueError(
                    f"refusing to write {target}: it is the input {kind} {source} of case "
                    f"{case_id}, which the predicted mask would overwrite. Nothing was "
                    f"written; choose another --out (e.g. --out {suggestion}).")


def predict(checkpoint: str | Path, out: str | Path, *, data: str | Path | None = None,
            split: str = "test", image: str | Path | Sequence[str | Path] | None = None,
            attribute_value: str | None = None, format: str | None = None,
            device: str = "auto", progress=None, output_format: str | None = None,
            log=None, allow_changed_data: bool = False, segmenter=None,
            should_cancel: Callable[[], bool] | None = None,
            overwrite: bool = False) -> list[dict[str, str]]:
    """Segment a split of a dataset, or images, into label files; returns the CSV rows.

    3D masks are predicted from the volume and its affine and written on the input's grid
    with its affine; ``log(line)`` receives each conversion notice (``"<id>: ..."``).

    Args:
        image: one image file (or DICOM series folder) or a sequence of them, all segmented
            as ``attribute_value``; their ids (file stems) must differ.
        progress: ``progress(done, total)`` after each case is written.
        segmenter: an already loaded ``training.inference.Segmenter`` of ``checkpoint`` to
            use instead of loading it again (``checkpoint`` still names the outputs'
            algorithm and the dataset's recorded split).
        should_cancel: polled before each case and between 3D windows; True stops the run.
        overwrite: replace the files an earlier run left in ``out`` that this run writes
            (:func:`existing_outputs`); without it such a run is refused. Once ``out`` and
            the cases are accepted, ``out`` is locked until the last file is written
            (``training.run_folder.lock_outputs``) and the temporary files that killed
            writes of this run's file names left in ``out`` are deleted (one line naming
            them to ``log``, else printed).

    Raises:
        training.run_folder.RunFolderError: ``out`` holds files this run would write
            (:func:`existing_outputs`) and not ``overwrite``; raised before the model is
            loaded or any image decoded, nothing is written or deleted.
        training.run_folder.FolderInUseError: another run holds ``out``'s lock (it names
            the holder); nothing is written or deleted.
        training.inference.Cancelled: ``should_cancel`` said so. The finished cases' label
            files stay, ``predictions.csv`` lists exactly them, the case in progress is not
            written; the exception's ``rows``, ``total`` and ``out`` say what was written.
    """
    from .checkpoint import read_header
    from .data import validate_cases
    from .evaluate import checkpoint_split
    from .inference import Segmenter
    from .run_folder import lock_outputs, refuse_earlier_outputs

    if (data is None) == (image is None):
        raise ValueError("give either data (a dataset) or image (one file)")
    # the outputs are checked before the model is built or any image decoded: the cases
    # come from the checkpoint's header (its split and attribute) and the data's listing
    metadata = segmenter.metadata if segmenter is not None else read_header(checkpoint)[0]
    attribute = (metadata.get("attribute") or {}).get("name")
    if image is not None:
        cases = image_cases(image, attribute, attribute_value)
    else:
        cases = checkpoint_split(metadata, checkpoint, data, split, format=format,
                                 require_labels=False, allow_changed_data=allow_changed_data,
                                 validate=False)
    out = Path(out)
    check_outputs_spare_inputs(cases, out, output_format)
    if not overwrite:
        refuse_earlier_outputs(existing_outputs(cases, out, output_format), out)
    seg = segmenter if segmenter is not None else Segmenter.from_checkpoint(checkpoint,
                                                                            device=device)
    if data is not None:
        validate_cases(cases, None, spatial_dims=seg.spatial_dims, require_labels=False)
    if attribute:
        for line in seg.unseen_values(c.attributes.get(attribute, "") for c in cases):
            (log or print)(line)
    with lock_outputs(out, "training.predict", _planned(cases, output_format),
                      overwrite=overwrite, log=log or print):  # held while it writes
        return _segment_cases(cases, seg, Path(checkpoint), out, attribute, output_format,
                              progress=progress, log=log, should_cancel=should_cancel)


def _segment_cases(cases, seg, checkpoint: Path, out: Path, attribute: str | None,
                   output_format: str | None, *, progress=None, log=None,
                   should_cancel: Callable[[], bool] | None = None) -> list[dict[str, str]]:
    """:func:`predict`'s loop over accepted ``cases`` into the locked ``out``."""
    from .data import read_image
    from .inference import Cancelled

    cancel = should_cancel or (lambda: False)
    rows: list[dict[str, str]] = []
    try:
        for i, case in enumerate(cases):
            if cancel():
                raise Cancelled(f"cancelled before case {case.id}")
            img, meta = read_image(case.image, case.image_key, spatial_dims=seg.spatial_dims)
            value = case.attributes.get(attribute, "") if attribute else ""
            result = seg.segment(img, value or None, channel_axis=0,
                                 affine=meta.get("affine"), should_cancel=cancel)
            for line in result.notices if log else ():
                log(f"{case.id}: {line}")
            path = _write_prediction(case, result.labels, meta, result, seg, checkpoint,
                                     out, output_format)
            rows.append({"id": case.id, "attribute_value": result.attribute_value,
                         "file": path.name})
            if progress:
                progress(i + 1, len(cases))
    except Cancelled as exc:
        _list_written(out, rows)
        raise _cancelled(rows, len(cases), out) from exc
    except Exception:  # a case failed: the CSV still lists the files already written
        if rows:  # none: no empty listing (and an earlier run's stays as it was)
            write_predictions_csv(out, rows)
        raise
    write_predictions_csv(out, rows)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.predict",
                                description=__doc__.split("\n")[0])
    add_config_argument(p)
    add_checkpoint_data_arguments(p)
    p.add_argument("--image", help="one image file instead of --data")
    p.add_argument("--attribute-value", help="with --image: the patient's attribute value "
                                             "(omit for unknown)")
    p.add_argument("--output-format", choices=list(OUTPUT_FORMATS),
                   help="label file family (default: the input's; DICOM input -> dicom-seg)")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, str]]:
    parser = build_parser()
    args = parse_with_config(parser, argv, required=("checkpoint", "out"))
    if bool(args.data) == bool(args.image):
        parser.error("give exactly one of --data or --image")
    from .checkpoint import CheckpointWriteError
    from .data import DataError

    try:
        rows = predict(args.checkpoint, args.out, data=args.data, split=args.split,
                       image=args.image, attribute_value=args.attribute_value,
                       format=args.format, device=args.device,
                       output_format=args.output_format, log=print,
                       allow_changed_data=args.allow_changed_data,
                       overwrite=args.overwrite)
    except (DataError, ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    except CheckpointWriteError as exc:  # disk full, read-only folder: the message says which
        parser.exit(4, f"error: {exc}\n")
    print(f"wrote {len(rows)} label file(s) and predictions.csv to {args.out}")
    return rows


if __name__ == "__main__":
    main()
