"""DICOM encoding of triage results: TID 1500 SR, overlay SC, GSPS. Knows no network."""

from triage_node.encoding.results import (
    OUTPUT_MANUFACTURER,
    build_results,
    is_own_output,
)
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


def _cache_iod_lookups() -> None:
    """Memoise highdicom's ``is_attribute_in_iod`` where our encoders reach it (the document constructors, SR image
    references): a pure function of the standard's tables that walks every module of the IOD on each call (~6 calls,
    ~2 ms each, per result), always with the same few arguments."""
    import functools

    import highdicom._standard_utils
    import highdicom.base
    import highdicom.sr.content

    original = getattr(highdicom.base, "is_attribute_in_iod", None)
    if original is None or hasattr(original, "cache_info"):
        return
    cached = functools.lru_cache(maxsize=256)(
        lambda attribute, sop_class_uid, exclude: original(attribute, sop_class_uid, list(exclude) if exclude else None)
    )

    @functools.wraps(original)
    def lookup(attribute: str, sop_class_uid: str, exclude_path_elements=None) -> bool:
        exclude = tuple(exclude_path_elements) if exclude_path_elements else None
        return cached(str(attribute), str(sop_class_uid), exclude)

    lookup.cache_info = cached.cache_info  # type: ignore[attr-defined]
    for module in (highdicom.base, highdicom.sr.content, highdicom._standard_utils):
        if getattr(module, "is_attribute_in_iod", None) is original:
            module.is_attribute_in_iod = lookup  # type: ignore[attr-defined]


_cache_iod_lookups()


def _fast_code_hashes() -> None:
    """highdicom's ``CodedConcept.__hash__`` (``hash(scheme_designator + value)``) reads three attributes through
    pydicom's attribute lookup; content sequences hash every item's concept name on append, ~270 times per SR: 1/6
    of building it. The same hash, read from the dataset's elements (anything unusual: highdicom's own code)."""
    from highdicom.sr.coding import CodedConcept
    from pydicom.dataelem import DataElement
    from pydicom.tag import Tag

    original = CodedConcept.__hash__
    if getattr(original, "_triage_fast", False):
        return
    scheme_tag = Tag("CodingSchemeDesignator")
    value_tags = (Tag("CodeValue"), Tag("LongCodeValue"), Tag("URNCodeValue"))  # highdicom's order of precedence

    def code_hash(self) -> int:
        elements = self._dict
        scheme = elements.get(scheme_tag)
        for tag in value_tags:
            value = elements.get(tag)
            if value is not None:
                break
        if type(scheme) is DataElement and type(value) is DataElement:
            return hash(scheme.value + value.value)
        return original(self)

    code_hash._triage_fast = True  # type: ignore[attr-defined]
    code_hash.original = original  # type: ignore[attr-defined]
    CodedConcept.__hash__ = code_hash  # type: ignore[method-assign]


_fast_code_hashes()
