"""training.predict from Python: a given Segmenter (no second load), several images in one
call, cancel between cases and inside a 3D case (finished files kept, predictions.csv lists
exactly them, nothing half-written left), DICOM-SEG and RTSTRUCT outputs of a series, an
earlier run's files replaced only with overwrite."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image as PILImage

from training.data import make_synthetic_dataset
from training.inference import Cancelled, Segmenter
from training.predict import predict


def _save(path, model, class_names, attribute, preprocessing):
    from training.checkpoint import save_checkpoint
    from training.data import Preprocessing

    save_checkpoint(model, path, class_names=class_names, attribute=attribute,
                    preprocessing=Preprocessing(**preprocessing).to_dict())
    return path


@pytest.fixture(scope="module")
def ct_ckpt(tmp_path_factory):
    import torch

    from training.networks import create_model

    torch.manual_seed(0)
    model = create_model("resunet", preset="tiny", spatial_dims=3, in_channels=1,
                         out_channels=2, moe="dmoe", num_attributes=4, norm="batch",
                         channels=(4, 8, 8, 8, 8), final_channels=4)
    stages = {"name": "t_stage", "vocabulary": ["T1", "T2", "T3", "T4"], "unknown_router": True}
    return _save(tmp_path_factory.mktemp("ckpt3d") / "ct.safetensors", model,
                 ["background", "tumour"], stages,
                 dict(spatial_dims=3, patch_size=(32, 32, 32), intensity="ct_window",
                      ct_window=(-200.0, 300.0), in_channels=1))


@pytest.fixture(scope="module")
def fundus_data(tmp_path_factory):
    return make_synthetic_dataset("fundus", tmp_path_factory.mktemp("fundus"), n=9, seed=0)


@pytest.fixture()
def no_second_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded again")

    monkeypatch.setattr(Segmenter, "from_checkpoint", classmethod(refuse))


def csv_rows(out):
    return list(csv.DictReader(open(out / "predictions.csv")))


def test_given_segmenter_is_used_without_loading_the_checkpoint(fundus_checkpoint, fundus_data,
                                                               tmp_path, no_second_load):
    from training.checkpoint import load_checkpoint

    model, meta = load_checkpoint(fundus_checkpoint, device="cpu")
    seg = Segmenter(model, meta, device="cpu")
    done = []
    rows = predict(fundus_checkpoint, tmp_path, data=fundus_data, split="all", segmenter=seg,
                   progress=lambda d, t: done.append((d, t)))
    assert len(rows) == 9 and done[-1] == (9, 9)
    assert [r["id"] for r in csv_rows(tmp_path)] == [r["id"] for r in rows]
    assert all((tmp_path / r["file"]).is_file() for r in rows)


def test_cancel_after_case_2_keeps_exactly_the_finished_files(fundus_checkpoint, fundus_data,
                                                             tmp_path):
    done = []
    with pytest.raises(Cancelled) as info:
        predict(fundus_checkpoint, tmp_path, data=fundus_data, split="all",
                progress=lambda d, t: done.append(d), should_cancel=lambda: len(done) >= 2)
    exc = info.value
    assert len(exc.rows) == 2 and exc.total == 9 and exc.out == tmp_path
    listed = [r["file"] for r in csv_rows(tmp_path)]
    assert listed == [r["file"] for r in exc.rows]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*listed, "predictions.csv"])
    assert "2 of 9" in str(exc)


def test_cancel_inside_a_3d_case_writes_no_label_file(ct_ckpt, tmp_path):
    import nibabel as nib

    src = tmp_path / "in"
    src.mkdir()
    volume = np.random.default_rng(0).normal(0, 50, (40, 40, 40)).astype(np.float32)
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(volume, np.diag([0.9, 0.9, 2.5, 1.0])), src / f"{name}.nii.gz")
    out = tmp_path / "out"
    polls = []

    def should_cancel():  # polled before each case, before each segment and per window:
        polls.append(1)  # case a takes windows_of_a + 2 polls, b stops after 2 windows
        return len(polls) > windows_of_a + 6

    seg = Segmenter.from_checkpoint(ct_ckpt, device="cpu")
    counted = []
    seg.segment(volume, progress=lambda d, t: counted.append(t))
    windows_of_a = counted[-1]
    assert windows_of_a > 4  # several windows, so the cancel lands inside case b
    with pytest.raises(Cancelled) as info:
        predict(ct_ckpt, out, image=[src / "a.nii.gz", src / "b.nii.gz"], segmenter=seg,
                should_cancel=should_cancel)
    assert [r["id"] for r in info.value.rows] == ["a"]
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "predictions.csv"]
    assert [r["file"] for r in csv_rows(out)] == ["a.nii.gz"]
    assert isinstance(info.value.__cause__, Cancelled)  # raised between b's windows
    assert "windows" in str(info.value.__cause__)


def test_a_write_that_fails_halfway_leaves_no_partial_file(fundus_checkpoint, fundus_data,
                                                           tmp_path, monkeypatch):
    import training.data

    real = training.data.write_label
    calls = []

    def flaky(path, labels, meta=None):
        calls.append(path)
        if len(calls) == 3:
            path.write_bytes(b"half a png")
            raise OSError("disk full")
        return real(path, labels, meta)

    monkeypatch.setattr(training.data, "write_label", flaky)
    with pytest.raises(OSError, match="disk full"):
        predict(fundus_checkpoint, tmp_path, data=fundus_data, split="all")
    listed = [r["file"] for r in csv_rows(tmp_path)]
    assert len(listed) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*listed, "predictions.csv"])


def test_several_images_in_one_call_and_clashing_ids_refused(fundus_checkpoint, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.tif"):
        img = (rng.random((40, 48)) * 255).astype(np.uint8)
        PILImage.fromarray(img).save(src / name)
    rows = predict(fundus_checkpoint, tmp_path / "out", image=[src / "a.png", src / "b.png"],
                   attribute_value="Black")
    assert [(r["id"], r["attribute_value"]) for r in rows] == [("a", "Black"), ("b", "Black")]
    assert [r["file"] for r in csv_rows(tmp_path / "out")] == ["a.png", "b.png"]
    (src / "c.tif").rename(src / "a.tif")
    with pytest.raises(ValueError, match="both be written as a"):
        predict(fundus_checkpoint, tmp_path / "out2", image=[src / "a.png", src / "a.tif"])
    assert not (tmp_path / "out2").exists()



@pytest.mark.parametrize("output_format", [None, "rtstruct"])
def test_a_dicom_series_gets_its_dicom_output_written_in_place(ct_ckpt, tmp_path,
                                                               output_format):
    """DICOM-SEG (the default for a series) and RTSTRUCT go through the same temporary file
    + rename as other label files; the DICOM writers, which never overwrite a file, must
    still be able to write it."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from training.checkpoint import temp_files
    from training.data.dicom import write_ct_series

    rng = np.random.default_rng(0)
    hu = rng.normal(0, 50, (40, 40, 12)).astype(np.float32)
    hu[10:30, 12:28, 3:9] += 150
    write_ct_series(hu, tmp_path / "CT_7", np.diag([0.9, 0.9, 2.5, 1.0]))
    seg = Segmenter.from_checkpoint(ct_ckpt, device="cpu")
    out = tmp_path / "out"
    rows = predict(ct_ckpt, out, image=tmp_path / "CT_7", segmenter=seg,
                   output_format=output_format)
    suffix = ".seg.dcm" if output_format is None else ".rtstruct.dcm"
    assert [r["file"] for r in rows] == [f"CT_7{suffix}"]
    assert sorted(p.name for p in out.iterdir()) == [f"CT_7{suffix}", "predictions.csv"]
    assert temp_files(out) == []
    modality = pydicom.dcmread(out / f"CT_7{suffix}").Modality
    assert modality == ("SEG" if output_format is None else "RTSTRUCT")


def test_a_run_that_fails_first_keeps_the_earlier_listing(fundus_checkpoint, fundus_data, tmp_path,
                                                          monkeypatch):
    """A run (with overwrite) into a folder that holds an earlier run's predictions.csv and
    fails before its first file does not replace that listing with an empty one."""
    import training.data

    predict(fundus_checkpoint, tmp_path, data=fundus_data, split="all")
    before = (tmp_path / "predictions.csv").read_bytes()
    assert len(csv_rows(tmp_path)) > 0

    def broken(path, labels, meta=None):
        raise OSError("disk full")

    monkeypatch.setattr(training.data, "write_label", broken)
    with pytest.raises(OSError, match="disk full"):
        predict(fundus_checkpoint, tmp_path, data=fundus_data, split="all", overwrite=True)
    assert (tmp_path / "predictions.csv").read_bytes() == before


def test_a_refused_image_leaves_no_listing(ct_ckpt, tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "t.nii.gz")
    with pytest.raises(ValueError, match="too small"):
        predict(ct_ckpt, tmp_path / "out", image=tmp_path / "t.nii.gz")
    assert not (tmp_path / "out" / "predictions.csv").exists()


def png_images(folder, names):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in names:
        PILImage.fromarray((rng.random((40, 48)) * 255).astype(np.uint8)).save(folder / name)
    return [folder / n for n in names]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_an_earlier_runs_files_are_replaced_only_with_overwrite(fundus_checkpoint, tmp_path,
                                                                monkeypatch):
    import os

    images = png_images(tmp_path / "in", ["a.png", "b.png"])
    out = tmp_path / "out"
    predict(fundus_checkpoint, out, image=images, attribute_value="Black")
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    with monkeypatch.context() as m:  # refused before the checkpoint is loaded
        m.setattr(Segmenter, "from_checkpoint", classmethod(lambda *a, **k: 1 / 0))
        with pytest.raises(ValueError) as info:
            predict(fundus_checkpoint, out, image=images, attribute_value="White")
    message = str(info.value)
    print(message)
    assert f"{out} already holds 3 file(s) from an earlier run" in message
    assert "predictions.csv, a.png, b.png." in message
    assert "--overwrite" in message and "another --out" in message
    assert snapshot(out) == before  # bytes equal, nothing added
    inode = os.stat(out / "a.png").st_ino
    rows = predict(fundus_checkpoint, out, image=images, attribute_value="White", overwrite=True)
    assert [r["attribute_value"] for r in csv_rows(out)] == ["White", "White"] == [
        r["attribute_value"] for r in rows]
    assert os.stat(out / "a.png").st_ino != inode  # a new file, renamed into place
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "notes.txt",
                                                     "predictions.csv"]


def test_a_run_removes_the_temporary_files_of_its_own_outputs_only(fundus_checkpoint, tmp_path):
    """Temporary files a killed run left for this run's names (a label file's ends in its
    own suffix) are kept by a refused run and deleted, named in one log line, by the next
    run that writes; another case's and other names' stay."""
    images = png_images(tmp_path / "in", ["a.png", "b.png"])
    out = tmp_path / "out"
    out.mkdir()
    stale = {".a.png.abcdef12.png": b"\x89PNG torn", ".predictions.csv.0123abcd.tmp": b"id,"}
    others = {".c.png.abcdef12.png": b"another case's", ".a.png.abcdef12.tmp": b"not ours",
              ".notes.txt.abcdef12.tmp": b"another program's", "notes.txt": b"mine"}
    for name, data in {**stale, **others, "predictions.csv": b"id\n"}.items():
        (out / name).write_bytes(data)
    before = snapshot(out)
    with pytest.raises(ValueError, match="from an earlier run"):
        predict(fundus_checkpoint, out, image=images)
    assert snapshot(out) == before
    lines = []
    predict(fundus_checkpoint, out, image=images, overwrite=True, log=lines.append)
    assert ("removed 2 temporary file(s) left by killed writes: .a.png.abcdef12.png, "
            ".predictions.csv.0123abcd.tmp") in lines
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*others, "a.png", "b.png", "predictions.csv"])
    assert {n: (out / n).read_bytes() for n in others} == others


def test_new_cases_into_a_folder_with_an_earlier_listing_are_refused(fundus_checkpoint, tmp_path):
    """The earlier predictions.csv would be replaced (and stop listing a.png): refused."""
    a, c = png_images(tmp_path / "in", ["a.png", "c.png"])
    out = tmp_path / "out"
    predict(fundus_checkpoint, out, image=a)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"1 file\(s\) from an earlier run .*: "
                                         r"predictions\.csv\. .*--overwrite"):
        predict(fundus_checkpoint, out, image=c)
    assert snapshot(out) == before  # no c.png either
    predict(fundus_checkpoint, out, image=c, overwrite=True)
    assert [r["file"] for r in csv_rows(out)] == ["c.png"]
    assert (out / "a.png").read_bytes() == before["a.png"]  # not this run's: untouched


def test_existing_outputs_lists_what_a_run_would_replace(fundus_checkpoint, tmp_path):
    from training.predict import existing_outputs, image_cases

    images = png_images(tmp_path / "in", ["a.png", "b.tif", "c.png"])
    out = tmp_path / "out"
    cases = image_cases(images)
    assert existing_outputs(cases, out) == []  # no folder yet
    out.mkdir()
    for name in ("b.tif", "c.nii.gz", "notes.txt"):  # c.nii.gz: not c.png's output
        (out / name).write_bytes(b"earlier")
    assert existing_outputs(cases, out) == [out / "b.tif"]
    assert existing_outputs(cases, out, "nifti") == [out / "c.nii.gz"]
    (out / "predictions.csv").symlink_to(out / "gone.csv")  # a dangling link counts too
    assert existing_outputs(cases, out) == [out / "predictions.csv", out / "b.tif"]


def test_the_cli_refuses_a_dataset_run_into_an_earlier_one_with_exit_2(
        fundus_checkpoint, fundus_data, tmp_path, capsys):
    from training import predict as predict_cli

    out = tmp_path / "out"
    argv = ["--checkpoint", str(fundus_checkpoint), "--data", str(fundus_data), "--split", "all",
            "--out", str(out)]
    predict_cli.main(argv)
    before = snapshot(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "already holds 10 file(s) from an earlier run" in err
    assert "predictions.csv, fundus_0000.png, fundus_0001.png and 7 more" in err
    assert "--overwrite" in err
    assert snapshot(out) == before
    assert len(predict_cli.main([*argv, "--overwrite"])) == 9
