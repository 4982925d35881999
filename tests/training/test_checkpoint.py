"""Checkpoints: safetensors round trip, rebuilt from metadata; every bad file refused."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from training.checkpoint import load_checkpoint, read_header, save_checkpoint
from training.networks import create_model

META = dict(class_names=["background", "lesion"],
            attribute={"name": "age_group", "vocabulary": ["<20", ">=80"], "unknown_router": True},
            preprocessing={"spatial_dims": 2, "image_size": [32, 32]})


def _model(**kw):
    torch.manual_seed(0)
    args = dict(preset="tiny", in_channels=3, out_channels=2, moe="dmoe", num_attributes=2,
                embed_dim=32, depth=2, num_heads=2, img_size=32) | kw
    return create_model("transunet", **args)


@pytest.fixture
def saved(tmp_path):
    model = _model()
    with torch.no_grad():  # make the routers non-trivial so attributes matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = save_checkpoint(model, tmp_path / "m.safetensors", **META)
    return model.eval(), path


def test_round_trip_gives_identical_outputs(saved):
    model, path = saved
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    x = torch.rand(2, 3, 32, 32)
    attr = torch.tensor([0, -1])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, attr), model(x, attr), rtol=0, atol=0)
    assert meta["class_names"] == META["class_names"]
    assert meta["attribute"] == META["attribute"]
    assert meta["model"] == {"name": "transunet", "kwargs": model.model_kwargs}
    assert meta["spatial_dims"] == 2 and meta["in_channels"] == 3
    assert "torch" in meta["provenance"]["library_versions"]
    assert meta["provenance"]["date"]


def test_resunet_3d_round_trip(tmp_path):
    model = create_model("resunet", preset="tiny", spatial_dims=3, moe="moe").eval()
    path = save_checkpoint(model, tmp_path / "r.safetensors", preprocessing={})
    loaded, _ = load_checkpoint(path)
    x = torch.rand(1, 1, 64, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_write_is_atomic_and_leaves_no_temp_files(saved, tmp_path):
    model, path = saved
    before = path.read_bytes()
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(model, path, bad=object())  # fails before anything is written
    assert path.read_bytes() == before
    save_checkpoint(model, path, **META)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_pickle_is_refused_without_unpickling(tmp_path, saved):
    model, _ = saved
    zipped = tmp_path / "model.pt"
    torch.save(model.state_dict(), zipped)
    with pytest.raises(ValueError, match="pickle"):
        load_checkpoint(zipped)
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="pickle"):
        load_checkpoint(raw)


def test_truncated_file_is_refused(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated|not a safetensors|not a valid"):
            load_checkpoint(bad)


def test_foreign_safetensors_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a napari-dmoe checkpoint"):
        load_checkpoint(path)


def test_mismatched_tensors_are_refused(tmp_path, saved):
    model, path = saved
    meta, _ = read_header(path)
    text = json.dumps(meta)
    # same metadata, but tensors of a wider network
    other = _model(embed_dim=48).state_dict()
    bad = tmp_path / "mismatch.safetensors"
    save_file({k: v.contiguous() for k, v in other.items()}, bad, metadata={"napari_dmoe": text})
    with pytest.raises(ValueError, match="do not match.*shape"):
        load_checkpoint(bad)
    # a tensor missing
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    sd.pop(next(iter(sd)))
    save_file(sd, bad, metadata={"napari_dmoe": text})
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(bad)


def test_corrupt_header_and_metadata_are_refused(tmp_path, saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(bytes(data[:8]) + b"{" + b"x" * (n - 1) + bytes(data[8 + n:]))
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(garbled)
    meta, _ = read_header(path)
    meta["format_version"] = 99
    newer = tmp_path / "newer.safetensors"
    save_file({"w": torch.zeros(1)}, newer, metadata={"napari_dmoe": json.dumps(meta)})
    with pytest.raises(ValueError, match="format version"):
        load_checkpoint(newer)


def test_missing_file_and_plain_module(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="create_model"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_header_length_starting_with_pickle_byte_is_still_a_checkpoint(tmp_path):
    """A header length whose low byte is 0x80 (pickle's magic) must not look like a pickle."""
    model = _model()
    for pad in range(300):  # vary the metadata length until the header length is 0x..80
        path = save_checkpoint(model, tmp_path / "m.safetensors", **META, note="x" * pad)
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("could not produce a header length ending in 0x80")
    loaded, meta = load_checkpoint(path)
    assert meta["note"].startswith("x")


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2), dpi=50)
    FigureCanvasAgg(fig)
    fig.subplots().plot([0, 1], [1, 0])
    return fig


def test_atomic_text_and_figure_writes_give_the_bytes_of_a_plain_write(tmp_path):
    from training.checkpoint import atomic_savefig, atomic_write_text, temp_files

    text = "id,race\r\na,Weiß\r\n"  # CSV line ends kept with newline=""
    atomic_write_text(tmp_path / "a.csv", text, newline="")
    with open(tmp_path / "plain.csv", "w", encoding="utf-8", newline="") as f:
        f.write(text)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "plain.csv").read_bytes()
    fig = _figure()
    assert atomic_savefig(fig, tmp_path / "a.png") == tmp_path / "a.png"
    fig.savefig(tmp_path / "plain.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "plain.png").read_bytes()
    assert (atomic_savefig(fig, tmp_path / "a.svg")).read_bytes().startswith(b"<?xml")
    with pytest.raises(ValueError, match="format="):
        atomic_savefig(fig, tmp_path / "figure")
    assert temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "a.png", "a.svg",
                                                          "plain.csv", "plain.png"]


@pytest.mark.parametrize("kind", ["text", "figure"])
def test_a_text_or_figure_write_that_fails_halfway_keeps_the_earlier_file(tmp_path, kind,
                                                                          disk_fills):
    from training.checkpoint import CheckpointWriteError, atomic_savefig, atomic_write_text

    path = tmp_path / ("notes.md" if kind == "text" else "figure.png")
    path.write_bytes(b"earlier run")
    disk_fills(path)
    with pytest.raises(CheckpointWriteError, match=f"no space left.*previous {path.name} is "
                                                   "unchanged"):
        if kind == "text":
            atomic_write_text(path, "new text\n" * 1000)
        else:
            atomic_savefig(_figure(), path)
    assert path.read_bytes() == b"earlier run"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file
