"""``python -m training.evaluate``: per-group fairness evaluation of a checkpoint.

``--checkpoint CKPT --data PATH [--split test] --out DIR`` writes ``metrics.json``,
``per_case.csv``, ``report.md`` (the paper's table layout) and ``violin.png``.
``--compare DIR1 DIR2 …`` puts several evaluation outputs side by side in one markdown
table (rows = methods), printed and, with ``--out``, written to ``compare.md``.
An ``--out`` that already holds any of these files (an earlier evaluation's) is refused
before the model is loaded, unless ``--overwrite``; other files there are never touched.
While it writes, ``--out`` is locked (``.napari-dmoe.lock``, as ``training.fit``'s run
folder): a second run into the same ``--out`` is refused (exit 2) naming the first (command,
process, host, start time); the lock of a killed run is taken over with a printed note.
Each file is written under a temporary name and renamed when complete
(``training.checkpoint.atomic_write_text`` / ``atomic_savefig``): a kill or a full disk
(exit 4) leaves the earlier file or the new one, never a torn one; the temporary files a
killed run left (``.metrics.json.XXXXXXXX.tmp``, …) are deleted by the next run that
writes those names into the same ``--out``, which prints one line naming them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cli import add_checkpoint_data_arguments, add_config_argument, parse_with_config

OUTPUT_FILES = ("metrics.json", "per_case.csv", "report.md", "violin.png")
"""What :func:`evaluate` writes into ``out``."""
COMPARE_FILE = "compare.md"


@dataclass
class EvaluationResult:
    out: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]


def load_split(data: str | Path, split: str, *, format: str | None = None, seed: int = 0,
               val_fraction: float = 0.1, test_fraction: float = 0.1,
               require_labels: bool = True, attribute: str | None = None,
               spatial_dims: int | None = None, expected_hash: str | None = None,
               expected_cases: int | None = None, allow_changed_data: bool = False,
               checkpoint: str | Path | None = None, combine: str | None = None,
               validate: bool = True):
    """Cases of one split, checked. Splits missing from the data are assigned as in fit.

    With ``expected_hash`` (the checkpoint's ``data_manifest_hash``) and a split other than
    ``"all"``, data whose manifest hash differs are refused (DataError naming both hashes
    and the case counts) unless ``allow_changed_data``: changed data re-split silently
    could put training cases into the test split. ``validate=False`` skips reading the
    cases' files (``validate_cases``): the caller validates them later.
    """
    from .data import DataError, assign_splits, combine_attributes, load_cases, validate_cases

    cases = combine_attributes(load_cases(data, format), combine or attribute)  # "race,gender"
    cases = assign_splits(cases, val_fraction, test_fraction, seed=seed)
    change = (_changed_data(cases, data, expected_hash, expected_cases, checkpoint)
              if not allow_changed_data and split != "all" else None)
    if change:
        raise DataError(f"{change}, so the split may now mix training cases into it. Use the "
                        "original data, or pass --allow-changed-data to use them anyway (e.g. "
                        "a dataset that was only moved).")
    if split != "all":
        cases = [c for c in cases if c.split == split]
    if not cases:
        raise DataError(f"no cases in split {split!r} of {data}; use --split train|val|test|all")
    if validate:
        validate_cases(cases, attribute, spatial_dims=spatial_dims,
                       require_labels=require_labels)
    return cases


def _changed_data(cases, data: str | Path, expected_hash: str | None,
                  expected_cases: int | None, checkpoint: str | Path | None) -> str | None:
    """``"<data>: these data are not the data … trained on (…). Cases, files, splits or
    attributes changed"`` when the manifest hash of ``cases`` differs from
    ``expected_hash``; None when it is the same or nothing was recorded."""
    if not expected_hash:
        return None
    from .fitting.preparation import manifest_hash

    now = manifest_hash(cases)
    if now == expected_hash:
        return None
    then = f"{expected_cases} cases" if expected_cases else "an unrecorded number of cases"
    return (f"{data}: these data are not the data {checkpoint or 'the checkpoint'} was "
            f"trained on (manifest hash {now}, {len(cases)} cases; the checkpoint's "
            f"{expected_hash}, {then}). Cases, files, splits or attributes changed")


def _split_settings(metadata: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """The checkpoint's seed, split fractions, data hash and attribute, as
    :func:`load_split` takes them."""
    prov = metadata.get("provenance") or {}
    cfg = prov.get("config") or {}
    return {"seed": cfg.get("seed", seed), "val_fraction": cfg.get("val_fraction", 0.15),
            "test_fraction": cfg.get("test_fraction", 0.15),
            "expected_hash": prov.get("data_manifest_hash"),
            "expected_cases": prov.get("data_cases"),
            "combine": (metadata.get("attribute") or {}).get("name")}


def data_change(metadata: dict[str, Any], checkpoint: str | Path, data: str | Path, *,
                format: str | None = None) -> str | None:
    """Why ``data`` are not the data the checkpoint was trained on, or None when they are
    (or the checkpoint recorded no data hash): the sentence :func:`load_split` refuses them
    with, without its advice, for a caller that asks the user before passing
    ``allow_changed_data``. Reads only the data's listing (no image is decoded).

    ``metadata``: the checkpoint's (``Segmenter.metadata`` or
    ``training.checkpoint.read_header(checkpoint)[0]``).

    Raises:
        training.data.DataError: the data cannot be listed.
    """
    from .data import assign_splits, combine_attributes, load_cases

    settings = _split_settings(metadata)
    cases = combine_attributes(load_cases(data, format), settings["combine"])
    cases = assign_splits(cases, settings["val_fraction"], settings["test_fraction"],
                          seed=settings["seed"])
    return _changed_data(cases, data, settings["expected_hash"], settings["expected_cases"],
                         checkpoint)


def checkpoint_split(metadata: dict[str, Any], checkpoint: str | Path, data: str | Path,
                     split: str, *, format: str | None = None, allow_changed_data: bool = False,
                     require_labels: bool = True, attribute: str | None = None, seed: int = 0,
                     validate: bool = True):
    """:func:`load_split` with the checkpoint's seed, split fractions and data hash.

    ``metadata``: the checkpoint's metadata (``Segmenter.metadata``, or
    ``training.checkpoint.read_header(checkpoint)[0]`` before any model is loaded).
    """
    return load_split(data, split, format=format, require_labels=require_labels,
                      attribute=attribute,
                      spatial_dims=(metadata.get("preprocessing") or {}).get("spatial_dims"),
                      allow_changed_data=allow_changed_data, checkpoint=checkpoint,
                      validate=validate, **_split_settings(metadata, seed))


def evaluate(checkpoint: str | Path, data: str | Path, out: str | Path, *, split: str = "test",
             format: str | None = None, device: str = "auto", seed: int = 0,
             progress=None, allow_changed_data: bool = False,
             overwrite: bool = False) -> EvaluationResult:
    """Segment every case of ``split`` and write the fairness report into ``out``.

    Once ``out`` and the data are accepted, ``out`` is locked until the last file is
    written (``training.run_folder.lock_outputs``) and the temporary files that killed
    writes of :data:`OUTPUT_FILES` left in ``out`` are deleted (one printed line names them).

    Raises:
        training.run_folder.RunFolderError: ``out`` holds one of :data:`OUTPUT_FILES`
            (an earlier evaluation's) and not ``overwrite``; raised before the model is
            loaded, nothing is written or deleted.
        training.run_folder.FolderInUseError: another run holds ``out``'s lock (it names
            the holder); nothing is written or deleted.
    """
    from .checkpoint import TEMP_SUFFIX
    from .data import read_case
    from .engine import evaluate_cases
    from .inference import Segmenter
    from .run_folder import existing_files, lock_outputs, refuse_earlier_outputs

    out = Path(out)
    if not overwrite:
        refuse_earlier_outputs(existing_files(out, OUTPUT_FILES), out)
    seg = Segmenter.from_checkpoint(checkpoint, device=device)
    attribute = seg.attribute_name
    cases = checkpoint_split(seg.metadata, checkpoint, data, split, format=format, seed=seed,
                             allow_changed_data=allow_changed_data, attribute=attribute)
    with lock_outputs(out, "training.evaluate", dict.fromkeys(OUTPUT_FILES, TEMP_SUFFIX),
                      overwrite=overwrite):  # out and data accepted: held while it writes
        loaded = []
        for c in cases:
            image, label, meta = read_case(c, spatial_dims=seg.spatial_dims)
            loaded.append((c.id, image, label,
                           c.attributes.get(attribute, "") if attribute else "",
                           meta.get("affine")))
        for line in seg.unseen_values(v for _, _, _, v, _ in loaded):
            print(line, file=sys.stderr)
        fairness = evaluate_cases(seg, loaded, attribute, progress=progress)
        summary = fairness.summary()
        summary["checkpoint"] = str(checkpoint)
        summary["split"] = split
        if attribute and "," in attribute:  # intersectional: also per single attribute
            from .stats import single_attribute_summaries

            summary["by_attribute"] = single_attribute_summaries(fairness.records,
                                                                 seg.class_names, attribute)
        _write_outputs(out, summary, fairness.records, seg.class_names, attribute,
                       title=f"{Path(checkpoint).name} on {split} ({len(cases)} cases)")
    return EvaluationResult(out, summary, fairness.records)


def _write_outputs(out: Path, summary: dict[str, Any], records: list[dict[str, Any]],
                   class_names: list[str], attribute: str | None, title: str) -> None:
    """:data:`OUTPUT_FILES` into ``out``, each written atomically."""
    from .report import plot_violin, write_metrics_json, write_per_case_csv, write_report_md

    write_metrics_json(summary, out / "metrics.json")
    write_per_case_csv(records, class_names, attribute or "attribute", out / "per_case.csv")
    write_report_md(summary, out / "report.md", title=title)
    plot_violin(records, class_names, out / "violin.png")


def write_compare(dirs: list[Path], names: list[str] | None, out: str | Path | None = None,
                  *, overwrite: bool = False) -> str:
    """The ``--compare`` table of evaluation folders ``dirs``; with ``out``, also written
    to ``out/compare.md`` (an existing one only with ``overwrite``, checked first)."""
    from .checkpoint import TEMP_SUFFIX, atomic_write_text
    from .report import compare_markdown
    from .run_folder import existing_files, lock_outputs, refuse_earlier_outputs

    if out is not None and not overwrite:
        refuse_earlier_outputs(existing_files(out, [COMPARE_FILE]), out)
    table = compare_markdown(dirs, names)
    if out is not None:
        with lock_outputs(out, "training.evaluate --compare", {COMPARE_FILE: TEMP_SUFFIX},
                          overwrite=overwrite):
            atomic_write_text(Path(out) / COMPARE_FILE, table + "\n")
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate",
                                description=__doc__.split("\n")[0])
    add_config_argument(p)
    add_checkpoint_data_arguments(p)
    p.add_argument("--compare", nargs="+", metavar="DIR",
                   help="evaluation folders to put side by side (no model is run)")
    p.add_argument("--names", nargs="+", help="method names for --compare rows")
    return p


def main(argv: list[str] | None = None) -> EvaluationResult | str:
    parser = build_parser()
    args = parse_with_config(parser, argv)
    from .checkpoint import CheckpointWriteError
    from .data import DataError

    try:
        if args.compare:
            table = write_compare([Path(d) for d in args.compare], args.names,
                                  args.out or None, overwrite=args.overwrite)
            print(table)
            return table
        missing = [f"--{n}" for n in ("checkpoint", "data", "out") if not getattr(args, n)]
        if missing:
            parser.error(f"{', '.join(missing)} required (or --compare DIR ...)")
        result = evaluate(args.checkpoint, args.data, args.out, split=args.split,
                          format=args.format, device=args.device,
                          allow_changed_data=args.allow_changed_data,
                          overwrite=args.overwrite)
    except (DataError, ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    except CheckpointWriteError as exc:  # disk full, read-only folder: the message says which
        parser.exit(4, f"error: {exc}\n")
    mean = result.summary["mean"]
    print(f"{len(result.records)} cases: Dice {mean['dice']:.4f}  ES-Dice {mean['es_dice']:.4f}  "
          f"IoU {mean['iou']:.4f}  ES-IoU {mean['es_iou']:.4f}")
    for g, v in mean["groups"].items():
        print(f"  {g:>12} (n={v['n']}): Dice {v['dice']:.4f}  IoU {v['iou']:.4f}")
    print(f"wrote {result.out}/metrics.json, per_case.csv, report.md, violin.png")
    return result


if __name__ == "__main__":
    main()
