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

import warnings as _warnings

# highdicom warns about single-component person names and quotes the name itself: patient data must never reach
# the logs, so that warning is silenced (the name is copied unchanged, as the source has it).
_warnings.filterwarnings("ignore", message=r".*unlikely to represent the intended person name.*")
