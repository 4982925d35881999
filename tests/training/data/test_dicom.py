"""DICOM series in (geometry, HU, bad inputs) and DICOM-SEG / RTSTRUCT out."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from training.data.dicom import (  # noqa: E402
    DicomError,
    find_series,
    read_series,
    write_ct_series,
    write_dicom_seg,
    write_rtstruct,
)
from training.data.errors import DataError  # noqa: E402
from training.data.io import image_info, read_image  # noqa: E402

CLASSES = ["background", "tumour", "bladder"]


def oblique_affine(spacing=(0.7, 0.8, 2.5), origin=(12.0, -30.0, 45.0)) -> np.ndarray:
    """RAS affine rotated about two axes (an oblique acquisition), right-handed."""
    a, b = np.radians(20.0), np.radians(12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rx @ rz @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def hu_volume(shape=(24, 20, 10), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 2000, shape).astype(np.float32)


def blob_mask(shape) -> np.ndarray:
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c = np.array(shape) / 2
    mask = ((((i - c[0]) / (shape[0] / 3)) ** 2 + ((j - c[1]) / (shape[1] / 3.5)) ** 2
             + ((k - c[2]) / (shape[2] / 2.5)) ** 2) < 1).astype(np.uint8)
    mask[(((i - 4) / 3.5) ** 2 + ((j - 4) / 3.5) ** 2 + ((k - c[2]) / 2.5) ** 2) < 1] = 2
    return mask


def shuffled_series(folder: Path, hu: np.ndarray, affine: np.ndarray, **kw) -> list[Path]:
    """Slices under shuffled names with wrong InstanceNumbers (the reader must not care)."""
    n = hu.shape[2]
    rng = np.random.default_rng(7)
    names = [f"IMG{v:04d}.dcm" for v in rng.permutation(n)]
    numbers = [int(v) for v in rng.permutation(n) + 100]
    return write_ct_series(hu, folder, affine, file_names=names, instance_numbers=numbers, **kw)


@pytest.fixture
def series(tmp_path):
    hu, affine = hu_volume(), oblique_affine()
    shuffled_series(tmp_path / "ct", hu, affine, intercept=-1024.0, slope=0.5)
    return tmp_path / "ct", hu, affine


def test_series_reads_as_its_nifti_twin(series, tmp_path):
    import nibabel as nib

    folder, hu, affine = series
    nib.save(nib.Nifti1Image(hu, affine), str(tmp_path / "twin.nii.gz"))
    twin, twin_meta = read_image(tmp_path / "twin.nii.gz")
    image, meta = read_image(folder)
    assert image.shape == twin.shape == (1, 24, 20, 10)
    np.testing.assert_allclose(image, twin, atol=1e-4)
    np.testing.assert_allclose(meta["affine"], twin_meta["affine"], atol=1e-4)
    np.testing.assert_allclose(meta["spacing"], (0.7, 0.8, 2.5), atol=1e-4)
    assert meta["suffix"] == "dicom"
    info = image_info(folder)
    assert info["spatial_shape"] == (24, 20, 10) and info["channels"] == 1


def test_single_file_opens_whole_series(series):
    folder, hu, _ = series
    one = sorted(folder.iterdir())[3]
    volume = read_series(one)
    assert volume.array.shape == hu.shape
    np.testing.assert_array_equal(volume.array, hu)


def test_slices_stored_against_the_normal_read_along_it(tmp_path):
    """Slice axis opposite to row × column: the reader flips it; world positions agree."""
    hu, affine = hu_volume(), oblique_affine()
    reversed_affine = affine.copy()
    reversed_affine[:3, 2] *= -1
    shuffled_series(tmp_path / "ct", hu, reversed_affine)
    volume = read_series(tmp_path / "ct")
    np.testing.assert_array_equal(volume.array, hu[:, :, ::-1])
    expected = reversed_affine @ np.array([3, 5, 9, 1.0])  # voxel (3, 5, 9) in the input
    np.testing.assert_allclose(volume.affine @ np.array([3, 5, 0, 1.0]), expected, atol=1e-4)


def test_real_series_from_pydicom_test_data(tmp_path):
    from pydicom.data import get_testdata_file

    ct2 = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests/77654033/CT2"
    with pytest.raises(DicomError, match="slice\\(s\\) missing") as err:
        read_series(ct2)  # slices at -99.48 then 103.02, 104.27, 105.52 mm
    assert str(ct2) in str(err.value)
    contiguous = tmp_path / "ct2"
    contiguous.mkdir()
    for name in ("17136", "17166", "17196"):
        shutil.copy(ct2 / name, contiguous / name)
    volume = read_series(contiguous)
    datasets = [pydicom.dcmread(contiguous / n) for n in ("17136", "17166", "17196")]
    ps = [float(v) for v in datasets[0].PixelSpacing]
    assert volume.spacing == pytest.approx((ps[1], ps[0], 1.25), abs=1e-4)
    np.testing.assert_allclose(volume.positions,
                               [[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    lps = volume.affine_lps
    for k, ds in enumerate(datasets):
        np.testing.assert_allclose(lps @ [0, 0, k, 1], [*ds.ImagePositionPatient, 1], atol=1e-3)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.array[:, :, k], hu.T)
    single = read_series(get_testdata_file("CT_small.dcm"))
    assert single.array.shape == (128, 128, 1)


def test_dicom_seg_round_trip(series, tmp_path):
    folder, hu, _ = series
    volume = read_series(folder)
    mask = blob_mask(hu.shape)
    out = write_dicom_seg(mask, volume, CLASSES, tmp_path / "out.seg.dcm",
                          algorithm_name="ct_tstage_dmoe", algorithm_version="0.1",
                          attribute="t_stage", attribute_value="T2")
    seg = hd.seg.segread(out)
    labels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(volume.sop_instance_uids), combine_segments=True)
    np.testing.assert_array_equal(labels.transpose(2, 1, 0), mask)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["tumour", "bladder"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "89837001"
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert "t_stage=T2" in seg.SeriesDescription and "ct_tstage_dmoe" in seg.ContentDescription
    source = pydicom.dcmread(volume.files[0])
    for key in ("PatientID", "PatientName", "StudyInstanceUID"):
        assert seg[key].value == source[key].value
    assert seg.FrameOfReferenceUID == volume.frame_of_reference_uid
    refs = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
            for r in s.ReferencedInstanceSequence}
    assert refs == set(volume.sop_instance_uids)


def rasterise_rtstruct(path: Path, volume, roi_number: int) -> np.ndarray:
    """Even-odd fill of one ROI's planar contours on the source grid ``(X, Y, Z)``."""
    from skimage.draw import polygon

    ds = pydicom.dcmread(path)
    item = next(c for c in ds.ROIContourSequence if c.ReferencedROINumber == roi_number)
    inverse = np.linalg.inv(volume.affine_lps)
    slices = {uid: k for k, uid in enumerate(volume.sop_instance_uids)}
    out = np.zeros(volume.shape, dtype=bool)
    for contour in item.get("ContourSequence", []):  # absent for an empty ROI
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        points = np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)
        ijk = (inverse @ np.c_[points, np.ones(len(points))].T).T[:, :3]
        k = slices[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose(ijk[:, 2], k, atol=1e-3)  # on its own slice
        rr, cc = polygon(ijk[:, 0], ijk[:, 1], shape=volume.shape[:2])
        plane = np.zeros(volume.shape[:2], dtype=bool)
        plane[rr, cc] = True
        out[:, :, k] ^= plane
    return out


def test_rtstruct_round_trip(series, tmp_path):
    folder, hu, _ = series
    volume = read_series(folder)
    mask = blob_mask(hu.shape)
    mask[10:14, 8:12, 5] = 0  # a hole: written as an inner contour
    out = write_rtstruct(mask, volume, CLASSES, tmp_path / "out.rtstruct.dcm",
                         algorithm_name="ct_tstage_dmoe", algorithm_version="0.1",
                         attribute="t_stage", attribute_value="T2")
    ds = pydicom.dcmread(out)
    assert ds.Modality == "RTSTRUCT"
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["tumour", "bladder"]
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == volume.frame_of_reference_uid
    series_ref = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series_ref.SeriesInstanceUID == volume.series_instance_uid
    assert ds.PatientID == pydicom.dcmread(volume.files[0]).PatientID
    for number in (1, 2):  # contours trace voxel edges: the round trip is exact
        drawn = rasterise_rtstruct(out, volume, number)
        mismatched = int((drawn != (mask == number)).sum())
        assert mismatched == 0, (number, mismatched)
    assert not rasterise_rtstruct(out, volume, 1)[10:14, 8:12, 5].any()


def test_writers_refuse_non_dicom_source_and_overwrites(series, tmp_path):
    import nibabel as nib

    folder, hu, affine = series
    volume = read_series(folder, pixels=False)
    mask = blob_mask(hu.shape)
    nifti = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), str(nifti))
    kw = dict(algorithm_name="m", algorithm_version="1")
    for writer in (write_dicom_seg, write_rtstruct):
        with pytest.raises(DicomError, match="not a DICOM series"):
            writer(mask, nifti, CLASSES, tmp_path / "x.dcm", **kw)
        with pytest.raises(DicomError, match="source series' files"):
            writer(mask, volume, CLASSES, volume.files[0], **kw)
        (tmp_path / "exists.dcm").write_bytes(b"keep")
        with pytest.raises(DicomError, match="already exists"):
            writer(mask, volume, CLASSES, tmp_path / "exists.dcm", **kw)
        assert (tmp_path / "exists.dcm").read_bytes() == b"keep"
        with pytest.raises(ValueError, match="does not match"):
            writer(mask[:, :, :-1], volume, CLASSES, tmp_path / "y.dcm", **kw)


def test_writers_refuse_a_series_without_frame_of_reference(series, tmp_path):
    """Stripped by some de-identification tools: the structure set and SEG would carry an
    empty FrameOfReferenceUID (Type 1), tying their coordinates to no scan."""
    folder, hu, _ = series
    copy = tmp_path / "no_frame"
    shutil.copytree(folder, copy)
    for f in copy.iterdir():
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    kw = dict(algorithm_name="m", algorithm_version="1")
    for writer in (write_dicom_seg, write_rtstruct):
        for source in (copy, read_series(copy, pixels=False)):
            out = tmp_path / f"{writer.__name__}.dcm"
            with pytest.raises(DicomError, match=r"no FrameOfReferenceUID.*Nothing was written"):
                writer(blob_mask(hu.shape), source, CLASSES, out, **kw)
            assert not out.exists()


# -- bad inputs -----------------------------------------------------------------------------
def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(DicomError, match="no DICOM image series") as err:
        find_series(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert issubclass(DicomError, DataError)


def test_mixed_series_listed_and_named(tmp_path):
    write_ct_series(hu_volume(seed=1), tmp_path, oblique_affine(), description="arterial",
                    file_names=[f"a{k}.dcm" for k in range(10)])
    write_ct_series(hu_volume(seed=2), tmp_path, oblique_affine(), description="venous",
                    file_names=[f"v{k}.dcm" for k in range(10)])
    found = find_series(tmp_path)
    assert sorted(s.description for s in found) == ["arterial", "venous"]
    with pytest.raises(DicomError, match="holds 2 series"):
        read_series(tmp_path)
    venous = next(s for s in found if s.description == "venous")
    assert read_series(tmp_path, venous.series_instance_uid).description == "venous"
    assert read_series(tmp_path / "a3.dcm").description == "arterial"


def _move_slice(path: Path, offset_lps) -> None:
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [float(v) + d for v, d in zip(ds.ImagePositionPatient, offset_lps)]
    ds.save_as(path)


def test_uneven_spacing(tmp_path):
    files = write_ct_series(hu_volume(), tmp_path, np.diag([-1.0, -1.0, 2.0, 1.0]))
    _move_slice(files[4], (0, 0, 0.7))
    with pytest.raises(DicomError, match="uneven slice spacing"):
        read_series(tmp_path)


def test_missing_slice(tmp_path):
    files = write_ct_series(hu_volume(), tmp_path, np.diag([-1.0, -1.0, 2.0, 1.0]))
    files[6].unlink()
    with pytest.raises(DicomError, match="1 slice\\(s\\) missing"):
        read_series(tmp_path)


def test_gantry_tilt(tmp_path):
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    affine[1, 2] = 2.0 * np.tan(np.radians(15))  # slices slide along y: 15° tilt
    write_ct_series(hu_volume(), tmp_path, affine)
    with pytest.raises(DicomError, match="gantry tilt of about 15"):
        read_series(tmp_path)


def test_mixed_sizes(tmp_path):
    write_ct_series(hu_volume(), tmp_path, np.diag([-1.0, -1.0, 2.0, 1.0]))
    ds = pydicom.dcmread(tmp_path / "slice_0003.dcm")
    ds.Rows, ds.Columns = 10, 12
    ds.PixelData = np.zeros((10, 12), np.uint16).tobytes()
    ds.save_as(tmp_path / "slice_0003.dcm")
    with pytest.raises(DicomError, match="mixes image sizes"):
        read_series(tmp_path)


def test_undecodable_compressed_pixel_data(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    files = write_ct_series(hu_volume(), tmp_path, np.diag([-1.0, -1.0, 2.0, 1.0]))
    ds = pydicom.dcmread(files[2])
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8 garbage, not a JPEG \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(files[2], enforce_file_format=True)
    assert len(find_series(tmp_path)[0].files) == 10  # headers still read
    with pytest.raises(DicomError, match="cannot decode the pixel data") as err:
        read_series(tmp_path)
    assert files[2].name in str(err.value)


# -- end to end: training.predict on a series folder ----------------------------------------
@pytest.mark.slow  # ~30 s on 2 cores: two runs of the CT demo model
def test_predict_series_folder_to_dicom_seg(tmp_path, capsys):
    import nibabel as nib

    from training.data.synthetic import CT_SHAPE, CT_SPACING, GROUPS, ct_affine
    from training.data.synthetic_images import draw_ct
    from training.predict import main

    checkpoint = (Path(__file__).parents[3] / "src/napari_dmoe/models"
                  / "ct_tstage_dmoe.safetensors")
    _, look, cut = GROUPS["ct"]["T3"]
    hu, truth = draw_ct(np.random.default_rng(3), look, cut, CT_SHAPE, CT_SPACING)
    shuffled_series(tmp_path / "CT_0001", hu.astype(np.float32), ct_affine())
    args = ["--checkpoint", str(checkpoint), "--image", str(tmp_path / "CT_0001"),
            "--attribute-value", "T3", "--device", "cpu"]
    rows = main([*args, "--out", str(tmp_path / "seg")])
    assert rows[0]["file"] == "CT_0001.seg.dcm"
    main([*args, "--out", str(tmp_path / "nii"), "--output-format", "nifti"])
    volume = read_series(tmp_path / "CT_0001", pixels=False)
    seg = hd.seg.segread(tmp_path / "seg" / "CT_0001.seg.dcm")
    labels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(volume.sop_instance_uids),
        combine_segments=True).transpose(2, 1, 0)
    nifti = nib.load(str(tmp_path / "nii" / "CT_0001.nii.gz"))
    np.testing.assert_array_equal(labels, np.asarray(nifti.dataobj))
    np.testing.assert_allclose(nifti.affine, ct_affine(), atol=1e-4)
    dice = 2 * (labels * truth).sum() / (labels.sum() + truth.sum())
    assert dice > 0.8, dice
    assert seg.SegmentSequence[0].SegmentLabel == "tumour"
    assert "t_stage=T3" in seg.SeriesDescription
    nib.save(nib.Nifti1Image(hu, ct_affine()), str(tmp_path / "ct.nii.gz"))
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint), "--image", str(tmp_path / "ct.nii.gz"),
              "--out", str(tmp_path / "bad"), "--output-format", "rtstruct"])
    assert "not a DICOM series" in capsys.readouterr().err


def test_mixed_orientation_and_duplicate_positions(tmp_path):
    files = write_ct_series(hu_volume(), tmp_path / "a", np.diag([-1.0, -1.0, 2.0, 1.0]))
    ds = pydicom.dcmread(files[5])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice in an axial series
    ds.save_as(files[5])
    with pytest.raises(DicomError, match="mixes slice orientations.*slice_0005.dcm"):
        read_series(tmp_path / "a")
    files = write_ct_series(hu_volume(), tmp_path / "b", np.diag([-1.0, -1.0, 2.0, 1.0]))
    _move_slice(files[5], (0, 0, -2.0))  # now at slice 4's position
    with pytest.raises(DicomError, match="two slices at the same position"):
        read_series(tmp_path / "b")


def test_manifest_image_entries_may_be_dicom_folders(tmp_path):
    import nibabel as nib

    from training.data import read_case, validate_cases
    from training.data.manifest import read_manifest

    hu, affine = hu_volume(), oblique_affine()
    shuffled_series(tmp_path / "case01", hu, affine)
    shuffled_series(tmp_path / "case02", hu, affine)
    mask = blob_mask(hu.shape).clip(0, 1)
    nib.save(nib.Nifti1Image(mask, affine), str(tmp_path / "case01_label.nii.gz"))
    flipped = affine @ np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[:3, 3] = affine[:3, 3] + affine[:3, 0] * (hu.shape[0] - 1)
    nib.save(nib.Nifti1Image(mask[::-1], flipped), str(tmp_path / "case02_label.nii.gz"))
    (tmp_path / "manifest.csv").write_text(
        "image,label,t_stage\ncase01,case01_label.nii.gz,T2\n")
    cases = read_manifest(tmp_path / "manifest.csv")
    validate_cases(cases, "t_stage", num_classes=2, spatial_dims=3)
    image, label, meta = read_case(cases[0])[:3]
    assert image.shape == (1, *hu.shape) and label.shape == hu.shape
    np.testing.assert_allclose(meta["affine"], affine, atol=1e-4)
    (tmp_path / "manifest.csv").write_text(
        "image,label,t_stage\ncase02,case02_label.nii.gz,T2\n")
    with pytest.raises(DataError, match="case02"):
        validate_cases(read_manifest(tmp_path / "manifest.csv"), "t_stage", num_classes=2,
                       spatial_dims=3)


def test_decodable_compressed_series_reads_like_uncompressed(tmp_path):
    from pydicom.uid import RLELossless

    hu, affine = hu_volume(), oblique_affine()
    files = shuffled_series(tmp_path / "ct", hu, affine)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)  # pydicom's own encoder: no plugin needed
        ds.save_as(path)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == RLELossless
    volume = read_series(tmp_path / "ct")
    np.testing.assert_array_equal(volume.array, hu)
