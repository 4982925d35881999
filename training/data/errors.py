"""The one exception type for bad data.

Kept in its own module so that the file readers (``io``) and the case logic (``cases``)
can both raise it without importing each other.
"""

from __future__ import annotations


class DataError(ValueError):
    """A dataset problem the user has to fix: missing files, shape mismatch, bad mask values.

    Every message names the case id or file, the problem, and what to do next.
    """


def first_lines(items: list[str], n: int = 5) -> str:
    """Format the first ``n`` items as an indented list, with a count of the rest."""
    lines = [f"  - {item}" for item in items[:n]]
    if len(items) > n:
        lines.append(f"  ... and {len(items) - n} more")
    return "\n".join(lines)


class DicomError(DataError):
    """A DICOM series that cannot be read or written faithfully (training.data.dicom).

    The message names the folder or file, the problem (no series, mixed series, uneven
    slice spacing, gantry tilt, missing slice, undecodable pixel data, non-DICOM source)
    and what to do next.
    """
