"""DICOM encoding of triage results: TID 1500 SR, overlay SC, GSPS. Knows no network."""

from triage_node.encoding.results import OUTPUT_MANUFACTURER, build_results, is_own_output
from triage_node.encoding.sanitize import clean_source
from triage_node.encoding.uids import derive_uid, model_device_uid

__all__ = [
    "OUTPUT_MANUFACTURER",
    "build_results",
    "clean_source",
    "derive_uid",
    "is_own_output",
    "model_device_uid",
]
