"""What this node writes, and how to recognise it when it comes back: one place for the rules.

``dicom_io`` (eligibility: never re-analyse our own overlay) and ``encoding`` (building the outputs) both read these;
this module imports neither, so neither imports the other for them.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
)

__all__ = ["OUTPUT_MANUFACTURER", "OUR_SOP_CLASSES", "SERIES_DESCRIPTION_PREFIX", "fit_size", "is_display_of",
           "is_own_output"]

#: Manufacturer (0008,0070) of every output; :func:`is_own_output` recognises our instances by it.
OUTPUT_MANUFACTURER = "CXR Triage Node"

#: Prefix of every output's Series Description (second recognition signal).
SERIES_DESCRIPTION_PREFIX = "AI CXR triage"

#: The SOP classes we emit (SR, GSPS, SC overlay).
OUR_SOP_CLASSES = frozenset(
    {
        ComprehensiveSRStorage,
        EnhancedSRStorage,
        "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
        GrayscaleSoftcopyPresentationStateStorage,
        SecondaryCaptureImageStorage,
    }
)


def _ihe_algorithm(item: Dataset) -> bool:
    return any(
        code.get("CodeValue") == "Newcode1" and code.get("CodingSchemeDesignator") == "99IHE"
        for code in item.get("PurposeOfReferenceCodeSequence", [])
    )


def is_own_output(ds: Dataset) -> bool:
    """True for any instance this node wrote (so the receiver never re-analyses its own overlay).

    Recognised by Manufacturer, or, for the SR/PR/SC classes we emit, by our contributing-equipment item or series
    description (a PACS that rewrites Manufacturer still leaves those).
    """
    if str(ds.get("Manufacturer", "") or "").strip() == OUTPUT_MANUFACTURER:
        return True
    if str(ds.get("SOPClassUID", "")) not in OUR_SOP_CLASSES:
        return False
    if str(ds.get("SeriesDescription", "") or "").startswith(SERIES_DESCRIPTION_PREFIX):
        return True
    return any(
        str(item.get("Manufacturer", "") or "") == OUTPUT_MANUFACTURER or _ihe_algorithm(item)
        for item in ds.get("ContributingEquipmentSequence", [])
    )


def fit_size(rows: int, columns: int, max_size: int) -> tuple[int, int]:
    """(rows, columns) scaled down, aspect kept, so the longer side is ``max_size``; unchanged when it already fits
    or ``max_size`` is 0."""
    longest = max(rows, columns)
    if max_size <= 0 or longest <= max_size:
        return rows, columns
    scale = max_size / longest
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def is_display_of(shape: tuple[int, ...], rows: int, columns: int) -> bool:
    """Whether a rendering of this shape belongs to a rows x columns image: its size, or :func:`fit_size` of it."""
    return len(shape) == 2 and 0 < shape[0] <= rows and 0 < shape[1] <= columns and \
        tuple(shape) == fit_size(rows, columns, max(shape))
