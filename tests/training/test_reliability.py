"""Bad inputs and faults (issue 12): each ends in a clear message naming the file or case,
before any work, and nothing the user had is lost. docs/reliability.md lists these cases;
each row there names the test here that keeps it true."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.checkpoint import (
    CheckpointWriteError,
    atomic_write_bytes,
    load_checkpoint,
    save_checkpoint,
    temp_files,
)
from training.data import DataError, make_synthetic_dataset, validate_cases
from training.data.io import read_image, read_label
from training.data.manifest import read_manifest
from training.networks import create_model
from training.run_folder import LOCK_NAME, RunFolderError, open_run_folder


# -- datasets -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fundus_src(tmp_path_factory):
    return make_synthetic_dataset("fundus", tmp_path_factory.mktemp("fundus"), n=9, seed=2)


@pytest.fixture
def fundus(fundus_src, tmp_path):
    """A private copy of a 9-case 3-class PNG manifest (background, rim, cup)."""
    shutil.copytree(fundus_src.parent, tmp_path / "data")
    return tmp_path / "data" / "manifest.csv"


def _cases(manifest):
    return read_manifest(manifest)


def _case_file(manifest, split: str, column: str = "image") -> Path:
    case = next(c for c in _cases(manifest) if c.split == split)
    return getattr(case, column)


def _as_npy(manifest: Path, split: str, change) -> str:
    """Replace one image of ``split`` by a float .npy changed by ``change``; returns its id."""
    rows = manifest.read_text().splitlines()
    for i, row in enumerate(rows[1:], start=1):
        image, label, row_split, case_id, race = row.split(",")
        if row_split == split:
            arr = np.asarray(Image.open(manifest.parent / image), dtype=np.float32)
            arr = change(arr)
            np.save(manifest.parent / f"images/{case_id}.npy", arr)
            if arr.shape[:2] != np.asarray(Image.open(manifest.parent / label)).shape:
                Image.fromarray(np.zeros(arr.shape[:2], np.uint8)).save(manifest.parent / label)
            rows[i] = ",".join([f"images/{case_id}.npy", label, row_split, case_id, race])
            manifest.write_text("\n".join(rows) + "\n")
            return case_id
    raise AssertionError(split)


def _nan(a):
    a = a.copy()
    a[3, 4] = np.nan
    return a


def _inf(a):
    a = a.copy()
    a[0, 0] = np.inf
    return a


@pytest.mark.parametrize(("split", "change", "words"), [
    ("train", _nan, "NaN or infinite"),
    ("val", _inf, "NaN or infinite"),
    ("train", lambda a: a[:3, :3], "smaller than 8 pixels"),
])
def test_bad_pixels_are_refused_before_training_naming_the_case(fundus, split, change, words):
    case_id = _as_npy(fundus, split, change)
    with pytest.raises(DataError, match=words) as err:
        validate_cases(_cases(fundus), "race", num_classes=3, spatial_dims=2,
                       splits=("train", "val"))
    assert case_id in str(err.value)


def test_fit_stops_on_a_nan_image_before_any_epoch(fundus, tmp_path, capsys):
    from training import fit as fit_cli

    case_id = _as_npy(fundus, "train", _nan)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        fit_cli.main(["--data", str(fundus), "--attribute", "race", "--epochs", "1",
                      "--image-size", "32", "--out", str(out), "--quiet", "--arch", "resunet"])
    assert exc.value.code == 2
    assert case_id in capsys.readouterr().err
    assert not (out / "last.safetensors").exists() and not (out / LOCK_NAME).exists()


def _binary_255(label_path: Path) -> None:
    mask = np.asarray(Image.open(label_path))
    Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8)).save(label_path)


def test_0_255_mask_in_a_multiclass_dataset_is_refused_not_remapped(fundus):
    label = _case_file(fundus, "train", "label")
    _binary_255(label)
    with pytest.raises(DataError, match="only 0 and 255") as err:
        validate_cases(_cases(fundus), "race", spatial_dims=2)
    assert label.name in str(err.value)


def test_0_255_masks_in_a_binary_dataset_are_accepted(fundus):
    for case in _cases(fundus):
        _binary_255(case.label)
    summary = validate_cases(_cases(fundus), "race", spatial_dims=2)
    assert summary["max_label"] == 1
    assert set(np.unique(read_label(case.label))) <= {0, 1}


def test_truncated_png_names_the_file(fundus):
    image = _case_file(fundus, "val")
    raw = image.read_bytes()
    image.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="damaged, truncated") as err:
        validate_cases(_cases(fundus), "race", spatial_dims=2)
    assert image.name in str(err.value)
    with pytest.raises(DataError, match=image.name):
        read_image(image)


def test_latin1_manifest_is_refused_naming_the_file_and_utf8(fundus):
    text = fundus.read_text().replace("White", "Blanc\u00e9")
    fundus.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8.*Save it as UTF-8") as err:
        read_manifest(fundus)
    assert str(fundus) in str(err.value)


# -- FairSeg npz ----------------------------------------------------------------------------
def _fairseg(path: Path, image_side=64, mask_side=64) -> Path:
    np.savez(path, slo_fundus=np.zeros((image_side, image_side), np.uint8),
             disc_cup_mask=np.zeros((mask_side, mask_side), np.int8), race=np.array(2))
    return path


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_fairseg_npz_names_the_file(tmp_path, damage):
    path = _fairseg(tmp_path / "data_00001.npz")
    raw = path.read_bytes()
    path.write_bytes(b"" if damage == "empty" else raw[: len(raw) // 2])
    with pytest.raises(DataError, match="data_00001.npz"):
        read_image(path)
    with pytest.raises(DataError, match="data_00001.npz"):
        read_label(path)


def test_fairseg_mask_of_another_shape_is_refused(tmp_path):
    from training.data import Case

    path = _fairseg(tmp_path / "data_00002.npz", 64, 10)
    case = Case(id="data_00002", image=path, label=path, attributes={"race": "White"},
                split="train", image_key="slo_fundus", label_key="disc_cup_mask")
    shapes = r"(?s)different spatial shape.*\(64, 64\) vs mask \(10, 10\)"
    with pytest.raises(DataError, match=shapes):
        validate_cases([case], "race", spatial_dims=2)


# -- NIfTI ----------------------------------------------------------------------------------
def _nifti(path: Path, shape=(16, 16, 8), zooms=(1.0, 1.0, 2.0)) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(np.zeros(shape, np.int16), np.diag([*zooms, 1.0]))
    img.header.set_zooms(zooms)
    nib.save(img, str(path))
    return path


def test_nifti_with_nan_spacing_is_refused(tmp_path):
    path = _nifti(tmp_path / "ct.nii.gz")
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[80:84] = struct.pack("<f", float("nan"))  # pixdim[1]
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="voxel spacing.*not a positive number") as err:
        read_image(path)
    assert "ct.nii.gz" in str(err.value)


def test_nifti_header_claiming_30000_cubed_is_refused_before_allocating(tmp_path):
    path = _nifti(tmp_path / "huge.nii.gz")
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[40:56] = struct.pack("<8h", 3, 30000, 30000, 30000, 1, 1, 1, 1)  # dim[0..7]
    path.write_bytes(gzip.compress(bytes(raw)))
    start = time.perf_counter()
    with pytest.raises(DataError, match="30000×30000×30000") as err:
        read_image(path)
    assert time.perf_counter() - start < 5
    assert "huge.nii.gz" in str(err.value) and "GiB" in str(err.value)


def test_truncated_nifti_names_the_file(tmp_path):
    path = _nifti(tmp_path / "cut.nii.gz", shape=(64, 64, 32))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cut.nii.gz"):
        read_image(path)


# -- checkpoints ----------------------------------------------------------------------------
def _checkpoint(path: Path, **changes) -> Path:
    from training.data import Preprocessing

    model = create_model("transunet", preset="tiny", spatial_dims=2, in_channels=1,
                         out_channels=3, num_attributes=3, moe="dmoe", embed_dim=32, depth=1,
                         num_heads=2)
    meta = {"class_names": ["background", "rim", "cup"],
            "attribute": {"name": "race", "vocabulary": ["Asian", "Black", "White"],
                          "unknown_router": True},
            "preprocessing": Preprocessing(spatial_dims=2, image_size=(32, 32)).to_dict()}
    save_checkpoint(model, path, **meta)
    if changes:
        _edit_metadata(path, changes)
    return path


def _edit_metadata(path: Path, changes) -> None:
    """Rewrite the JSON metadata in place (a hand-edited or forged file)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = json.loads(header["__metadata__"]["napari_dmoe"])
    changes(meta) if callable(changes) else meta.update(changes)
    header["__metadata__"]["napari_dmoe"] = json.dumps(meta)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _set_kwarg(key, value):
    def change(meta):
        meta["model"]["kwargs"][key] = value
    return change


def _set_pre(key, value):
    def change(meta):
        meta["preprocessing"][key] = value
    return change


@pytest.mark.parametrize(("change", "field"), [
    ({"class_names": ["background", "disc"]}, "'class_names'"),
    ({"attribute": {"name": "race", "vocabulary": ["Asian", "Black"], "unknown_router": True}},
     "'attribute.vocabulary'"),
    (_set_pre("in_channels", 3), "'preprocessing.in_channels'"),
])
def test_metadata_disagreeing_with_the_network_is_refused_naming_the_field(tmp_path, change,
                                                                            field):
    path = _checkpoint(tmp_path / "m.safetensors")
    _edit_metadata(path, change)
    with pytest.raises(ValueError, match=field) as err:
        load_checkpoint(path)
    assert "m.safetensors" in str(err.value) and "image" not in str(err.value)


@pytest.mark.parametrize("embed_dim", [2048, 10**6])
def test_forged_embed_dim_is_refused_before_allocating(tmp_path, embed_dim):
    path = _checkpoint(tmp_path / "m.safetensors")
    _edit_metadata(path, _set_kwarg("embed_dim", embed_dim))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="m.safetensors") as err:
        load_checkpoint(path)
    assert time.perf_counter() - start < 5
    assert "shape" in str(err.value) or "cannot rebuild" in str(err.value)


def test_tensor_shape_mismatch_names_the_key(tmp_path):
    path = _checkpoint(tmp_path / "m.safetensors")
    _edit_metadata(path, _set_kwarg("out_channels", 4))
    _edit_metadata(path, {"class_names": ["a", "b", "c", "d"]})
    with pytest.raises(ValueError, match=r"shape: .*file \(3,.*vs model \(4,"):
        load_checkpoint(path)


def test_unseen_or_miscased_attribute_value_warns_with_the_close_match(tmp_path):
    from training.inference import Segmenter

    seg = Segmenter.from_checkpoint(_checkpoint(tmp_path / "m.safetensors"), device="cpu")
    lines = seg.unseen_values(["White", "white", "", "Martian", "white"])
    assert len(lines) == 2
    assert "'white'" in lines[0] and "did you mean 'White'" in lines[0]
    assert "'Martian'" in lines[1] and "unknown" in lines[1]


def test_unseen_combination_names_the_unknown_part_not_another_group(tmp_path):
    from training.inference import Segmenter

    seg = Segmenter.from_checkpoint(_checkpoint(tmp_path / "m.safetensors"), device="cpu")
    # as a checkpoint trained with --attribute race,gender (one router per combination)
    seg.attribute_name = "race,gender"
    seg.vocabulary = ["Asian|male", "Black|male", "White|female", "White|male"]
    new, miscased, wrong_shape = seg.unseen_values(["Black|female", "black|male", "Black"])
    assert "not this combination" in new and "did you mean" not in new  # not 'Black|male'
    assert "race 'black' is not a known value" in miscased
    assert "did you mean 'Black'" in miscased and "gender 'male'" not in miscased
    assert "one value per attribute" in wrong_shape and "routed as unknown" in wrong_shape


def test_predict_warns_on_the_console_about_an_unseen_value(tmp_path, capsys):
    from training import predict as predict_cli

    ckpt = _checkpoint(tmp_path / "m.safetensors")
    image = tmp_path / "in" / "scan.png"
    image.parent.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    predict_cli.main(["--checkpoint", str(ckpt), "--image", str(image), "--attribute-value",
                      "white", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert "did you mean 'White'" in capsys.readouterr().out


# -- outputs never replace inputs -------------------------------------------------------------
@pytest.mark.parametrize("link", [False, True])
def test_predict_refuses_to_write_over_its_input(tmp_path, capsys, link):
    from training import predict as predict_cli

    ckpt = _checkpoint(tmp_path / "m.safetensors")
    folder = tmp_path / "scans"
    folder.mkdir()
    image = folder / "scan.png"
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(image)
    before = image.read_bytes()
    out = folder
    if link:  # the output folder is another path to the same folder
        out = tmp_path / "alias"
        out.symlink_to(folder)
    with pytest.raises(SystemExit) as exc:
        predict_cli.main(["--checkpoint", str(ckpt), "--image", str(image), "--out", str(out),
                          "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "refusing to write" in err and "scan.png" in err and "--out" in err
    assert image.read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["scan.png"]


# -- run folder ---------------------------------------------------------------------------
def test_run_folder_refuses_a_run_without_resume_or_overwrite(tmp_path):
    (tmp_path / "best.safetensors").write_bytes(b"x")
    with pytest.raises(RunFolderError, match="--resume.*--overwrite") as err:
        open_run_folder(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert (tmp_path / "best.safetensors").read_bytes() == b"x"
    with open_run_folder(tmp_path, overwrite=True) as folder:
        assert not (tmp_path / "best.safetensors").exists()
        assert any("--overwrite" in n for n in folder.notes)
    with pytest.raises(ValueError, match="exclude each other"):
        open_run_folder(tmp_path, resume=True, overwrite=True)


def test_second_fit_on_a_locked_folder_names_the_holder(tmp_path):
    import socket

    with open_run_folder(tmp_path):
        with pytest.raises(RunFolderError, match=f"process {os.getpid()} on "
                                                 f"{socket.gethostname()}"):
            open_run_folder(tmp_path, resume=True)
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_of_a_killed_fit_is_taken_over_and_temp_files_removed(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": int(dead), "token": "x",
                                                  "host": socket.gethostname()}))
    torn = tmp_path / ".last.safetensors.abcd1234.tmp"
    torn.write_bytes(b"half")
    keep = tmp_path / "notes.tmp"  # not ours: kept
    keep.write_text("mine")
    with open_run_folder(tmp_path, resume=True) as folder:
        assert any("stale lock" in n for n in folder.notes)
        assert any(".last.safetensors.abcd1234.tmp" in n for n in folder.notes)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not torn.exists() and keep.exists()


# -- disk full --------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["oserror", "safetensors"])
def test_disk_full_during_a_write_keeps_the_old_file(tmp_path, how):
    path = tmp_path / "best.safetensors"
    path.write_bytes(b"old")

    class SafetensorError(Exception):
        pass

    def write(tmp):
        Path(tmp).write_bytes(b"partial")
        if how == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: "
                              "StorageFull, message: \"No space left on device\" })")

    with pytest.raises(CheckpointWriteError, match="no space left.*previous best.safetensors "
                                                   "is unchanged"):
        atomic_write_bytes(path, write)
    assert path.read_bytes() == b"old" and temp_files(tmp_path) == []


def test_fit_reports_disk_full_and_keeps_the_last_epoch(fundus_src, tmp_path, capsys,
                                                        monkeypatch):
    from training import fit as fit_cli
    from training.train_state import verify_last_pair

    out = tmp_path / "run"
    args = ["--data", str(fundus_src), "--attribute", "race", "--image-size", "32",
            "--out", str(out), "--quiet", "--batch-size", "4",
            "--model-kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}']
    fit_cli.main([*args, "--epochs", "1"])
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SystemExit) as exc:
        fit_cli.main([*args, "--epochs", "2", "--resume"])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert exc.value.code == 4
    assert "no space left on the device" in capsys.readouterr().err
    assert verify_last_pair(out).epoch == 1 and temp_files(out) == []
    assert not (out / LOCK_NAME).exists()
    assert fit_cli.main([*args, "--epochs", "2", "--resume"]).epochs_run == 2


def test_disk_full_while_fit_writes_config_yaml_keeps_the_earlier_one(fundus_src, tmp_path,
                                                                      capsys, disk_fills):
    """config.yaml is written atomically like the checkpoints: a resumed fit that cannot
    write it exits 4 with the earlier file whole (a plain write left it torn)."""
    from training import fit as fit_cli

    out = tmp_path / "run"
    args = ["--data", str(fundus_src), "--attribute", "race", "--image-size", "32",
            "--out", str(out), "--quiet", "--batch-size", "4",
            "--model-kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}']
    fit_cli.main([*args, "--epochs", "1"])
    before = (out / "config.yaml").read_bytes()
    disk_fills(out / "config.yaml")
    with pytest.raises(SystemExit) as exc:
        fit_cli.main([*args, "--epochs", "2", "--resume"])
    assert exc.value.code == 4
    assert "cannot write" in capsys.readouterr().err
    assert (out / "config.yaml").read_bytes() == before and temp_files(out) == []


def test_fit_refuses_a_folder_locked_by_a_live_process(fundus_src, tmp_path, capsys):
    import socket

    from training import fit as fit_cli

    out = tmp_path / "run"
    out.mkdir()
    holder = os.getppid()  # alive, on this host, and not this process
    (out / LOCK_NAME).write_text(json.dumps({"pid": holder, "host": socket.gethostname(),
                                             "started": "2026-01-01T00:00:00", "token": "t"}))
    with pytest.raises(SystemExit) as exc:
        fit_cli.main(["--data", str(fundus_src), "--attribute", "race", "--epochs", "1",
                      "--out", str(out), "--quiet", "--resume"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"process {holder} on {socket.gethostname()}" in err and "in use" in err
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder  # not taken over


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_damaged_npz_in_a_fairseg_folder_names_the_file(tmp_path, damage):
    from training.data.fairseg import read_fairseg

    good = _fairseg(tmp_path / "data_00001.npz")
    bad = _fairseg(tmp_path / "data_00002.npz")
    raw = bad.read_bytes()
    bad.write_bytes(b"" if damage == "empty" else raw[: len(raw) // 3])
    (tmp_path / "train.txt").write_text(f"{good.name}\n{bad.name}\n")
    with pytest.raises(DataError, match="data_00002.npz.*Re-download"):
        read_fairseg(tmp_path)


@pytest.mark.parametrize("where", ["data folder", "parent of the data"])
def test_fit_refuses_an_out_that_holds_the_training_data(tmp_path, where):
    from training.run_folder import RunFolderError, refuse_data_inside

    data = tmp_path / "project" / "data"
    data.mkdir(parents=True)
    (data / "manifest.csv").write_text("image,label\n")
    (data / "config.yaml").write_text("mine: 1\n")
    out = data if where == "data folder" else tmp_path / "project"
    with pytest.raises(RunFolderError, match="holds the training data") as err:
        refuse_data_inside(out, data / "manifest.csv")
    assert "outside the data folder" in str(err.value)
    refuse_data_inside(tmp_path / "runs" / "a", data / "manifest.csv")  # elsewhere: fine
    assert (data / "config.yaml").read_text() == "mine: 1\n"


def test_fit_cli_refuses_out_equal_to_the_data_folder(tmp_path, capsys):
    from training import fit as fit_cli
    from training.data import make_synthetic_dataset

    manifest = make_synthetic_dataset("fundus", tmp_path / "data", n=12, seed=0)
    before = sorted(p.name for p in manifest.parent.iterdir())
    with pytest.raises(SystemExit) as err:
        fit_cli.main(["--data", str(manifest), "--attribute", "race", "--out",
                      str(manifest.parent), "--epochs", "1"])
    assert err.value.code == 2 and "holds the training data" in capsys.readouterr().err
    assert sorted(p.name for p in manifest.parent.iterdir()) == before
