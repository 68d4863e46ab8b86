"""Reading instances, deciding eligibility, and turning pixel data into a normalised image.

Pixel data of every accepted transfer syntax is decoded by pydicom's pixel backends: pylibjpeg (libjpeg for JPEG
Baseline/Extended/Lossless and JPEG-LS, openjpeg for JPEG 2000, pylibjpeg-rle for RLE), with python-gdcm installed as
a second decoder for the odd files pylibjpeg refuses. Both are wheels (no system libraries), maintained by the pydicom
organisation, and cover the syntaxes the receiver accepts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from .age import read_age
from .config import EligibilityConfig
from .errors import BadDataset, NotEligible
from .own_outputs import fit_size, is_own_output

log = logging.getLogger(__name__)

CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: SOP classes the receiver accepts (RSNA's files are Secondary Capture with Modality CR).
ACCEPTED_SOP_CLASSES = (CR_IMAGE, DX_PRESENTATION, DX_PROCESSING, SECONDARY_CAPTURE)
LATERAL_VIEWS = ("LL", "RL", "LATERAL", "LAT", "RLD", "LLD")


def read(path: str | Path, header_only: bool = False) -> Dataset:
    """Read a DICOM file, translating every parse failure into BadDataset with a short reason."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=header_only)
    except Exception as exc:  # InvalidDicomError, EOFError, BytesLengthException, struct.error, NotImplementedError...
        raise BadDataset(f"unreadable DICOM: {type(exc).__name__}") from exc


def check_eligible(ds: Dataset, cfg: EligibilityConfig) -> None:
    """Raise NotEligible with the reason when ``ds`` is not a frontal single-frame grayscale chest radiograph.

    Uses the header only; never touches pixel data (the receiver calls it on the association thread).
    A header element pydicom cannot convert (bad VR, bad length, "abc" in an IS) raises BadDataset.
    """
    try:
        _check_eligible(ds, cfg)
    except (NotEligible, BadDataset):
        raise
    except Exception as exc:  # values are parsed lazily: ValueError, NotImplementedError, OverflowError, ...
        raise BadDataset(f"invalid header: {type(exc).__name__}") from exc


def _check_eligible(ds: Dataset, cfg: EligibilityConfig) -> None:
    if is_own_output(ds):
        raise NotEligible("own output (written by this node)")
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in ACCEPTED_SOP_CLASSES:
        raise NotEligible(f"SOP class {sop_class or '(none)'} not processed")
    modality = str(ds.get("Modality", "")).upper()
    if modality not in cfg.modalities:
        raise NotEligible(f"modality {modality or '(blank)'} not processed")
    body_part = str(ds.get("BodyPartExamined", "")).strip().upper()
    if body_part not in cfg.body_parts:
        raise NotEligible(f"body part {body_part} not processed")
    view = str(ds.get("ViewPosition", "")).strip().upper()
    if view in LATERAL_VIEWS:
        if not cfg.allow_lateral:
            raise NotEligible(f"view {view} (lateral) not processed")
    elif view == "":
        if not cfg.allow_unknown_view:
            raise NotEligible("view position unknown")
    elif view not in cfg.views:
        raise NotEligible(f"view {view} not processed")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise NotEligible(f"multi-frame ({frames} frames)")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise NotEligible("not grayscale (SamplesPerPixel != 1)")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotEligible(f"photometric {photometric or '(none)'} not grayscale")
    if "PixelData" not in ds:
        raise BadDataset("no pixel data")


def pixels(ds: Dataset, max_pixels: int = 50_000_000) -> np.ndarray:
    """See ``_pixels``; any failure outside the decoders (a header value pydicom cannot convert) is BadDataset."""
    try:
        return _pixels(ds, max_pixels)
    except BadDataset:
        raise
    except Exception as exc:
        raise BadDataset(f"invalid image header: {type(exc).__name__}") from exc


def _pixels(ds: Dataset, max_pixels: int = 50_000_000) -> np.ndarray:
    """Decoded image as float32 in [0, 1], MONOCHROME2 orientation (dense = bright), source resolution.

    Applies the Modality LUT (rescale) and the VOI LUT / window when the file has one, else a robust
    0.5-99.5 percentile window (of the pixels that are not padding); inverts MONOCHROME1 and Presentation LUT Shape
    INVERSE; pixel padding comes out black (0).
    """
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise BadDataset("missing or zero Rows/Columns")
    if rows * cols > max_pixels:
        raise BadDataset(f"image too large ({rows}x{cols} > {max_pixels} pixels)")
    bits_alloc, bits_stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    if bits_alloc not in (8, 16) or not 1 <= bits_stored <= bits_alloc:
        raise BadDataset(f"unsupported BitsAllocated/BitsStored {bits_alloc}/{bits_stored}")
    _check_encapsulated(ds, rows, cols)
    try:
        raw = _decode(ds)
    except Exception as exc:  # decoders raise many types; all mean "cannot decode"
        raise BadDataset(f"pixel data cannot be decoded: {type(exc).__name__}") from exc
    if raw.ndim != 2 or raw.shape != (rows, cols):
        raise BadDataset(f"decoded shape {raw.shape} does not match {rows}x{cols}")
    padding = _padding(raw, ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    # MONOCHROME1 is displayed inverted. So is MONOCHROME2 with Presentation LUT Shape INVERSE (CR/DX vendors store
    # inverted data that way); MONOCHROME1 + INVERSE is the DX IOD's own spelling of MONOCHROME1 (one inversion).
    invert = photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and shape == "INVERSE")
    voi = "WindowCenter" in ds or "VOILUTSequence" in ds
    if raw.dtype.kind in "ui" and raw.dtype.itemsize <= 2:  # every CR/DX: one table over the stored values
        # the LUTs run on the table's values only: over the whole image a rescale alone is a float64 copy of it
        lut = voi or any(k in ds for k in ("ModalityLUTSequence", "RescaleSlope", "RescaleIntercept"))
        mapping = (lambda values: _voi(_modality_lut(values, ds), ds, voi)) if lut else None
        return _window_by_table(raw, padding, invert, mapping)
    arr = _modality_lut(raw, ds)  # integers stay integers for a VOI LUT Sequence (indices, not floats)
    return _window_by_percentile(np.asarray(_voi(arr, ds, voi), dtype=np.float32), padding, invert)


def _voi(arr: np.ndarray, ds: Dataset, voi: bool) -> np.ndarray:
    """pydicom's VOI LUT / window when the file has one; a broken one is skipped (the percentile window decides)."""
    if not voi:
        return arr
    try:
        return apply_voi_lut(arr, ds, prefer_lut=True)
    except Exception:
        log.warning("VOI LUT of %s unusable, percentile window used", ds.get("SOPInstanceUID", "?"))
        return arr


def _window_by_percentile(arr: np.ndarray, padding: np.ndarray | None, invert: bool) -> np.ndarray:
    """The 0.5-99.5 percentile window of any values (float32), inverted on request, padding black."""
    field = arr if padding is None else arr[~padding]  # padding is outside the image: it must not set the window
    lo, hi = np.percentile(field, (0.5, 99.5))
    if hi <= lo:
        lo, hi = float(field.min()), float(field.max())
    img = np.clip((arr - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
    if invert:
        img = 1.0 - img
    if padding is not None:
        img[padding] = 0.0
    return img


# JPEG Baseline (8-bit): Pillow's libjpeg-turbo decodes a 1024 x 1024 CXR in ~2.5 ms of CPU against GDCM's ~7 ms
# (pydicom's first choice when both are installed) with identical pixels; pylibjpeg's IDCT differs by 1 grey level.
_PILLOW_FIRST = {"1.2.840.10008.1.2.4.50"}


def _decode(ds: Dataset) -> np.ndarray:
    """``ds.pixel_array``, with the fastest exact decoder for a single-sample JPEG Baseline frame."""
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if ts in _PILLOW_FIRST and int(ds.get("SamplesPerPixel", 1) or 1) == 1 and int(ds.get("BitsAllocated", 0)) == 8:
        try:
            from pydicom.pixels import pixel_array

            return pixel_array(ds, decoding_plugin="pillow")
        except Exception:  # Pillow missing or refusing this stream: pydicom's usual order decides
            log.debug("Pillow could not decode %s; pydicom's default decoders", ds.get("SOPInstanceUID", "?"))
    return ds.pixel_array


def _window_by_table(raw: np.ndarray, padding: np.ndarray | None, invert: bool,
                     mapping: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """The 0.5-99.5 percentile window of integer stored values through a lookup table: what
    ``_window_by_percentile`` computes (np.percentile's linear interpolation, the same clip, the same inversion),
    from a histogram of the stored values instead of a sort of a float copy, and one table look-up per pixel.

    ``mapping`` is what the general path applies to the stored values before that window (the Modality LUT or
    rescale, then the VOI LUT or window: pydicom's functions, all per pixel). It is evaluated once per stored value
    (at most 65,536 of them) instead of once per pixel, and the window's percentiles are order statistics of the
    mapped values weighted by the histogram, so the result equals the general path's bit for bit (tests): about a
    third of the CPU on a 2832 x 2328 DX film with a rescale and a window (``bench/decode.py``)."""
    base = int(raw.min())
    idx = (raw.astype(np.int32) - base) if base else raw  # >= 0, for bincount and the look-up
    size = int(raw.max()) - base + 1  # the table covers padding values too (they are set to 0 after)
    counts = np.bincount((idx if padding is None else idx[~padding]).ravel(), minlength=size)
    n = int(counts.sum())
    if n == 0:
        return np.zeros(raw.shape, np.float32)
    if mapping is None:  # the identity: the values ascend with the index
        values = np.arange(base, base + size, dtype=np.float32)
        order = None
        cum = np.cumsum(counts)
    else:
        stored = np.arange(base, base + size, dtype=np.int64).astype(raw.dtype)
        values = np.asarray(mapping(stored), dtype=np.float32)
        if values.shape != stored.shape:
            raise BadDataset(f"the pixel value mapping changed the shape ({stored.shape} -> {values.shape})")
        order = np.argsort(values, kind="stable")
        cum = np.cumsum(counts[order])

    def order_stat(k: int) -> np.float32:  # the k-th smallest mapped value (0-based) of the non-padding pixels
        i = int(np.searchsorted(cum, k, side="right"))
        return values[i if order is None else order[i]]

    def percentile(q: float) -> np.float64:  # numpy's "linear" method on a float32 array, dtypes included
        virtual = (n - 1) * q
        k = int(np.floor(virtual))
        a, b = order_stat(k), order_stat(min(k + 1, n - 1))
        t = np.float64(virtual - k)
        diff = b - a  # float32, as numpy's _lerp subtracts the two float32 neighbours
        return np.float64(b) - diff * (1 - t) if t >= 0.5 else np.float64(a) + diff * t

    lo: float | np.float64 = percentile(0.005)
    hi: float | np.float64 = percentile(0.995)
    if hi <= lo:  # Python floats here, as the general path has them (float32 arithmetic below, not float64)
        present = values[counts > 0]
        lo, hi = float(present.min()), float(present.max())
    table = np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
    if invert:
        table = 1.0 - table
    img = table[idx]
    if padding is not None:
        img[padding] = 0.0
    return img


def _padding(raw: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Mask of pixel padding (PS3.3 C.7.5.1.1.2: stored values equal to Pixel Padding Value, or within the range it
    spans with Pixel Padding Range Limit); None when the image has none, or when everything would be padding."""
    value = ds.get("PixelPaddingValue")
    if value is None or isinstance(value, (bytes, list)):
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    if isinstance(limit, int):
        mask = (raw >= min(int(value), limit)) & (raw <= max(int(value), limit))
    else:
        mask = raw == int(value)
    return mask if mask.any() and not mask.all() else None


def _modality_lut(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """pydicom's Modality LUT / rescale, also for LUT entries of 9 to 15 bits (legal, PS3.3 C.11.1.1.1, stored in
    16-bit words; pydicom only knows 8 and 16 and raised TypeError on them)."""
    seq = ds.get("ModalityLUTSequence")
    if seq:
        entries, first, bits = (int(v) for v in seq[0].LUTDescriptor)
        if 8 < bits < 16:
            item = Dataset()
            item.add_new(0x00283002, "US" if first >= 0 else "SS", [entries, first, 16])
            item.add(seq[0]["LUTData"])
            proxy = Dataset()
            proxy.file_meta = ds.file_meta
            proxy.ModalityLUTSequence = [item]
            return apply_modality_lut(raw, proxy)
    return apply_modality_lut(raw, ds)


_JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                  "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}


def _check_encapsulated(ds: Dataset, rows: int = 0, cols: int = 0) -> None:
    """Refuse broken encapsulated pixel data that decoders would silently half-decode (a truncated JPEG stream
    decodes to a partly grey image without an error)."""
    meta = getattr(ds, "file_meta", None)
    ts_uid = getattr(meta, "TransferSyntaxUID", None)
    if ts_uid is None or not ts_uid.is_encapsulated:
        return
    ts = str(ts_uid)
    from pydicom.encaps import generate_frames

    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))
    except Exception as exc:
        raise BadDataset(f"pixel data cannot be decoded: broken encapsulation ({type(exc).__name__})") from exc
    if not frames or not frames[0]:
        raise BadDataset("pixel data cannot be decoded: empty frame")
    if ts in _JPEG_SYNTAXES and not frames[0].rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise BadDataset("pixel data cannot be decoded: JPEG stream truncated (no EOI marker)")
    dims = _codestream_dimensions(frames[0], ts)
    if dims is not None and dims != (rows, cols):
        # a decoder allocates what the codestream says, whatever Rows/Columns (and max_pixels) say
        raise BadDataset(f"pixel data cannot be decoded: frame is {dims[0]}x{dims[1]}, header says {rows}x{cols}")


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # F7: JPEG-LS
_J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                 "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}


def _codestream_dimensions(frame: bytes, ts: str) -> tuple[int, int] | None:
    """(rows, columns) the compressed frame itself declares (JPEG SOFn / JPEG-LS SOF55 / J2K SIZ); None when the
    syntax carries no dimensions of its own (RLE, deflate). Raises BadDataset when they cannot be found."""
    import struct

    if ts in _JPEG_SYNTAXES or ts in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"):
        i = 2 if frame[:2] == b"\xff\xd8" else None
        while i is not None and i + 9 <= len(frame):
            if frame[i] != 0xFF:
                break
            marker = frame[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in _JPEG_SOF:
                height, width = struct.unpack(">HH", frame[i + 5:i + 9])
                return height, width
            if marker == 0xDA:  # start of scan before any frame header
                break
            i += 2 + struct.unpack(">H", frame[i + 2:i + 4])[0]
        raise BadDataset("pixel data cannot be decoded: no JPEG frame header")
    if ts in _J2K_SYNTAXES:
        j = frame.find(b"\xff\x4f\xff\x51")  # SOC + SIZ (also inside a JP2 wrapper)
        if j < 0 or j + 24 > len(frame):
            raise BadDataset("pixel data cannot be decoded: no JPEG 2000 SIZ marker")
        xsiz, ysiz, x0, y0 = struct.unpack(">IIII", frame[j + 8:j + 24])
        return ysiz - y0, xsiz - x0
    return None


def patient_age_years(ds: Dataset) -> float | None:
    """The patient's age in years, for the model's age-specific operating point: Patient's Age (0010,1010), else
    Patient's Birth Date and the study's date; ``None`` when unknown (the caller then uses the default, adult,
    operating point). :func:`triage_node.age.read_age` also says which rule gave it."""
    return read_age(ds).years


def display(img: np.ndarray, max_size: int = 0) -> np.ndarray:
    """uint8 rendering of a normalised image (for overlays and previews); with ``max_size``, an image whose longer
    side is larger is first reduced to fit (area average, aspect kept; :func:`fit_size`)."""
    return reduce_display(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8), max_size)


def reduce_display(display: np.ndarray, max_size: int) -> np.ndarray:
    """A uint8 rendering reduced to fit ``max_size`` (:func:`fit_size`; 8-bit box filter, a quarter of the CPU of
    the same on floats); returned as is when it fits."""
    rows, columns = fit_size(int(display.shape[0]), int(display.shape[1]), max_size)
    if (rows, columns) == display.shape:
        return display
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(display)).resize((columns, rows), Image.Resampling.BOX))
