"""DICOM-SEG / RTSTRUCT over a real CT series, checked against the standard.

The source is pydicom's ``dicomdirtests/98892001/CT5N`` (5 axial 16×16 slices of a real,
de-identified CT). The mask has a structure inside the volume with a hole, one touching
the border, one touching the border on every slice and one that is empty. dicom3tools'
``dciodvfy`` (IOD conformance) and ``dcentvfy`` (patient/study/series/frame of reference
consistency across files) run when installed (``.ci/run`` installs them).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from tests.training.data.test_dicom import (  # noqa: E402
    hu_volume,
    oblique_affine,
    rasterise_rtstruct,
    shuffled_series,
)
from training.data.dicom import read_series, write_dicom_seg, write_rtstruct  # noqa: E402

CLASSES = ["background", "tumour", "bladder", "liver", "body"]
EMPTY = 3  # "liver": no voxel
ALGORITHM = dict(algorithm_name="ct_tstage_dmoe", algorithm_version="napari-dmoe 0.1.0",
                 attribute="t_stage", attribute_value="T2")


def validator_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """``(X, Y, Z)`` classes: 1 a box with a one-voxel hole, 2 at the corner (i, j) = 0 on
    the first and last slice, 3 empty, 4 the last two columns of every slice."""
    x, y, z = shape
    mask = np.zeros(shape, np.uint8)
    mask[x // 3: x // 3 + max(2, x // 3), y // 3: y // 3 + max(2, y // 3), :] = 1
    mask[x // 2, y // 2, z // 2] = 0
    mask[0:3, 0:4, 0] = 2
    mask[0:2, 0:2, z - 1] = 2
    mask[x - 2:, :, :] = 4
    return mask


@pytest.fixture
def real_ct(tmp_path):
    from pydicom.data import get_testdata_file

    source = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests/98892001/CT5N"
    folder = tmp_path / "CT5N"
    shutil.copytree(source, folder)
    return read_series(folder, pixels=False)


@pytest.fixture
def real_exports(real_ct, tmp_path):
    """(source volume, mask, SEG path, RTSTRUCT path) over the real CT series."""
    mask = validator_mask(real_ct.shape)
    seg = write_dicom_seg(mask, real_ct, CLASSES, tmp_path / "out.seg.dcm", **ALGORITHM)
    rt = write_rtstruct(mask, real_ct, CLASSES, tmp_path / "out.rtstruct.dcm", **ALGORITHM)
    return real_ct, mask, seg, rt


def test_rtstruct_carries_the_source_frame_of_reference_module(real_exports):
    """The RT Structure Set IOD includes the Frame of Reference module (UID, indicator)."""
    volume, _, _, rt = real_exports
    ds = pydicom.dcmread(rt)
    source = pydicom.dcmread(volume.files[0], stop_before_pixels=True)
    assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert ds.PositionReferenceIndicator == source.PositionReferenceIndicator == "SN"


def test_empty_structure_is_an_roi_without_contour_sequence(real_exports):
    """A present ContourSequence needs 1-n items: an empty ROI leaves it out."""
    _, _, _, rt = real_exports
    ds = pydicom.dcmread(rt)
    assert [r.ROINumber for r in ds.StructureSetROISequence] == [1, 2, 3, 4]
    contours = {int(c.ReferencedROINumber): c for c in ds.ROIContourSequence}
    assert "ContourSequence" not in contours[EMPTY]
    assert all(len(contours[n].ContourSequence) > 0 for n in (1, 2, 4))
    assert EMPTY in {int(o.ReferencedROINumber) for o in ds.RTROIObservationsSequence}


def test_rtstruct_copies_patient_and_study_attributes_like_the_seg(real_exports):
    """De-identification flags and patient-study attributes of the source, as the SEG."""
    volume, _, seg_path, rt = real_exports
    source = pydicom.dcmread(volume.files[0], stop_before_pixels=True)
    seg, ds = pydicom.dcmread(seg_path), pydicom.dcmread(rt)
    for key in ("PatientIdentityRemoved", "DeidentificationMethod", "PatientAge",
                "AdditionalPatientHistory", "PatientID", "StudyInstanceUID"):
        assert ds[key].value == seg[key].value == source[key].value, key
    assert ds.PatientIdentityRemoved == "YES"


def test_real_series_round_trips_voxel_for_voxel(real_exports):
    volume, mask, seg_path, rt = real_exports
    seg = hd.seg.segread(seg_path)
    labels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(volume.sop_instance_uids), combine_segments=True)
    np.testing.assert_array_equal(labels.transpose(2, 1, 0), mask)
    for number in range(1, len(CLASSES)):
        np.testing.assert_array_equal(rasterise_rtstruct(rt, volume, number), mask == number)


# -- external validators (dicom3tools) ------------------------------------------------------
def run_tool(tool: str, *paths: Path) -> list[str]:
    """The Error and Warning lines a dicom3tools checker prints for ``paths``."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (apt-get install dicom3tools)")
    result = subprocess.run([tool, *map(str, paths)], capture_output=True, text=True,
                            timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith(("Error", "Warning"))]


def test_dciodvfy_finds_no_error_in_real_series_exports(real_exports):
    _, _, seg, rt = real_exports
    for path in (seg, rt):
        errors = [line for line in run_tool("dciodvfy", path) if line.startswith("Error")]
        assert errors == [], (path.name, errors)


def test_dciodvfy_finds_no_error_in_oblique_series_exports(tmp_path):
    hu = hu_volume()
    shuffled_series(tmp_path / "ct", hu, oblique_affine())
    volume = read_series(tmp_path / "ct", pixels=False)
    mask = validator_mask(volume.shape)
    for writer, name in ((write_dicom_seg, "out.seg.dcm"), (write_rtstruct, "out.rt.dcm")):
        path = writer(mask, volume, CLASSES, tmp_path / name, **ALGORITHM)
        errors = [line for line in run_tool("dciodvfy", path) if line.startswith("Error")]
        assert errors == [], (name, errors)


def test_dcentvfy_source_and_exports_describe_one_patient_study_and_frame(real_exports):
    volume, _, seg, rt = real_exports
    assert run_tool("dcentvfy", *volume.files, seg, rt) == []


@pytest.mark.parametrize("source_kind", ["real (ISO_IR 100)", "synthetic (no charset)"])
def test_non_ascii_names_are_declared_in_the_character_set(source_kind, real_ct, tmp_path):
    """Accented class and model names: the source's charset when it holds them, else UTF-8;
    never undeclared non-ASCII bytes (dciodvfy: 'Character invalid for character
    repertoire'). Names that no single source charset holds also go to UTF-8."""
    if source_kind.startswith("real"):
        volume, kept = real_ct, "ISO_IR 100"
    else:
        shuffled_series(tmp_path / "ct", hu_volume(), oblique_affine())
        volume, kept = read_series(tmp_path / "ct", pixels=False), "ISO_IR 192"
    mask = validator_mask(volume.shape)
    for names, expected in ((["fond", "tumeur primaire", "vessie", "foie", "paroi é"], kept),
                            (["bg", "腫瘍", "膀胱", "肝臓", "体"], "ISO_IR 192")):
        stem = tmp_path / f"{expected.replace(' ', '_')}_{len(names[1])}"
        kw = dict(ALGORITHM, algorithm_name="modèle_ct")
        seg = pydicom.dcmread(write_dicom_seg(mask, volume, names, f"{stem}.seg.dcm", **kw))
        rt = pydicom.dcmread(write_rtstruct(mask, volume, names, f"{stem}.rt.dcm", **kw))
        assert seg.SpecificCharacterSet == rt.SpecificCharacterSet == expected
        assert [s.SegmentLabel for s in seg.SegmentSequence] == names[1:]
        assert [r.ROIName for r in rt.StructureSetROISequence] == names[1:]
        assert rt.ManufacturerModelName == seg.ManufacturerModelName == "modèle_ct"
        source = pydicom.dcmread(volume.files[0], stop_before_pixels=True)
        assert rt.PatientName == seg.PatientName == source.PatientName
        for path in (Path(f"{stem}.seg.dcm"), Path(f"{stem}.rt.dcm")):
            if shutil.which("dciodvfy"):  # the attribute checks above run without it
                errors = [ln for ln in run_tool("dciodvfy", path) if ln.startswith("Error")]
                assert errors == [], (path.name, errors)
