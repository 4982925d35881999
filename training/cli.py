"""Shared CLI plumbing: ``--config file.yaml`` defaults and YAML output (``config.yaml``,
written atomically)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML",
                        help="YAML file whose keys (flag names, - or _) set defaults; "
                             "flags on the command line win")


def add_checkpoint_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by the CLIs that run a checkpoint over a dataset split."""
    parser.add_argument("--checkpoint", help="a .safetensors checkpoint from training.fit")
    parser.add_argument("--data", help="manifest.csv or dataset folder")
    parser.add_argument("--format", choices=["manifest", "fairseg", "ham10000"])
    parser.add_argument("--split", default="test", help="train, val, test or all (default test)")
    parser.add_argument("--allow-changed-data", action="store_true",
                        help="use data whose manifest hash differs from the checkpoint's "
                             "(refused by default: the splits may have changed)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files an earlier run wrote in --out (refused "
                             "without it); other files there are never touched")


def parse_with_config(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, required: Sequence[str] = ()
) -> argparse.Namespace:
    """Parse ``argv``; values from ``--config`` replace defaults before the real parse.

    ``required`` names options that must come from either place (argparse's own
    ``required=True`` would reject a value given only in the YAML file).
    """
    import yaml

    pre, _ = parser.parse_known_args(argv)
    if getattr(pre, "config", None):
        path = Path(pre.config)
        if not path.is_file():
            parser.error(f"--config {path}: no such file")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            parser.error(f"--config {path}: expected a mapping of option names to values")
        known = {a.dest for a in parser._actions}
        values = {str(k).replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"--config {path}: unknown options {unknown}")
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    for name in required:
        if getattr(args, name, None) in (None, ""):
            parser.error(f"--{name.replace('_', '-')} is required (on the command line or "
                         "in --config)")
    return args


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as block-style YAML (tuples become lists), atomically
    (``training.checkpoint.atomic_write_text``): a kill or a full disk leaves the earlier
    file or the new one, never a torn one.

    Raises:
        training.checkpoint.CheckpointWriteError: the write failed; the earlier file is
            unchanged.
    """
    import yaml

    from .checkpoint import atomic_write_text

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    atomic_write_text(path, yaml.safe_dump(plain(data), sort_keys=False))
