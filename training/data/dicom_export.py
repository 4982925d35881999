"""Write a mask back to DICOM: a Segmentation (highdicom) or an RT Structure Set (pydicom).

The mask is an integer ``(X, Y, Z)`` array of class indices in the order of
``DicomVolume.array`` (columns, rows, slices; ``training.data.dicom_series``). Both
writers reference the source series (study, series, frame of reference, one SOP instance
per slice), copy its patient and study attributes (``IDENTITY_KEYWORDS``: identity,
de-identification, clinical trial) and nothing else, identify the algorithm (model name,
version, attribute value used), refuse a non-DICOM source, and never overwrite a file.
``write_ct_series`` writes a plain CT series (tests, demos, benchmarks).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from training.data.dicom_series import LPS_TO_RAS, DicomVolume, read_series
from training.data.errors import DicomError

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
CT_IMAGE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
UTF8_CHARACTER_SET = "ISO_IR 192"
_TUMOUR = re.compile(r"tumou?r|lesion|neoplasm|cancer|mass|gtv|metasta", re.IGNORECASE)
_ORGANS = ("bladder", "rectum", "prostate", "liver", "kidney", "spleen", "pancreas", "lung",
           "heart", "brain", "stomach", "colon", "uterus", "bone", "aorta")
_COLOURS = ((255, 64, 64), (64, 160, 255), (64, 220, 96), (255, 200, 0), (200, 96, 255),
            (0, 220, 220), (255, 128, 0), (160, 160, 160))


def software_version() -> str:
    """``"napari-dmoe <version>"`` (the installed package's), or ``"napari-dmoe"``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"napari-dmoe {version('napari-dmoe')}"
    except PackageNotFoundError:
        return "napari-dmoe"


def resolve_source(source: DicomVolume | str | Path, what: str) -> DicomVolume:
    """The DICOM series a mask refers to; refuse anything that is not one, or a series
    without a frame of reference (the contours' coordinates would be tied to nothing)."""
    if isinstance(source, DicomVolume):
        return require_frame_of_reference(source, what)
    if source is None:
        raise DicomError(f"{what} needs the DICOM series the image came from (its study, "
                         "series and slice UIDs), but the image has none; open the DICOM "
                         "series folder, segment it, then save; or save as NIfTI/TIFF.")
    from training.data.dicom_series import is_dicom_path

    path = Path(source)
    if not is_dicom_path(path):
        raise DicomError(f"{path}: not a DICOM series, so a {what} cannot reference it (it "
                         "must point at the source slices' UIDs); save as NIfTI/TIFF, or "
                         "segment the original DICOM series.")
    return require_frame_of_reference(read_series(path, pixels=False), what)


def require_frame_of_reference(source: DicomVolume, what: str) -> DicomVolume:
    """``source``, if its slices carry a FrameOfReferenceUID; else a DicomError naming the
    series: a planning system places a structure set or segmentation on the CT through
    that UID, and an empty one would be refused by it, or matched to the wrong scan."""
    if not source.frame_of_reference_uid:
        raise DicomError(f"{source.folder}: the series has no FrameOfReferenceUID "
                         f"(0020,0052), so the {what} could not be placed on the scan "
                         "(the standard requires one). Nothing was written. Re-export the "
                         "series from the scanner or PACS with it (de-identification "
                         "tools can keep it), or save the mask as NIfTI/TIFF.")
    return source


def check_output(out_path: str | Path, sources: Sequence[Path]) -> Path:
    """Refuse an output path that exists or is one of the source files; returns it."""
    out = Path(out_path)
    resolved = out.resolve()
    if any(Path(p).resolve() == resolved for p in sources):
        raise DicomError(f"{out}: this is one of the source series' files; write the "
                         "segmentation to a new file name.")
    if out.exists():
        raise DicomError(f"{out}: already exists; choose another name or delete it first "
                         "(napari-dmoe never overwrites a file).")
    return out


def _check_mask(mask: Any, source: DicomVolume, class_names: Sequence[str]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != source.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the DICOM series "
                         f"{source.shape} (columns, rows, slices); pass the mask in the "
                         "array order of DicomVolume.array.")
    if mask.dtype.kind not in "iub":
        raise ValueError(f"mask dtype {mask.dtype} is not integer class indices")
    high = int(mask.max()) if mask.size else 0
    if (mask.size and int(mask.min()) < 0) or high >= len(class_names):
        raise ValueError(f"mask values {int(mask.min())}..{high} outside 0..."
                         f"{len(class_names) - 1} for classes {list(class_names)}")
    return mask


def _property_codes(name: str) -> tuple[Any, Any]:
    """(category, type) codes for a class name: SCT where a standard code exists."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    if _TUMOUR.search(name):
        return codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Neoplasm
    key = name.strip().lower()
    if key in _ORGANS:
        try:
            return (Code("123037004", "SCT", "Anatomical Structure"),
                    getattr(codes.SCT, key.capitalize()))
        except AttributeError:
            pass
    return codes.SCT.Tissue, codes.SCT.Tissue


def _output_character_set(source_character_set: Any, texts: Sequence[str]) -> Any:
    """The SpecificCharacterSet of an output that holds ``texts`` (class names, model name,
    attribute value) beside the patient and study text copied from the source.

    The source's own (``None`` when it has none: the default repertoire, ASCII) when it can
    encode every text, else ``"ISO_IR 192"`` (UTF-8, which encodes any; pydicom re-encodes
    the copied names). Non-ASCII bytes under the default repertoire are invalid DICOM.
    """
    from pydicom.charset import convert_encodings

    if all(text.isascii() for text in texts):
        return source_character_set
    terms = ([source_character_set] if isinstance(source_character_set, str)
             else list(source_character_set or []))
    if len(terms) == 1 and terms[0]:  # one charset, no ISO 2022 code extensions
        try:
            codec = convert_encodings(terms)[0]
            for text in texts:
                text.encode(codec)
            return source_character_set
        except (UnicodeEncodeError, LookupError):
            pass
    return UTF8_CHARACTER_SET


def _algorithm_text(algorithm_name: str, algorithm_version: str, attribute: str | None,
                    attribute_value: str | None) -> str:
    text = f"{algorithm_name} {algorithm_version}".strip()
    if attribute:
        text += f", {attribute}={attribute_value or 'unknown'}"
    return text


def write_dicom_seg(mask: Any, source: DicomVolume | str | Path, class_names: Sequence[str],
                    out_path: str | Path, *, algorithm_name: str, algorithm_version: str,
                    attribute: str | None = None, attribute_value: str | None = None
                    ) -> Path:
    """Write one BINARY DICOM Segmentation of ``mask`` ``(X, Y, Z)`` over ``source``.

    One segment per foreground class (``class_names[1:]``, class index = segment number),
    AUTOMATIC, with the algorithm (name, version, attribute value) in its identification,
    the SeriesDescription and the ContentDescription. Returns the path written.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    source = resolve_source(source, "DICOM-SEG")
    out = check_output(out_path, source.files)
    mask = _check_mask(mask, source, class_names)
    datasets = [pydicom.dcmread(p, stop_before_pixels=True) for p in source.files]
    _check_unchanged(source, datasets)
    text = _algorithm_text(algorithm_name, algorithm_version, attribute, attribute_value)
    character_set = _output_character_set(datasets[0].get("SpecificCharacterSet"),
                                         [*map(str, class_names), text])
    parameters = {attribute: attribute_value or "unknown"} if attribute else None
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name[:64], version=algorithm_version[:64],
        family=codes.cid7162.ArtificialIntelligence, parameters=parameters)
    segments, numbers = [], []
    for index, name in enumerate(class_names[1:], start=1):
        category, kind = _property_codes(name)
        segments.append(hd.seg.SegmentDescription(
            segment_number=len(segments) + 1, segment_label=str(name)[:64],
            segmented_property_category=category, segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
        numbers.append(index)
    frames = np.stack([(mask == n).transpose(2, 1, 0) for n in numbers], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="napari-dmoe",
        manufacturer_model_name=algorithm_name[:64], software_versions=algorithm_version[:64],
        device_serial_number="none", content_description=text[:64],
        content_label="SEGMENTATION", series_description=f"SEG {text}"[:64],
        omit_empty_frames=False, specific_character_set=character_set)
    out.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out)
    return out


def _check_unchanged(source: DicomVolume, datasets: list[Any]) -> None:
    uids = tuple(str(ds.SOPInstanceUID) for ds in datasets)
    if uids != source.sop_instance_uids:
        raise DicomError(f"{source.folder}: the series' files changed since it was read; "
                         "open the series again, then save.")


def mask_contours(mask2d: np.ndarray) -> list[np.ndarray]:
    """Closed contours ``(N, 2)`` in (i, j) voxel indices of a 2D binary mask ``(X, Y)``.

    Traced at the 0.5 iso-level (``skimage.measure.find_contours``), so the polygon runs
    half a voxel outside the voxel centres of the region; holes come out as separate
    contours (an even-odd / XOR reader restores them, as planning systems do).
    """
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(mask2d.astype(np.uint8), 1)
    out = []
    for contour in find_contours(padded, 0.5):
        contour = approximate_polygon(contour, tolerance=0.05) - 1.0
        if len(contour) > 3:
            out.append(contour[:-1] if np.allclose(contour[0], contour[-1]) else contour)
    return out


def write_rtstruct(mask: Any, source: DicomVolume | str | Path, class_names: Sequence[str],
                   out_path: str | Path, *, algorithm_name: str, algorithm_version: str,
                   attribute: str | None = None, attribute_value: str | None = None) -> Path:
    """Write one RT Structure Set: one ROI per foreground class, CLOSED_PLANAR per slice.

    Contour points are LPS millimetres in the source's frame of reference (each slice's
    own ``ImagePositionPatient`` plus in-plane offsets), each contour referencing its
    slice's SOPInstanceUID. Returns the path written.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence as Seq
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    source = resolve_source(source, "RTSTRUCT")
    out = check_output(out_path, source.files)
    mask = _check_mask(mask, source, class_names)
    text = _algorithm_text(algorithm_name, algorithm_version, attribute, attribute_value)
    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = RTSTRUCT_SOP_CLASS, ds.file_meta.MediaStorageSOPInstanceUID
    for key, value in source.identity.items():
        setattr(ds, key, value)
    character_set = _output_character_set(source.identity.get("SpecificCharacterSet"),
                                         [*map(str, class_names), text])
    if character_set:
        ds.SpecificCharacterSet = character_set
    ds.StudyInstanceUID = source.study_instance_uid
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if key not in ds:
            setattr(ds, key, "")
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", generate_uid(), 9002
    ds.SeriesDescription = f"RTSTRUCT {text}"[:64]
    ds.FrameOfReferenceUID = source.frame_of_reference_uid  # Frame of Reference module
    ds.PositionReferenceIndicator = source.position_reference_indicator
    ds.Manufacturer, ds.ManufacturerModelName = "napari-dmoe", algorithm_name[:64]
    ds.SoftwareVersions = algorithm_version[:64]
    ds.InstanceNumber, ds.OperatorsName = 1, ""
    ds.StructureSetLabel = "dMoE"[:16]
    ds.StructureSetDescription = text[:1024]
    ds.StructureSetDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    images = [_image_ref(source.sop_class_uid, uid) for uid in source.sop_instance_uids]
    series = Dataset()
    series.SeriesInstanceUID = source.series_instance_uid
    series.ContourImageSequence = Seq(images)
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management
    study.ReferencedSOPInstanceUID = source.study_instance_uid
    study.RTReferencedSeriesSequence = Seq([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = source.frame_of_reference_uid
    frame.RTReferencedStudySequence = Seq([study])
    ds.ReferencedFrameOfReferenceSequence = Seq([frame])
    rois, contours, observations = [], [], []
    affine_lps = LPS_TO_RAS @ source.affine
    in_plane = affine_lps[:3, :2]  # mm per voxel step along i (columns) and j (rows)
    for number, name in enumerate(class_names[1:], start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, str(name)[:64]
        roi.ReferencedFrameOfReferenceUID = source.frame_of_reference_uid
        roi.ROIGenerationAlgorithm, roi.ROIGenerationDescription = "AUTOMATIC", text[:64]
        rois.append(roi)
        items = []
        for k in range(mask.shape[2]):
            plane = mask[:, :, k] == number
            if not plane.any():
                continue
            for contour in mask_contours(plane):
                points = source.positions[k] + contour @ in_plane.T
                item = Dataset()
                item.ContourImageSequence = Seq([images[k]])
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(points)
                item.ContourNumber = len(items) + 1
                item.ContourData = [f"{v:.4f}" for v in points.ravel()]
                items.append(item)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = list(_COLOURS[(number - 1) % len(_COLOURS)])
        if items:  # a ContourSequence, when present, needs at least one item
            roi_contour.ContourSequence = Seq(items)
        contours.append(roi_contour)
        obs = Dataset()
        obs.ObservationNumber, obs.ReferencedROINumber = number, number
        obs.RTROIInterpretedType = ("GTV" if _TUMOUR.search(name)
                                    else "ORGAN" if name.lower() in _ORGANS else "")
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = Seq(rois)
    ds.ROIContourSequence = Seq(contours)
    ds.RTROIObservationsSequence = Seq(observations)
    ds.ApprovalStatus = "UNAPPROVED"
    out.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out


def _image_ref(sop_class_uid: str, sop_instance_uid: str) -> Any:
    from pydicom.dataset import Dataset

    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sop_class_uid, sop_instance_uid
    return ref


def write_ct_series(hu: np.ndarray, folder: str | Path, affine: np.ndarray, *,
                    description: str = "synthetic CT", patient_id: str = "DMOE-0001",
                    file_names: Sequence[str] | None = None,
                    instance_numbers: Sequence[int] | None = None,
                    intercept: float = -1024.0, slope: float = 1.0) -> list[Path]:
    """Write a CT volume ``(X, Y, Z)`` in HU as one single-frame CT series (uint16 stored).

    ``affine`` maps ``(i, j, k)`` to RAS mm (as ``DicomVolume.affine``); its first two
    columns become ImageOrientationPatient/PixelSpacing, slice k sits at
    ``affine @ (0, 0, k)``. ``file_names`` / ``instance_numbers`` (per slice) let tests
    store slices under misleading names and numbers. Returns the files, in slice order.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    col_step, row_step = lps[:3, 0], lps[:3, 1]
    dx, dy = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    orientation = [*(col_step / dx), *(row_step / dy)]
    stored = np.round((np.asarray(hu, dtype=np.float64) - intercept) / slope)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError(f"HU range {hu.min()}..{hu.max()} does not fit uint16 with intercept "
                         f"{intercept} and slope {slope}")
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(stored.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_SOP_CLASS
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CT_IMAGE_SOP_CLASS
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = "Synthetic^Phantom", patient_id
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame, ""
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "CT", 1, description
        ds.Manufacturer = "napari-dmoe synthetic"
        ds.InstanceNumber = int(instance_numbers[k]) if instance_numbers else k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in lps[:3, 3] + k * lps[:3, 2]]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
        ds.PixelSpacing = [f"{dy:.6f}", f"{dx:.6f}"]
        ds.SliceThickness = f"{float(np.linalg.norm(lps[:3, 2])):.6f}"
        ds.Rows, ds.Columns = int(stored.shape[1]), int(stored.shape[0])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, slope, "HU"
        ds.KVP = ""
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T.astype(np.uint16)).tobytes()
        name = file_names[k] if file_names else f"slice_{k:04d}.dcm"
        path = folder / name
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
