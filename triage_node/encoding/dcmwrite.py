"""Write the datasets this node builds (SR, SC, GSPS) to DICOM files: byte for byte what pydicom's ``dcmwrite``
(``save_as(..., enforce_file_format=True)``) writes, with less Python per element.

pydicom's writer spends ~17 us per element (a buffer object per element, the ambiguous-VR walk repeated at every
sequence level, charset look-ups for ASCII text): ~8 ms for a ~470-element SR. This writer handles the common cases
itself (ASCII text, binary numbers, bytes, sequences of datasets built in memory) and hands every other element to
pydicom's own ``write_data_element`` (person names, DS/IS, non-ASCII text, pixel data, ambiguous VRs once corrected
by pydicom's ``correct_ambiguous_vr_element``). A dataset it was not made for (read from a file, raw elements,
an implicit-VR, big-endian or deflated transfer syntax) is written by pydicom instead, whole.
``tests/test_enc_dcmwrite.py`` compares both writers' bytes over every output kind and encoding.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element, write_file_meta_info
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import UID
from pydicom.valuerep import AMBIGUOUS_VR, EXPLICIT_VR_LENGTH_32

__all__ = ["encode", "save"]

_PAD = {vr: b" " for vr in ("AE", "AS", "CS", "DA", "DT", "TM", "LO", "LT", "SH", "ST", "UC", "UT", "UR")}
_PAD["UI"] = b"\0"
_NUMBERS = {"US": "<H", "UL": "<L", "SL": "<l", "FL": "<f", "FD": "<d", "SV": "<q", "UV": "<Q"}  # SS: LUT quirk
_BYTES = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
_LONG = frozenset(str(vr) for vr in EXPLICIT_VR_LENGTH_32)
_AMBIGUOUS = frozenset(str(vr) for vr in AMBIGUOUS_VR)
_PIXEL_DATA = 0x7FE00010
_CHARSET = BaseTag(0x00080005)
_ITEM = b"\xfe\xff\x00\xe0"
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED = 0xFFFFFFFF
_NEW = (None, None)  # Dataset.original_encoding of a dataset built in memory
_short = struct.Struct("<HH2sH").pack  # group, element, VR, 16-bit length
_long = struct.Struct("<HH2sHL").pack  # group, element, VR, reserved, 32-bit length


class _NotMine(Exception):
    """Something this writer does not handle itself at the dataset level: pydicom writes the whole file."""


def _text(value: Any) -> bytes | None:
    """ASCII text (one value or several) as bytes, unpadded; None when pydicom must encode it."""
    if isinstance(value, str):
        return value.encode() if value.isascii() else None
    if type(value) is MultiValue or type(value) is list:
        if all(isinstance(v, str) and v.isascii() for v in value):
            return "\\".join(value).encode()
    return None


def _numbers(value: Any, fmt: str) -> bytes | None:
    try:
        if type(value) is int or type(value) is float:
            return struct.pack(fmt, value)
        if (type(value) is MultiValue or type(value) is list) and all(type(v) is int or type(v) is float
                                                                        for v in value):
            return struct.pack(f"{fmt[0]}{len(value)}{fmt[1]}", *value)
    except struct.error:
        return None  # pydicom raises its own error for it
    return None


def _fallback(out: bytearray, elem: DataElement, encodings: Any) -> None:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, encodings)
    out += fp.getvalue()


def _dataset(out: bytearray, ds: Dataset, parent_encoding: Any, ancestors: list[Dataset]) -> None:
    """Encode ``ds`` (built in memory) as pydicom's ``write_dataset`` does for explicit VR little endian."""
    if ds.original_encoding != _NEW:
        raise _NotMine
    elements = ds._dict  # tag -> element; sorted below, as pydicom writes them
    charset = elements.get(_CHARSET)
    if charset is not None and type(charset) is not DataElement:
        raise _NotMine
    encodings = charset.value if charset is not None else parent_encoding  # ds.get("SpecificCharacterSet", ...)
    for tag in sorted(elements):
        if tag & 0xFFFF == 0 and tag >> 16 > 6:  # retired group lengths are not written (PS3.5 7.2)
            continue
        elem = elements[tag]
        if type(elem) is not DataElement:  # a RawDataElement: only in datasets read from a file
            raise _NotMine
        vr = elem.VR
        if vr in _AMBIGUOUS:
            correct_ambiguous_vr_element(elem, ds, True, ancestors)
            _fallback(out, elem, encodings)
            continue
        if elem.is_undefined_length and vr != "SQ" or tag == _PIXEL_DATA:
            _fallback(out, elem, encodings)
            continue
        value = elem.value
        group, element = tag >> 16, tag & 0xFFFF
        if vr == "SQ":
            undefined = elem.is_undefined_length
            out += _long(group, element, b"SQ", 0, _UNDEFINED)
            start = len(out)
            if value:  # an empty sequence has no items (pydicom: is_empty)
                child_encoding = convert_encodings(encodings or [default_encoding])  # as write_data_element
                for item in value:
                    out += _ITEM
                    at = len(out)
                    out += b"\xff\xff\xff\xff"
                    _dataset(out, item, child_encoding, [item, *ancestors])
                    if getattr(item, "is_undefined_length_sequence_item", False):
                        out += _ITEM_END
                    else:
                        struct.pack_into("<L", out, at, len(out) - at - 4)
            if undefined:
                out += _SEQUENCE_END
            else:
                struct.pack_into("<L", out, start - 4, len(out) - start)
            continue
        if value is None or elem.VM == 0:
            data: bytes | None = b""
        elif vr in _PAD:
            data = _text(value)
            if data is not None and len(data) % 2:
                data += _PAD[vr]
        elif vr in _NUMBERS:
            data = _numbers(value, _NUMBERS[vr])
        elif vr in _BYTES and type(value) is bytes:
            data = value + b"\0" if len(value) % 2 else value
        else:
            data = None
        if data is None:
            _fallback(out, elem, encodings)
        elif vr in _LONG:
            out += _long(group, element, vr.encode(), 0, len(data))
            out += data
        elif len(data) > 0xFFFF:  # pydicom writes it as UN, with a warning
            _fallback(out, elem, encodings)
        else:
            out += _short(group, element, vr.encode(), len(data))
            out += data


def _fast(ds: Dataset) -> bytes:
    """The file's bytes, or raises _NotMine (pydicom then writes it; what was changed of ``ds`` by then, the
    Pixel Data length flag and ambiguous VRs, pydicom changes the same way)."""
    file_meta = getattr(ds, "file_meta", None)
    tsyntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if tsyntax is None:
        raise _NotMine
    tsyntax = UID(tsyntax)
    if (tsyntax.is_private or not tsyntax.is_transfer_syntax or tsyntax.is_implicit_VR
            or not tsyntax.is_little_endian or tsyntax.is_deflated):
        raise _NotMine
    if any(t >> 16 in (0, 2) for t in ds._dict) or ds.original_encoding != _NEW:
        raise _NotMine  # pydicom raises for the former; the latter may hold raw elements
    if getattr(ds, "_is_implicit_VR", None) not in (None, False) or getattr(ds, "_is_little_endian", None) not in (
            None, True):
        raise _NotMine  # set by hand (deprecated): pydicom warns or raises about the conflict
    preamble = getattr(ds, "preamble", None)
    if preamble and len(preamble) != 128:
        raise _NotMine
    body = bytearray()
    if "PixelData" in ds:
        ds["PixelData"].is_undefined_length = tsyntax.is_compressed  # as dcmwrite does
    _dataset(body, ds, default_encoding, [ds])
    # what dcmwrite does with enforce_file_format=True (the file meta is small: pydicom writes it)
    assert file_meta is not None
    ds_class, ds_instance = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
    meta_class, meta_instance = file_meta.get("MediaStorageSOPClassUID"), file_meta.get("MediaStorageSOPInstanceUID")
    if meta_class is None or (ds_class and ds_class != meta_class):
        file_meta.MediaStorageSOPClassUID = ds_class
    if meta_instance is None or (ds_instance and ds_instance != meta_instance):
        file_meta.MediaStorageSOPInstanceUID = ds_instance
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    fp.write(preamble or b"\x00" * 128)
    fp.write(b"DICM")
    write_file_meta_info(fp, file_meta, enforce_standard=True)  # validates it too
    return fp.getvalue() + body


def encode(ds: Dataset) -> bytes:
    """The bytes ``ds.save_as(f, enforce_file_format=True)`` would write."""
    try:
        return _fast(ds)
    except _NotMine:
        fp = DicomBytesIO()
        ds.save_as(fp, enforce_file_format=True)
        return fp.getvalue()


def save(ds: Dataset, path: Path) -> None:
    """``ds.save_as(path, enforce_file_format=True)``, faster for what this node builds (same bytes)."""
    data = encode(ds)
    with open(path, "wb") as f:
        f.write(data)
