"""Fixtures for the training tests: a disk that fills up in the middle of a write; a CLI
run refused because its ``--out`` holds an earlier run; a tiny fundus dMoE checkpoint."""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

import pytest


class _HalfWrite:
    """A file opened for writing whose first ``write`` stores half of its data, then fails
    as a full disk does (``OSError`` ENOSPC): the file is left torn."""

    def __init__(self, file) -> None:
        self._file = file

    def write(self, data):
        self._file.write(data[: len(data) // 2])
        self._file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()


@pytest.fixture
def disk_fills(monkeypatch):
    """``disk_fills(path)``: from then on, a write of ``path`` (or of a temporary file beside
    it named ``.<name>.…``) stores half its bytes and raises ENOSPC, whoever opens the file
    (``open``, ``Path.write_text``, csv, Pillow under matplotlib's ``savefig``). Other files
    are written normally."""
    real_open = builtins.open
    targets: list[Path] = []

    def hit(file) -> bool:
        if not isinstance(file, (str, bytes, os.PathLike)):
            return False
        p = Path(os.fsdecode(file)).resolve()
        return any(p.parent == t.parent and (p.name == t.name or p.name.startswith(f".{t.name}."))
                   for t in targets)

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+") and hit(file):
            return _HalfWrite(f)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    return lambda path: targets.append(Path(path).resolve())


def write_files(folder: Path, files: dict[str, bytes]) -> dict[str, bytes]:
    """Write ``files`` (name -> bytes) into ``folder``; returns ``files``."""
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


@pytest.fixture
def refused_before_loading(monkeypatch, capsys):
    """``refused_before_loading(main, argv) -> stderr``: run the CLI ``main(argv)``, assert
    it exits with 2 without loading a checkpoint, and return what it printed to stderr."""
    from training.inference import Segmenter

    def run(main, argv: list[str]) -> str:
        with monkeypatch.context() as m:
            m.setattr(Segmenter, "from_checkpoint", classmethod(lambda *a, **k: 1 / 0))
            with pytest.raises(SystemExit) as info:
                main(argv)
        assert info.value.code == 2
        return capsys.readouterr().err
    return run


@pytest.fixture(scope="module")
def fundus_checkpoint(tmp_path_factory) -> Path:
    """A tiny untrained 2D dMoE (TransUNet, 32 px, one block) saved as a checkpoint with
    the race attribute (Asian, Black, White) and classes background, rim, cup."""
    import torch

    from training.checkpoint import save_checkpoint
    from training.data import Preprocessing
    from training.networks import create_model

    torch.manual_seed(0)
    model = create_model("transunet", preset="tiny", in_channels=1, out_channels=3,
                         moe="dmoe", num_attributes=3, img_size=32, depth=1)
    race = {"name": "race", "vocabulary": ["Asian", "Black", "White"], "unknown_router": True}
    path = tmp_path_factory.mktemp("ckpt") / "fundus.safetensors"
    save_checkpoint(model, path, class_names=["background", "rim", "cup"], attribute=race,
                    preprocessing=Preprocessing(spatial_dims=2, image_size=(32, 32),
                                                in_channels=1).to_dict())
    return path
