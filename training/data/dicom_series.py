"""Read a DICOM image series (one folder, one or several series) as a NIfTI-like volume.

Array order and geometry (shared/DATA_FORMATS.md §4): ``DicomVolume.array`` is float32
``(X, Y, Z)`` = (column i, row j, slice k), the voxel order of a NIfTI file converted from
the same series, and ``DicomVolume.affine`` maps ``(i, j, k, 1)`` to **RAS** millimetres
(NIfTI convention, RAS = diag(-1, -1, 1) · LPS), so code written for NIfTI arrays and
affines uses a DICOM series unchanged. Slices go in increasing order along the DICOM
normal (row direction × column direction); the order comes from the projection of
``ImagePositionPatient`` on that normal, never from file names or ``InstanceNumber``.
Values are ``stored × RescaleSlope + RescaleIntercept`` (Hounsfield units for CT).

Slice ordering, the regular-spacing check and the affine are highdicom's
(``get_series_volume_positions``, ``VolumeGeometry``); before calling it we diagnose what
is wrong with a series it would reject (mixed sizes or orientations, duplicate positions,
gantry tilt, missing slices, uneven spacing) so the message names the problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.data.errors import DicomError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SPACING_RTOL = 0.01
"""Consecutive slice spacings may differ by 1 % of the mean spacing (highdicom's default)."""
PERPENDICULAR_TOL = 1e-3
"""|cos(angle) - 1| between slice offsets and the normal (about 2.6°), as highdicom."""
ORIENTATION_TOL = 1e-4
IDENTITY_KEYWORDS = (
    "SpecificCharacterSet",
    # Patient module: who, and whether and how the identity was removed
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # Clinical Trial Subject / Study modules
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
    # General Study and Patient Study modules
    "StudyInstanceUID", "StudyID", "StudyDate", "StudyTime", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "ReferringPhysicianName", "StudyDescription",
    "PatientAge", "PatientSize", "PatientWeight", "AdditionalPatientHistory",
)
"""Patient and study attributes an RTSTRUCT copies from the source (with the character set
its names are encoded in). A DICOM-SEG gets these too: highdicom copies the source's whole
Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study
modules; keeping both outputs alike keeps a PACS's patient and study records consistent."""


@dataclass(frozen=True)
class SeriesInfo:
    """One image series found in a folder (headers only, pixel data not read)."""

    folder: Path
    series_instance_uid: str
    description: str
    modality: str
    files: tuple[Path, ...]


@dataclass
class DicomVolume:
    """A DICOM series as a volume in NIfTI voxel order (module docstring).

    ``array``: float32 ``(X, Y, Z)`` = (columns, rows, slices), or None when read with
    ``pixels=False``. ``affine``: 4×4 voxel ``(i, j, k)`` → RAS mm. ``spacing``: mm along
    i, j, k (``PixelSpacing[1]``, ``PixelSpacing[0]``, slice spacing). ``files``,
    ``sop_instance_uids`` and ``positions`` (LPS ``ImagePositionPatient``, ``(Z, 3)``)
    follow slice order k. ``identity``: patient/study attributes (``IDENTITY_KEYWORDS``).
    ``position_reference_indicator``: the frame of reference's anatomical reference (may
    be empty), which an RTSTRUCT repeats with ``frame_of_reference_uid``.
    """

    array: np.ndarray | None
    affine: np.ndarray
    spacing: tuple[float, float, float]
    description: str
    folder: Path
    files: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    orientation: tuple[float, ...]
    positions: np.ndarray
    rows: int
    columns: int
    identity: dict[str, Any] = field(default_factory=dict)
    position_reference_indicator: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(X, Y, Z)`` = (columns, rows, slices)."""
        return (self.columns, self.rows, len(self.files))

    @property
    def affine_lps(self) -> np.ndarray:
        """4×4 voxel ``(i, j, k)`` → DICOM patient LPS mm."""
        return LPS_TO_RAS @ self.affine


def _pydicom():
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - pydicom is a dependency
        raise DicomError("reading DICOM needs pydicom: pip install pydicom highdicom") from exc
    return pydicom


def _read_header(path: Path) -> Any | None:
    """The dataset without pixel data, or None when ``path`` is not a DICOM file."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError,
            AttributeError, KeyError, TypeError):
        return None


def _is_image(ds: Any) -> bool:
    """A single image with a place in patient space (not DICOMDIR, SEG, RTSTRUCT, SR ...)."""
    return "Rows" in ds and "Columns" in ds and ds.get("Modality", "") not in (
        "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO")


def is_dicom_path(path: str | Path) -> bool:
    """True for a ``.dcm`` file, a DICOM file, or a folder holding at least one DICOM file.

    Cheap: reads the 132-byte preamble of at most the first 20 files of a folder.
    """
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".dcm" or _has_dicm_magic(path)
    if path.is_dir():
        files = [p for p in sorted(path.iterdir()) if p.is_file()][:20]
        return any(p.suffix.lower() == ".dcm" or _has_dicm_magic(p) for p in files)
    return False


def _has_dicm_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _scan(folder: Path) -> dict[str, list[tuple[Path, Any]]]:
    """Image files directly in ``folder`` grouped by SeriesInstanceUID (headers only)."""
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        ds = _read_header(path)
        if ds is None or not _is_image(ds):
            continue
        uid = str(ds.get("SeriesInstanceUID", "")) or f"(no SeriesInstanceUID) {path.name}"
        groups.setdefault(uid, []).append((path, ds))
    return groups


def _description(ds: Any) -> str:
    text = str(ds.get("SeriesDescription", "") or "").strip()
    if text:
        return text
    number = ds.get("SeriesNumber")
    return f"{ds.get('Modality', 'DICOM')} series {number if number is not None else ''}".strip()


def find_series(path: str | Path) -> list[SeriesInfo]:
    """The image series in a folder, or the one series a single file belongs to.

    A folder may hold several series (one per SeriesInstanceUID); only files directly in
    the folder are read (headers only). A single file opens its whole series from its
    folder. Raises ``DicomError`` when there is no DICOM image series.
    """
    return [info for info, _ in _find_series(path)]


def _find_series(path: str | Path) -> list[tuple[SeriesInfo, list[Any]]]:
    """:func:`find_series` with each series' headers (in ``info.files`` order)."""
    path = Path(path)
    if not path.exists():
        raise DicomError(f"{path}: no such file or folder; check the path.")
    folder = path if path.is_dir() else path.parent
    only = None
    if path.is_file():
        ds = _read_header(path)
        if ds is None:
            raise DicomError(f"{path}: not a DICOM file (no DICM preamble, or unreadable).")
        if not _is_image(ds):
            raise DicomError(f"{path}: a DICOM {ds.get('Modality', '')} object without "
                             "an image; open the folder of the image series instead.")
        only = str(ds.get("SeriesInstanceUID", ""))
    groups = _scan(folder)
    if not groups:
        raise DicomError(f"{folder}: no DICOM image series in this folder (subfolders are "
                         "not searched); open the folder that holds the slice files.")
    out = []
    for uid, items in groups.items():
        if only is not None and uid != only:
            continue
        out.append((SeriesInfo(folder=folder, series_instance_uid=uid,
                               description=_description(items[0][1]),
                               modality=str(items[0][1].get("Modality", "")),
                               files=tuple(p for p, _ in items)),
                    [ds for _, ds in items]))
    return out


def read_series(path: str | Path | SeriesInfo, series_uid: str | None = None, *,
                pixels: bool = True) -> DicomVolume:
    """Read one series as a ``DicomVolume`` (array ``(X, Y, Z)``, RAS affine).

    Args:
        path: a folder holding the series, or one file of it (opens the whole series), or
            a ``SeriesInfo`` from ``find_series`` (its files, without scanning the folder).
        series_uid: which series when the folder holds several; required then.
        pixels: False reads headers and geometry only (``array`` is None), e.g. to write
            a DICOM-SEG or RTSTRUCT that references the series.

    Raises:
        DicomError: no series, several series and no ``series_uid``, mixed sizes or
            orientations, duplicate positions, gantry tilt, missing slices, uneven
            spacing, a multi-frame or colour series, or undecodable pixel data.
    """
    if isinstance(path, SeriesInfo):
        pydicom = _pydicom()
        return _volume(path, [pydicom.dcmread(p, stop_before_pixels=not pixels)
                              for p in path.files], pixels)
    found = _find_series(path)
    series = [info for info, _ in found]
    if series_uid is None and len(series) > 1:
        listed = "; ".join(f"{s.description} ({len(s.files)} files, {s.series_instance_uid})"
                           for s in series)
        raise DicomError(f"{path}: the folder holds {len(series)} series ({listed}); move "
                         "each series into its own folder, or choose one by its "
                         "SeriesInstanceUID.")
    if series_uid is not None:
        series = [s for s in series if s.series_instance_uid == series_uid]
        if not series:
            raise DicomError(f"{path}: no series with SeriesInstanceUID {series_uid}.")
    info = series[0]
    if pixels:
        datasets = [_pydicom().dcmread(p) for p in info.files]
    else:  # the headers find_series already read
        datasets = next(headers for s, headers in found if s is info)
    return _volume(info, datasets, pixels)


def _volume(info: SeriesInfo, datasets: list[Any], pixels: bool) -> DicomVolume:
    import highdicom as hd

    files = list(info.files)
    _check_series(info, files, datasets)
    spacing, index = hd.spatial.get_series_volume_positions(
        datasets, rtol=SPACING_RTOL, perpendicular_tol=PERPENDICULAR_TOL,
        orientation_tol=ORIENTATION_TOL)
    if spacing is None:  # _check_series names the usual reasons; this is a fallback
        raise DicomError(f"{info.folder}: series '{info.description}' is not a regularly "
                         "spaced volume (highdicom); resample it to even slices.")
    # highdicom's volume index runs against the normal; ours runs along it
    order = sorted(range(len(datasets)), key=lambda n: -index[n])
    datasets = [datasets[n] for n in order]
    files = [files[n] for n in order]
    first = datasets[-1]  # highdicom's volume index 0
    geometry = hd.VolumeGeometry.from_attributes(
        image_position=first.ImagePositionPatient,
        image_orientation=first.ImageOrientationPatient, rows=int(first.Rows),
        columns=int(first.Columns), pixel_spacing=first.PixelSpacing,
        spacing_between_slices=float(spacing), number_of_frames=len(datasets),
        coordinate_system="PATIENT")
    geometry = geometry.flip_spatial(0).permute_spatial_axes([2, 1, 0])
    affine_lps = np.asarray(geometry.affine, dtype=np.float64)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    _check_affine(info, affine_lps, positions)
    array = _pixels(info, files, datasets) if pixels else None
    ps = [float(v) for v in first.PixelSpacing]
    head = datasets[0]
    return DicomVolume(
        array=array, affine=LPS_TO_RAS @ affine_lps,
        spacing=(ps[1], ps[0], float(spacing)), description=info.description,
        folder=info.folder, files=tuple(files),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in datasets),
        sop_class_uid=str(head.SOPClassUID), series_instance_uid=info.series_instance_uid,
        study_instance_uid=str(head.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(head.get("FrameOfReferenceUID", "")),
        modality=str(head.get("Modality", "")),
        orientation=tuple(float(v) for v in head.ImageOrientationPatient),
        positions=positions, rows=int(head.Rows), columns=int(head.Columns),
        identity={k: head.get(k) for k in IDENTITY_KEYWORDS if k in head},
        position_reference_indicator=str(head.get("PositionReferenceIndicator", "") or ""))


def _check_series(info: SeriesInfo, files: list[Path], datasets: list[Any]) -> None:
    """Name what is wrong with a series that is not one regular volume (headers only)."""
    where = f"{info.folder}: series '{info.description}'"
    for path, ds in zip(files, datasets):
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise DicomError(f"{path}: a multi-frame (enhanced) image with {frames} frames; "
                             "napari-dmoe reads single-frame series. Convert it with "
                             "`emf2sf` (dcm4che) or dcm2niix.")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise DicomError(f"{path}: colour DICOM (SamplesPerPixel "
                             f"{ds.SamplesPerPixel}); only grayscale series are read.")
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient",
                               "PixelSpacing") if k not in ds]
        if missing:
            raise DicomError(f"{path}: no {', '.join(missing)}; the image has no place in "
                             "patient space (a localiser or secondary capture?). Remove it "
                             "from the folder.")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise DicomError(f"{where} mixes image sizes {sorted(sizes)}; keep one acquisition "
                         "per folder.")
    iop = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
    if np.abs(iop - iop[0]).max() > ORIENTATION_TOL:
        bad = files[int(np.abs(iop - iop[0]).max(axis=1).argmax())]
        raise DicomError(f"{where} mixes slice orientations (e.g. {files[0].name} and "
                         f"{bad.name}); keep one acquisition per folder.")
    spacings = {tuple(round(float(v), 6) for v in ds.PixelSpacing) for ds in datasets}
    if len(spacings) > 1:
        raise DicomError(f"{where} mixes pixel spacings {sorted(spacings)}.")
    if len(datasets) < 2:
        return
    row, col = iop[0, :3], iop[0, 3:]
    normal = np.cross(row, col)
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    depth = pos @ normal
    order = np.argsort(depth, kind="stable")
    depth, pos = depth[order], pos[order]
    steps = np.diff(depth)
    same = np.flatnonzero(np.abs(steps) < 1e-3)
    if same.size:
        a, b = files[order[same[0]]].name, files[order[same[0] + 1]].name
        raise DicomError(f"{where}: two slices at the same position ({a} and {b}, "
                         f"{depth[same[0]]:.2f} mm along the normal); the folder may hold "
                         "two acquisitions with one SeriesInstanceUID. Separate them.")
    sideways = (pos - pos[0]) - np.outer(depth - depth[0], normal)
    drift = np.linalg.norm(sideways[-1]) / max(depth[-1] - depth[0], 1e-9)
    if np.degrees(np.arctan(drift)) > np.degrees(np.arccos(1 - PERPENDICULAR_TOL)):
        raise DicomError(f"{where}: slices are shifted sideways along the stack (gantry tilt "
                         f"of about {np.degrees(np.arctan(drift)):.1f}°); the volume would be "
                         "sheared. Resample it to an untilted grid first (dcm2niix corrects "
                         "gantry tilt), then open the result.")
    step = float(np.median(steps))
    if np.all(np.abs(steps - step) <= SPACING_RTOL * step):
        return
    smallest = float(steps.min())
    multiples = steps / smallest
    if np.all(np.abs(multiples - np.round(multiples)) * smallest <= SPACING_RTOL * smallest):
        gap = int(np.argmax(steps))
        count = int(round(float(np.sum(np.round(multiples) - 1))))
        raise DicomError(f"{where}: {count} slice(s) missing (spacing {smallest:.3g} mm, but "
                         f"a gap of {steps[gap]:.3g} mm between {depth[gap]:.2f} and "
                         f"{depth[gap + 1]:.2f} mm along the normal, after "
                         f"{files[order[gap]].name}). Copy the missing files into the folder.")
    raise DicomError(f"{where}: uneven slice spacing ({smallest:.3g} to {float(steps.max()):.3g}"
                     " mm between consecutive slices); resample it to even slices first "
                     "(e.g. dcm2niix, then open the NIfTI).")


def _check_affine(info: SeriesInfo, affine_lps: np.ndarray, positions: np.ndarray) -> None:
    k = np.arange(len(positions), dtype=np.float64)
    expected = affine_lps[:3, 3] + np.outer(k, affine_lps[:3, 2])
    error = float(np.abs(expected - positions).max())
    tolerance = max(0.05, SPACING_RTOL * float(np.linalg.norm(affine_lps[:3, 2])) * 2)
    if error > tolerance:
        raise DicomError(f"{info.folder}: series '{info.description}': slice positions "
                         f"deviate up to {error:.3g} mm from a regular grid; resample it.")


def _pixels(info: SeriesInfo, files: list[Path], datasets: list[Any]) -> np.ndarray:
    """Decode every slice (``(Y, X)``), apply the modality LUT/rescale, stack ``(X, Y, Z)``."""
    from pydicom.pixels import apply_modality_lut

    out = np.empty((int(datasets[0].Columns), int(datasets[0].Rows), len(datasets)),
                   dtype=np.float32)
    for k, (path, ds) in enumerate(zip(files, datasets)):
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        try:
            frame = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the same story
            name = getattr(syntax, "name", str(syntax))
            raise DicomError(
                f"{path}: cannot decode the pixel data ({name}): {exc}. Install a decoder "
                "(`pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg`) or "
                "decompress the series (`gdcmconv --raw` or dcmtk `dcmdjpeg`).") from exc
        values = apply_modality_lut(frame, ds) if (
            "RescaleSlope" in ds or "ModalityLUTSequence" in ds or "RescaleIntercept" in ds
        ) else frame
        out[:, :, k] = np.asarray(values, dtype=np.float32).T
    return out
