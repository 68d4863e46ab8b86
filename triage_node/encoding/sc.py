"""Secondary Capture overlay: the displayed image with boxes, scores and a burned-in warning.

For viewers that render neither SR nor presentation states. Decisions:

* Modality ``OT`` (highdicom's ``SCImage`` fixes it; we keep it on purpose): a PACS routing rule "Modality CR -> AI
  node" must not send our overlay back to be analysed again. :func:`own_outputs.is_own_output` is the second guard.
* Colour separates the annotations from anatomy. ``jpeg-ls-palette``: PALETTE COLOR, one 8-bit index per pixel
  (252 grays + the annotation colours), JPEG-LS lossless: ~0.25 MB for a 1024 x 1024 overlay and a third of the
  encode of RGB. ``jpeg-ls`` (RGB, ~1 MB, ~45 ms to encode), RLE (palette: ~6 ms less to encode than JPEG-LS,
  ~0.8 MB; or RGB), uncompressed or lossy JPEG Baseline (RGB/YBR) via ``outputs.sc_transfer_syntax``. The C-STORE
  sender decompresses for a peer that does not accept the syntax.
* Same pixel geometry as the source (annotations are drawn in source pixel coordinates), so Patient Orientation
  and the lossy-compression history of the source are carried over; Source Image Sequence points at the source.
  A film larger than ``outputs.sc_max_size`` gets an overlay reduced to fit (same aspect and orientation, boxes
  scaled, Derivation Description says so): the encode cost grows with the pixels, and the SC is not for diagnosis.
* ``BurnedInAnnotation`` = YES (the image carries text), "NOT FOR DIAGNOSTIC USE" and the model label burned in;
  a film judged without a known age also gets :data:`~triage_node.age.AGE_UNKNOWN_WARNING` (the adult gate ranks
  children's films poorly).
"""

from __future__ import annotations

import threading

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from triage_node.age import AGE_UNKNOWN_WARNING
from triage_node.encoding.sanitize import carry_anatomy, clean_source
from triage_node.encoding.uids import (
    algorithm_equipment,
    derive_uid,
    equipment_attributes,
    series_description,
)
from triage_node.inference.types import Prediction
from triage_node.own_outputs import is_display_of

BANNER = "NOT FOR DIAGNOSTIC USE"
_BOX = (255, 215, 0)  # amber
_WARN = (255, 64, 64)
_TEXT = (255, 255, 255)
_ORIENTATION = frozenset({"A", "P", "R", "L", "H", "F"})
#: outputs.sc_transfer_syntax -> (transfer syntax, photometric interpretation of the encoded pixels)
SC_ENCODINGS = {
    "jpeg-ls-palette": (JPEGLSLossless, "PALETTE COLOR"),
    "jpeg-ls": (JPEGLSLossless, "RGB"),
    "rle-palette": (RLELossless, "PALETTE COLOR"),
    "rle": (RLELossless, "RGB"),
    "explicit": (ExplicitVRLittleEndian, "RGB"),
    "jpeg": (JPEGBaseline8Bit, "YBR_FULL_422"),
}


_FONTS = threading.local()

# PALETTE COLOR overlay: one 8-bit sample per pixel indexing a 256-entry palette. Entries 0..251 are grays (the
# rendering quantised from 256 to 252 levels, at most 0.5 % of the range off), 252/253 the box and warning colours.
_GRAY_LEVELS = 252
_BOX_INDEX, _WARN_INDEX, _TEXT_INDEX = 252, 253, _GRAY_LEVELS - 1


def _palette_rgb() -> np.ndarray:
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:_GRAY_LEVELS] = np.round(np.arange(_GRAY_LEVELS) * 255 / (_GRAY_LEVELS - 1)).astype(np.uint8)[:, None]
    lut[_BOX_INDEX], lut[_WARN_INDEX] = _BOX, _WARN
    lut[254:] = 255
    return lut


#: The overlay palette as RGB rows (index -> colour); also used to make previews of a palette overlay.
PALETTE_RGB = _palette_rgb()
_TO_INDEX = np.round(np.arange(256) * (_GRAY_LEVELS - 1) / 255).astype(np.uint8)  # gray value -> palette index
_TO_INDEX_LUT = _TO_INDEX.tolist()


def overlay_rgb(overlay: np.ndarray) -> np.ndarray:
    """An overlay as RGB: a palette overlay (2-D indices) through :data:`PALETTE_RGB`, an RGB one as is."""
    return PALETTE_RGB[overlay] if overlay.ndim == 2 else overlay


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size``, loaded once per size and thread (loading costs ~2 ms, more than drawing
    with it; a FreeType face is not shared between threads)."""
    fonts: dict = _FONTS.__dict__.setdefault("by_size", {})
    if size not in fonts:
        try:
            fonts[size] = ImageFont.load_default(size=size)
        except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
            fonts[size] = ImageFont.load_default()
    return fonts[size]


def render_overlay(display: np.ndarray, prediction: Prediction, palette: bool = False) -> np.ndarray:
    """Return an RGB uint8 copy of ``display`` with warning banner, result line, boxes and scores drawn; with
    ``palette``, a 2-D uint8 array of :data:`PALETTE_RGB` indices instead (text drawn without anti-aliasing, so
    every pixel is a palette entry).

    The banner is drawn first so a box near the top edge stays visible over it.
    """
    rows, columns = display.shape
    # boxes are in source pixels: scaled when the display is a reduction of the source (outputs.sc_max_size)
    sy = rows / prediction.rows if prediction.rows else 1.0
    sx = columns / prediction.columns if prediction.columns else 1.0
    if palette:
        # Pillow's 8-bit LUT: the same indices as _TO_INDEX[display], 0.4 ms against 2 ms for numpy's fancy indexing
        image = Image.fromarray(np.ascontiguousarray(display, dtype=np.uint8)).point(_TO_INDEX_LUT)
        box, warn, text_ink, black = _BOX_INDEX, _WARN_INDEX, _TEXT_INDEX, 0
    else:
        image = Image.fromarray(np.ascontiguousarray(display)).convert("RGB")
        box, warn, text_ink, black = _BOX, _WARN, _TEXT, (0, 0, 0)  # type: ignore[assignment]
    draw = ImageDraw.Draw(image)
    if palette:
        draw.fontmode = "1"
    scale = max(min(rows, columns), 256) / 1024
    line = max(2, round(3 * scale))
    small = _font(max(10, round(24 * scale)))
    large = _font(max(12, round(30 * scale)))

    model = prediction.model
    verdict = "POSITIVE" if prediction.positive else "negative"
    if prediction.operating_point == "pediatric":  # judged at another threshold than adult films: say so
        verdict += f" (pediatric threshold {prediction.threshold:.2f})"
    lines = [
        (BANNER, warn, large),
        (f"AI: {model.name} {model.version}{' DEMO MODEL' if model.demo else ''}", text_ink, small),
        (f"Pneumonia {verdict} p={prediction.probability:.2f}; {len(prediction.detections)} opacity box(es)",
         text_ink, small),
    ]
    if prediction.age_unknown:  # a child's film without an age went through the adult gate: say so
        lines.append((AGE_UNKNOWN_WARNING, warn, small))
    heights = [draw.textbbox((0, 0), text, font=font)[3] + line for text, _, font in lines]
    draw.rectangle([0, 0, columns, sum(heights) + 2 * line], fill=black)
    y = line
    for (text, colour, font), height in zip(lines, heights):
        draw.text((2 * line, y), text, fill=colour, font=font)
        y += height
    for det in prediction.detections:
        x0, y0, x1, y1 = det.xyxy
        x0, y0, x1, y1 = x0 * sx, y0 * sy, x1 * sx, y1 * sy
        x0, x1 = float(np.clip(x0, 0, columns - 1)), float(np.clip(x1, 0, columns - 1))
        y0, y1 = float(np.clip(y0, 0, rows - 1)), float(np.clip(y1, 0, rows - 1))
        draw.rectangle([x0, y0, x1, y1], outline=box, width=line)
        label = f"Opacity {det.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), label, font=small)
        ty = y0 - (bottom - top) - 2 * line if y0 - (bottom - top) - 2 * line >= 0 else y1 + line
        draw.rectangle([x0, ty, x0 + right - left + 2 * line, ty + bottom + line], fill=black)
        draw.text((x0 + line, ty), label, fill=box, font=small)

    return np.asarray(image, dtype=np.uint8)


def _set_palette(sc: Dataset) -> None:
    """Make ``sc`` PALETTE COLOR with :data:`PALETTE_RGB` (PS3.3 C.7.6.3: 256 entries, first index 0, 16-bit
    entries, the widest viewer support)."""
    sc.PhotometricInterpretation = "PALETTE COLOR"
    for tag in ("PresentationLUTShape", "WindowCenter", "WindowWidth", "RescaleIntercept", "RescaleSlope"):
        if tag in sc:
            del sc[tag]
    words = PALETTE_RGB.astype("<u2") * 257
    for i, colour in enumerate(("Red", "Green", "Blue")):
        setattr(sc, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(sc, f"{colour}PaletteColorLookupTableData", np.ascontiguousarray(words[:, i]).tobytes())


def _multi(value) -> list:
    """A DICOM value of VM 1-n as a list (pydicom gives a scalar for one value, a MultiValue for more)."""
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [value]
    return list(value)


def _frames(ds: Dataset) -> list[bytes]:
    from pydicom.encaps import generate_frames

    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))


def build_overlay(
    source: Dataset,
    display: np.ndarray,
    prediction: Prediction,
    *,
    series_number: int = 9902,
    encoding: str = "jpeg-ls-palette",
    overlay: np.ndarray | None = None,
) -> Dataset:
    """Build the annotated Secondary Capture of ``source``.

    Parameters
    ----------
    source
        The analysed image.
    display
        2-D uint8 MONOCHROME2 rendering of the source: its rows and columns, or a reduction of them
        (``own_outputs.fit_size``, for ``outputs.sc_max_size``); the SC has the display's size.
    prediction
        What to draw.
    series_number
        Number of the overlay series.
    encoding
        A key of :data:`SC_ENCODINGS` (``outputs.sc_transfer_syntax``).
    overlay
        ``render_overlay(display, prediction, palette=...)`` when the caller already has it (it also makes the
        preview from it): palette indices for a PALETTE COLOR encoding, else RGB.

    Raises
    ------
    ValueError
        If ``display`` is not a 2-D uint8 array of the source's size (or a reduction of it), ``overlay`` not its
        rendering's shape, or
        ``encoding`` is unknown.
    """
    if encoding not in SC_ENCODINGS:
        raise ValueError(f"unknown SC encoding {encoding!r}; expected one of {', '.join(SC_ENCODINGS)}")
    transfer_syntax, photometric = SC_ENCODINGS[encoding]
    display = np.asarray(display)
    source_size = (int(source.Rows), int(source.Columns))
    if not is_display_of(display.shape, *source_size):
        raise ValueError(f"display shape {display.shape} does not match source {source_size} (nor a reduction of it)")
    expected = (int(display.shape[0]), int(display.shape[1]))
    if display.dtype != np.uint8:
        raise ValueError(f"display must be uint8, got {display.dtype}")
    palette = photometric == "PALETTE COLOR"
    if overlay is None:
        overlay = render_overlay(display, prediction, palette=palette)
    elif overlay.shape != (expected if palette else (*expected, 3)) or overlay.dtype != np.uint8:
        want = f"{expected[0]}x{expected[1]}" + ("" if palette else "x3")
        raise ValueError(f"overlay must be uint8 {want} for {encoding}, got {overlay.dtype} {overlay.shape}")
    source, _ = clean_source(source)
    model = prediction.model
    orientation = [str(v) for v in (source.get("PatientOrientation") or [])]
    valid_orientation = len(orientation) == 2 and all(v and set(v) <= _ORIENTATION for v in orientation)

    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=overlay,
        # palette indices are encoded as one 8-bit sample (the JPEG-LS stream does not know what they mean)
        photometric_interpretation="MONOCHROME2" if palette else photometric,
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=derive_uid(source.SOPInstanceUID, model.version, "sc-series"),
        series_number=series_number,
        sop_instance_uid=derive_uid(source.SOPInstanceUID, model.version, "sc"),
        instance_number=1,
        patient_orientation=(orientation[0], orientation[1]) if valid_orientation else ("L", "F"),
        transfer_syntax_uid=transfer_syntax,
        contributing_equipment=[algorithm_equipment(model)],
        series_description=series_description("overlay", model.demo),
        **equipment_attributes(model),
    )
    if not valid_orientation:  # Type 2C: unknown orientation is sent empty, never guessed
        sc["PatientOrientation"].value = None
    if palette:
        _set_palette(sc)
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{BANNER}. AI result overlay by {model.label}"[:10240]
    reduced = "" if expected == source_size else \
        f", reduced from {source_size[0]} x {source_size[1]} to {expected[0]} x {expected[1]} pixels"
    sc.DerivationDescription = f"AI result overlay ({model.label}) drawn on a windowed rendering{reduced}"[:1024]
    carry_anatomy(sc, source)  # General Series: Laterality is Type 2C
    # Once lossy, always lossy (PS3.3 C.7.6.1.1.5): the source's history first, then our own JPEG step appended.
    ratios, methods = [], []
    if str(source.get("LossyImageCompression", "")) == "01":
        ratios = [str(v) for v in _multi(source.get("LossyImageCompressionRatio"))]
        methods = [str(v) for v in _multi(source.get("LossyImageCompressionMethod"))]
    if transfer_syntax == JPEGBaseline8Bit:
        encoded = sum(len(f) for f in _frames(sc))
        # the two attributes pair up value by value: add a ratio only when the source's history has one per method
        ratios = ratios + [f"{sc.Rows * sc.Columns * 3 / max(encoded, 1):.2f}"[:16]] if len(ratios) == len(
            methods) else []
        methods.append("ISO_10918_1")
    if ratios or methods or str(source.get("LossyImageCompression", "")) == "01":
        sc.LossyImageCompression = "01"
        if ratios:
            sc.LossyImageCompressionRatio = ratios
        if methods:
            sc.LossyImageCompressionMethod = methods
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc
