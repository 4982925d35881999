"""DICOM in and out: one import for the CLI, the manifest readers and the plugin.

- ``find_series(folder_or_file)`` → ``list[SeriesInfo]`` (one per SeriesInstanceUID);
- ``read_series(folder_or_file, series_uid=None)`` → ``DicomVolume``: float32 HU array
  ``(X, Y, Z)`` in NIfTI voxel order (columns, rows, slices) with a 4×4 RAS affine;
- ``write_dicom_seg`` / ``write_rtstruct``: a mask ``(X, Y, Z)`` back to a DICOM
  Segmentation or an RT Structure Set referencing the source series;
- ``write_ct_series``: a CT volume to a plain DICOM series (tests, demos, benchmarks).

Geometry conventions: ``training.data.dicom_series``. Errors: ``DicomError`` (a
``DataError``) naming the folder or file, the problem and what to do.
"""

from __future__ import annotations

from training.data.dicom_export import (
    check_output,
    mask_contours,
    resolve_source,
    software_version,
    write_ct_series,
    write_dicom_seg,
    write_rtstruct,
)
from training.data.dicom_series import (
    DicomVolume,
    SeriesInfo,
    find_series,
    is_dicom_path,
    read_series,
)
from training.data.errors import DicomError

__all__ = [
    "DicomError", "DicomVolume", "SeriesInfo", "check_output", "find_series", "is_dicom_path",
    "mask_contours", "read_series", "resolve_source", "software_version", "write_ct_series",
    "write_dicom_seg", "write_rtstruct",
]
