"""Make a source header safe to copy into our outputs.

Real archives hold non-conformant headers (the RSNA files carry ``PatientAge "48"`` and 19-character DS values). The
patient, study and equipment attributes of the source are copied verbatim into every result we write, so an invalid
value there would make our own SR/SC/GSPS fail validation or be rejected by a strict PACS. :func:`clean_source`
validates every top-level element by its VR and either repairs it when the repair is unambiguous (same information,
conformant encoding) or removes it. It never invents patient data.

It also completes what the modules we copy (Patient, General Study, Patient Study) require of their top level, as
PS3.3 allows without inventing anything: an absent Type 2 attribute is added empty (= unknown), an empty Type 1 or
1C attribute is left out (empty is never legal for those), and a multi-valued Specific Character Set whose first
value is empty gets its meaning spelled out (PS3.3 C.12.1.1.2: an empty value 1 means ISO 2022 IR 6). Real
archives (Google's NIH conversion, anonymisers) drop Type 2 attributes; highdicom reads them unconditionally.
"""

from __future__ import annotations

import copy
import datetime
import logging
import math
import re
import weakref
from functools import lru_cache
from typing import Any

from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import VALIDATORS, format_number_as_ds

from triage_node.errors import BadDataset

logger = logging.getLogger(__name__)

#: Identity of the source; never altered even when malformed, or results would not land beside the image.
_IDENTITY = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"})

#: Type 2 attributes of the modules we copy (Patient, General Study): blanked, never deleted, when invalid.
_TYPE2 = frozenset(
    {
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
        "ReferringPhysicianName", "StudyID", "AccessionNumber",
    }
)

#: Enumerated values that highdicom enforces (``PatientSexValues``).
_ENUMS = {"PatientSex": frozenset({"M", "F", "O"})}

#: Modules whose top-level attributes highdicom copies from the source into every output.
_COPIED_MODULES = ("patient", "general-study", "patient-study")
#: Type 1 attributes of the source that no output can be built without (never invented).
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")

_TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)
_AGE = re.compile(r"^\s*0*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_DROP = object()


def _valid(vr: str, value: str) -> bool:
    validator = VALIDATORS.get(vr)
    if validator is None:
        return True
    ok, _ = validator(vr, value)
    if not ok:
        return False
    if vr == "DA" and value.strip():
        try:
            datetime.datetime.strptime(value.strip(), "%Y%m%d")
        except ValueError:
            return False
    return True


def _repair(vr: str, value: str) -> str | object:
    """Return a conformant spelling of ``value`` carrying the same information, or ``_DROP``."""
    if vr == "AS":
        m = _AGE.match(value)
        if m:  # digits only means years (the RSNA convention and the only common one)
            return f"{int(m.group(1)):03d}{(m.group(2) or 'Y').upper()}"
    elif vr == "DS":
        try:
            number = float(value)
        except ValueError:
            return _DROP
        if math.isfinite(number):
            text = format_number_as_ds(number)
            if "." in text and "e" not in text.lower():
                text = text.rstrip("0").rstrip(".")
            return text
    elif vr == "IS":
        try:
            number = float(value)
        except ValueError:
            return _DROP
        if math.isfinite(number) and number.is_integer() and abs(number) < 2**31:
            return str(int(number))
    elif vr == "DA":
        candidate = re.sub(r"[.\-/]", "", value.strip())
        return candidate if candidate != value else _DROP
    elif vr == "TM":
        candidate = value.strip().replace(":", "")
        return candidate if candidate != value else _DROP
    elif vr == "CS":
        candidate = value.strip().upper()
        return candidate if candidate != value else _DROP
    return _DROP


def _clean_values(keyword: str, vr: str, values: list[Any]) -> list[str | None] | object | None:
    """Return new values, ``_DROP``, or ``None`` when the element is fine as it is."""
    changed = False
    out: list[str | None] = []
    for raw in values:
        if raw is None:
            out.append(raw)
            continue
        value = str(raw)
        if value == "" or _valid(vr, value):
            out.append(value)
            continue
        if keyword in _IDENTITY:
            return None
        fixed = _repair(vr, value)
        if fixed is _DROP or not _valid(vr, str(fixed)):
            return _DROP
        out.append(str(fixed))
        changed = True
    allowed = _ENUMS.get(keyword)
    if allowed is not None and any(v and v not in allowed for v in out):
        return _DROP
    if keyword == "SpecificCharacterSet" and any(v and v not in python_encoding for v in out):
        return _DROP
    return out if changed else None


@lru_cache(maxsize=1)
def _module_types() -> tuple[frozenset[str], frozenset[str]]:
    """(Type 2, Type 1/1C) top-level keywords of the copied modules, from highdicom's tables of the standard."""
    from highdicom._standard_utils import get_module_attribute_map

    table = get_module_attribute_map()
    attrs = [a for m in _COPIED_MODULES for a in table.get(m, []) if not a["path"]]
    type2 = frozenset(a["keyword"] for a in attrs if a["type"] == "2") | _TYPE2 - {"ViewPosition"}
    type1 = frozenset(a["keyword"] for a in attrs if a["type"] in ("1", "1C")) - _IDENTITY
    return type2, type1


def _complete(out: Dataset, changed: list[str]) -> None:
    """Add absent Type 2, drop empty Type 1/1C attributes of the copied modules; spell out the character set."""
    for keyword in _REQUIRED:
        if not str(out.get(keyword, "") or "").strip():
            raise BadDataset(f"source lacks Type 1 {keyword}")
    type2, type1 = _module_types()
    for keyword in sorted(type2):
        if keyword not in out:
            setattr(out, keyword, None)
            changed.append(keyword)
    for keyword in sorted(type1):
        if keyword in out and out[keyword].is_empty:
            del out[keyword]
            changed.append(keyword)
    if "SpecificCharacterSet" in out:
        elem = out["SpecificCharacterSet"]
        values = [str(v or "").strip() for v in (elem.value if elem.VM > 1 else [elem.value])]
        if not any(values) or values == ["ISO_IR 6"]:  # the default repertoire, said the long way
            del out["SpecificCharacterSet"]
            changed.append("SpecificCharacterSet")
        elif len(values) > 1 and not values[0]:
            out.SpecificCharacterSet = ["ISO 2022 IR 6", *values[1:]]
            changed.append("SpecificCharacterSet")


def clean_source(ds: Dataset) -> tuple[Dataset, list[str]]:
    """Return a copy of ``ds`` whose top-level text attributes are valid for their VR and whose copied modules
    are complete (absent Type 2 added empty, empty Type 1/1C left out).

    Parameters
    ----------
    ds
        Source image as read (file meta and pixel data are left untouched).

    Returns
    -------
    tuple[pydicom.dataset.Dataset, list[str]]
        The cleaned copy and the keywords of the attributes that were repaired or removed (names only, so callers
        can log them without leaking values). A dataset this function returned is returned as it is, with no
        changes: cleaning is idempotent, and each encoder cleans its input again (a deep copy per output saved).

    Raises
    ------
    BadDataset
        When the source lacks a UID no output can do without (Study/Series/SOP Instance UID, SOP Class UID).
    """
    seen = _CLEANED.get(id(ds))
    if seen is not None and seen() is ds:
        return ds, []
    out = copy.deepcopy(ds)
    changed: list[str] = []
    for elem in list(out):
        elem = out[elem.tag]  # materialise RawDataElements
        if elem.tag.group == 0x0002 or elem.tag.is_private or elem.VR not in _TEXT_VRS or elem.is_empty:
            continue
        keyword = elem.keyword or str(elem.tag)
        values = list(elem.value) if elem.VM > 1 else [elem.value]
        result = _clean_values(keyword, elem.VR, values)
        if result is None:
            continue
        if result is _DROP:
            if keyword in _TYPE2:
                out[elem.tag] = DataElement(elem.tag, elem.VR, None)
            else:
                del out[elem.tag]
        else:
            assert isinstance(result, list)
            out[elem.tag] = DataElement(elem.tag, elem.VR, result if len(result) > 1 else result[0])
        changed.append(keyword)
    _complete(out, changed)
    if changed:
        logger.debug("cleaned source attributes %s of %s", ",".join(changed), ds.get("SOPInstanceUID", "?"))
    key = id(out)
    _CLEANED[key] = weakref.ref(out, lambda _ref: _CLEANED.pop(key, None))
    return out, changed


#: id -> weak reference of the datasets clean_source returned (Dataset defines __eq__, so it cannot key a WeakSet;
#: the identity check on lookup makes a reused id harmless).
_CLEANED: dict[int, weakref.ref] = {}


def carry_anatomy(out: Dataset, source: Dataset) -> None:
    """Body Part Examined and Laterality of the source into an image-series output (SC, GSPS: General Series).

    Laterality is Type 2C there: required when the body part is paired. A known Body Part Examined (CHEST: unpaired)
    is copied and Laterality left out; a known Laterality is copied; with neither known (Google's NIH conversion has
    no Body Part Examined) Laterality is sent empty (= unknown), never guessed.
    """
    if source.get("BodyPartExamined"):
        out.BodyPartExamined = source.BodyPartExamined
    if source.get("Laterality"):
        out.Laterality = source.Laterality
    elif not source.get("BodyPartExamined"):
        out.Laterality = None
