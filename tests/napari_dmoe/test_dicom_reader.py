"""The plugin's DICOM reader (folder / .dcm files -> one layer per series) and DICOM writers."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from napari_dmoe._reader import META, napari_get_reader, read_nifti  # noqa: E402
from napari_dmoe._writer import (  # noqa: E402
    write_labels_dicom_seg,
    write_labels_nifti,
    write_labels_rtstruct,
)
from training.data.dicom import DicomError, read_series, write_ct_series  # noqa: E402


def ct_affine() -> np.ndarray:
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])
    affine[:3, 3] = [40.0, 30.0, -20.0]
    return affine


def hu(shape=(24, 20, 8), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, shape).astype(np.float32)


@pytest.fixture
def series(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    names = [f"x{v}.dcm" for v in rng.permutation(8)]
    write_ct_series(hu(), tmp_path / "CT", ct_affine(), description="Pelvis 2mm",
                    file_names=names)
    return tmp_path / "CT"


def test_folder_opens_as_one_layer_placed_like_its_nifti_twin(series, tmp_path):
    import nibabel as nib

    reader = napari_get_reader(str(series))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(series))
    assert kind == "image" and kwargs["name"] == "Pelvis 2mm"
    np.testing.assert_array_equal(data, hu().transpose(2, 1, 0))
    twin = tmp_path / "twin.nii.gz"
    nib.save(nib.Nifti1Image(hu(), ct_affine()), str(twin))
    [(_, twin_kwargs, _)] = read_nifti(twin)
    np.testing.assert_allclose(kwargs["scale"], twin_kwargs["scale"], atol=1e-5)
    np.testing.assert_allclose(kwargs["translate"], twin_kwargs["translate"], atol=1e-4)
    meta = kwargs["metadata"][META]
    np.testing.assert_allclose(meta["affine"], ct_affine(), atol=1e-4)
    assert meta["dicom_source"] == str(series)
    assert meta["dicom_series_uid"] == read_series(series, pixels=False).series_instance_uid


def test_single_file_and_all_files_open_the_series_once(series):
    files = sorted(str(p) for p in series.iterdir())
    for path in (files[2], files):
        reader = napari_get_reader(path)
        assert reader is not None
        layers = reader(path)
        assert len(layers) == 1 and layers[0][0].shape == (8, 20, 24)


def test_two_series_in_one_folder_give_one_layer_each(tmp_path):
    write_ct_series(hu(seed=1), tmp_path, ct_affine(), description="arterial",
                    file_names=[f"a{k}.dcm" for k in range(8)])
    write_ct_series(hu(seed=2), tmp_path, ct_affine(), description="venous",
                    file_names=[f"v{k}.dcm" for k in range(8)])
    layers = napari_get_reader(str(tmp_path))(str(tmp_path))
    assert sorted(kw["name"] for _, kw, _ in layers) == ["arterial", "venous"]


def test_a_broken_series_is_reported_while_the_others_open(tmp_path):
    write_ct_series(hu(seed=1), tmp_path, ct_affine(), description="good",
                    file_names=[f"a{k}.dcm" for k in range(8)])
    files = write_ct_series(hu(seed=2), tmp_path, ct_affine(), description="gappy",
                            file_names=[f"v{k}.dcm" for k in range(8)])
    files[3].unlink()
    with pytest.warns(UserWarning, match="gappy.*missing"):
        layers = napari_get_reader(str(tmp_path))(str(tmp_path))
    assert [kw["name"] for _, kw, _ in layers] == ["good"]
    only_bad = tmp_path / "bad"
    write_ct_series(hu(seed=3), only_bad, ct_affine())[5].unlink()
    reader = napari_get_reader(str(only_bad))
    with pytest.raises(DicomError, match=str(only_bad)):
        reader(str(only_bad))


def test_reader_returns_none_for_what_it_cannot_read(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    for path in (empty, tmp_path / "notes", tmp_path / "missing", tmp_path / "notes/a.txt"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert napari_get_reader(str(path)) is None


def segmentation_attributes(series: Path, **extra) -> dict:
    """What a widget-made Labels layer carries: the image's metadata plus its own keys."""
    [(_, kwargs, _)] = napari_get_reader(str(series))(str(series))
    meta = dict(kwargs["metadata"][META])
    meta.update(role="segmentation", model="ct_tstage_dmoe", class_names=["background",
                "tumour"], segmented_as={"t_stage": "T3"}, **extra)
    return {"name": "seg", "scale": kwargs["scale"], "translate": kwargs["translate"],
            "metadata": {META: meta}}


def blob(shape=(8, 20, 24)) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return ((((z - 4) / 3) ** 2 + ((y - 10) / 6) ** 2 + ((x - 12) / 7) ** 2) < 1).astype(
        np.uint8)


def test_writers_write_dicom_seg_and_rtstruct_from_layer_metadata(series, tmp_path):
    labels = blob()
    attributes = segmentation_attributes(series)
    [seg_path] = write_labels_dicom_seg(str(tmp_path / "tumour"), labels, attributes)
    assert seg_path.endswith("tumour.dcm")
    seg = hd.seg.segread(seg_path)
    volume = read_series(series, pixels=False)
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(volume.sop_instance_uids), combine_segments=True)
    np.testing.assert_array_equal(back, labels)  # (Z, Y, X) both
    assert "ct_tstage_dmoe" in seg.ContentDescription and "t_stage=T3" in seg.ContentDescription
    [rt_path] = write_labels_rtstruct(str(tmp_path / "tumour.rtstruct.dcm"), labels,
                                      attributes)
    rt = pydicom.dcmread(rt_path)
    assert rt.StructureSetROISequence[0].ROIName == "tumour"
    assert len(rt.ROIContourSequence[0].ContourSequence) >= 5
    with pytest.raises(DicomError, match="already exists"):
        write_labels_rtstruct(rt_path, labels, attributes)
    # the same layer still saves as NIfTI with the series' RAS affine
    import nibabel as nib

    [nii] = write_labels_nifti(str(tmp_path / "tumour.nii.gz"), labels, attributes)
    np.testing.assert_allclose(nib.load(nii).affine, ct_affine(), atol=1e-4)


def test_writers_refuse_a_layer_that_is_not_from_dicom(tmp_path):
    attributes = {"name": "x", "metadata": {META: {"source": str(tmp_path / "ct.nii.gz")}}}
    for writer in (write_labels_dicom_seg, write_labels_rtstruct):
        with pytest.raises(DicomError, match="ct.nii.gz is not a DICOM series"):
            writer(str(tmp_path / "out.dcm"), blob(), attributes)
    assert not (tmp_path / "out.dcm").exists()


@pytest.mark.gui
def test_viewer_opens_a_series_folder(make_napari_viewer, series):
    viewer = make_napari_viewer()
    layers = viewer.open(str(series), plugin="napari-dmoe")
    assert [layer.name for layer in layers] == ["Pelvis 2mm"]
    assert layers[0].metadata[META]["dicom_source"] == str(series)
    np.testing.assert_allclose(layers[0].scale, [2.0, 0.8, 0.8], atol=1e-5)


def test_sagittal_series_round_trips_through_the_layer_to_dicom_seg(tmp_path):
    """A sagittal series is shown with its axes permuted toward R, A, S; the SEG writer
    must hand the mask back in the series' own (column, row, slice) order."""
    import nibabel as nib

    from napari_dmoe._reader import nifti_image_layers

    affine = np.zeros((4, 4))
    affine[:3, :3] = [[0.0, 0.0, 3.0], [-0.7, 0.0, 0.0], [0.0, -0.9, 0.0]]  # i: P, j: I, k: R
    affine[:, 3] = [-30.0, 60.0, 80.0, 1.0]
    volume_hu = hu((24, 20, 8), seed=4)
    write_ct_series(volume_hu, tmp_path / "sag", affine, description="sagittal")
    volume = read_series(tmp_path / "sag", pixels=False)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-4)
    [(data, kwargs, _)] = napari_get_reader(str(tmp_path / "sag"))(str(tmp_path / "sag"))
    mask = np.zeros(volume.shape, np.uint8)
    mask[5:15, 4:12, 2:6] = 1
    [(layer_mask, _, _)] = nifti_image_layers(nib.Nifti1Image(mask, affine), "mask")
    assert layer_mask.shape == data.shape
    attributes = {"name": "seg", "metadata": {META: {**kwargs["metadata"][META],
                                                     "class_names": ["background", "tumour"]}}}
    [out] = write_labels_dicom_seg(str(tmp_path / "sag.seg.dcm"), layer_mask, attributes)
    back = hd.seg.segread(out).get_pixels_by_source_instance(
        source_sop_instance_uids=list(volume.sop_instance_uids), combine_segments=True)
    np.testing.assert_array_equal(back.transpose(2, 1, 0), mask)
