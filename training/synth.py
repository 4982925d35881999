"""``python -m training.synth``: write a synthetic fairness dataset (generic manifest).

    python -m training.synth --kind fundus|skin|ct --out DIR [--n N] [--seed S] [--overwrite]

Groups differ in appearance and in contouring policy (see ``training.data.synthetic``);
the output feeds the tests, the plugin's sample data, the demo models and the README.
An ``--out`` that already holds a dataset is refused (exit 2, naming its files) unless
``--overwrite``, which replaces only a dataset training.synth wrote; every file is written
under a temporary name and renamed when complete, ``manifest.csv`` last. ``--out`` is
locked while it is written: a second synth (or any run) into it is refused.
"""

from __future__ import annotations

import argparse
import sys
import time

from training.checkpoint import CheckpointWriteError
from training.data.synthetic import ATTRIBUTE, DEFAULT_N, KINDS, make_synthetic_dataset
from training.run_folder import lock_folder


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.synth",
        description="Write a synthetic segmentation dataset with an imbalanced patient "
                    "attribute whose groups differ in appearance and contouring policy.")
    group = parser.add_argument_group("dataset")
    group.add_argument("--kind", required=True, choices=KINDS,
                       help="fundus: 2D gray, rim/cup, race; skin: 2D RGB, lesion, "
                            "age_group; ct: 3D NIfTI, tumour, t_stage; intersectional: "
                            "fundus whose policy depends on race AND gender "
                            "(--attribute race,gender)")
    group.add_argument("--out", required=True, help="output folder (manifest.csv goes here)")
    group.add_argument("--n", type=int, default=None,
                       help="number of cases (default: " + ", ".join(
                           f"{k} {v}" for k, v in DEFAULT_N.items()) + ")")
    group.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    group.add_argument("--overwrite", action="store_true",
                       help="replace the synthetic dataset already in --out (its manifest, "
                            "dataset.json and case files); refused without it")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and write the dataset; returns the exit code."""
    args = _parser().parse_args(argv)
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done == total or done % 25 == 0:
            print(f"\r{args.kind}: {done}/{total} cases", end="", file=sys.stderr, flush=True)

    try:
        with lock_folder(args.out, "training.synth"):
            manifest = make_synthetic_dataset(args.kind, args.out, n=args.n, seed=args.seed,
                                              progress=progress, overwrite=args.overwrite)
    except ValueError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 2
    except CheckpointWriteError as err:  # disk full, read-only folder: the message says which
        print(f"\nerror: {err}", file=sys.stderr)
        return 4
    print(f"\nwrote {manifest} ({time.perf_counter() - start:.1f} s); routing attribute: "
          f"--attribute {ATTRIBUTE[args.kind]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
