"""Grayscale Softcopy Presentation State with the boxes and scores as graphic annotations.

Renders in Weasis-class viewers (OHIF does not apply presentation states yet). Boxes are closed 5-point POLYLINEs in
PIXEL units on the source image; each score is a text object just above its box; a warning and the image-level result
are text objects at the top. The source's VOI LUT (if any) is carried over by highdicom; MONOCHROME1 sources get an
INVERSE presentation LUT so they display as their modality intended (as do MONOCHROME2 sources whose own
Presentation LUT Shape is INVERSE); a Modality or VOI LUT Sequence of the source is carried over as it is.
"""

from __future__ import annotations

from typing import cast

import highdicom as hd
import numpy as np
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    TextObject,
)
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from triage_node.age import AGE_UNKNOWN_WARNING
from triage_node.encoding.sanitize import carry_anatomy, clean_source
from triage_node.encoding.sc import BANNER
from triage_node.encoding.sr import box_polyline
from triage_node.encoding.uids import (
    algorithm_equipment,
    derive_uid,
    equipment_attributes,
    series_description,
    tracking_uid,
)
from triage_node.inference.types import Prediction

CONTENT_LABEL = "AI_CXR_TRIAGE"
LAYER = "AI_FINDINGS"


def _clip_box(left: float, top: float, right: float, bottom: float, rows: int, columns: int):
    def cx(v: float) -> float:
        return min(max(v, 0.0), float(columns))

    def cy(v: float) -> float:
        return min(max(v, 0.0), float(rows))

    return (cx(left), cy(top), cx(right), cy(bottom))


def _lut(item: Dataset) -> tuple[int, int, np.ndarray]:
    """(first mapped value, bits per entry, entries as uint16) of a LUT item (LUTData as OW bytes or US values)."""
    _, first, bits = (int(v) for v in item.LUTDescriptor)
    raw = item.LUTData
    data = np.frombuffer(raw, dtype="<u2") if isinstance(raw, bytes) else np.asarray(raw, dtype=np.uint16)
    return first, bits, data


def _lut_item(first: int, data: np.ndarray) -> Dataset:
    item = Dataset()
    item.add_new(0x00283002, "US" if first >= 0 else "SS", [len(data) % 65536, first, 16])
    item.add_new(0x00283006, "OW", np.ascontiguousarray(data, dtype="<u2").tobytes())
    return item


def _carry_luts(gsps: Dataset, source: Dataset) -> None:
    """Carry LUT Sequences with 9-15 bits per entry (legal in images) into the GSPS, where only 8 or 16 are.

    highdicom copies a rescale but no Modality LUT Sequence (the VOI LUT was then applied to stored values), and
    re-labels a 12-bit VOI LUT as 16 bits without scaling it (dciodvfy: "number of bits = 16 but maximum 0xfff").
    Here both become 16-bit LUTs that display the same: entries scaled to 16 bits, and the VOI LUT's input domain
    scaled with the Modality LUT's output."""
    mod = source.get("ModalityLUTSequence")
    voi = None if source.get("WindowCenter") else source.get("VOILUTSequence")
    shift = 0
    if mod:
        first, bits, data = _lut(mod[0])
        if not 8 < bits < 16:
            return
        shift = 16 - bits
        item = _lut_item(first, data.astype(np.uint32) << shift)
        item.ModalityLUTType = mod[0].get("ModalityLUTType") or "US"
        gsps.ModalityLUTSequence = [item]
        for keyword in ("RescaleIntercept", "RescaleSlope", "RescaleType"):
            gsps.pop(keyword, None)
    if voi:
        first, bits, data = _lut(voi[0])
        if shift:  # inputs are now the Modality LUT's 16-bit outputs: one entry per 16-bit input value
            data = data[np.clip((np.arange(65536) >> shift) - first, 0, len(data) - 1)]
            first = 0
        elif not 8 < bits < 16:
            return
        item = _lut_item(first, data.astype(np.uint32) << (16 - bits))
        if voi[0].get("LUTExplanation"):
            item.LUTExplanation = voi[0].LUTExplanation
        for soft in gsps.get("SoftcopyVOILUTSequence", []):
            if "VOILUTSequence" in soft:
                soft.VOILUTSequence = [item]


def build_gsps(source: Dataset, prediction: Prediction, *, series_number: int = 9903) -> Dataset:
    """Build the GSPS that draws ``prediction`` on ``source``.

    Parameters
    ----------
    source
        The analysed image (single frame, one sample per pixel).
    prediction
        Boxes in source pixel coordinates and the image-level result.
    series_number
        Number of the presentation-state series.
    """
    source, _ = clean_source(source)
    model = prediction.model
    rows, columns = int(source.Rows), int(source.Columns)
    layer = GraphicLayer(layer_name=LAYER, order=1, description="AI findings (boxes and scores)")
    graphics: list[GraphicObject] = []
    texts: list[TextObject] = []
    line_height = max(12.0, rows / 40)
    for i, det in enumerate(prediction.detections, start=1):
        uid = tracking_uid(source.SOPInstanceUID, model.version, i)
        graphics.append(
            GraphicObject(
                graphic_type=GraphicTypeValues.POLYLINE,
                graphic_data=box_polyline(det, rows, columns),
                units=AnnotationUnitsValues.PIXEL,
                tracking_id=f"Opacity {i}",
                tracking_uid=uid,
            )
        )
        x0, y0, x1, _ = det.xyxy
        top = y0 - line_height if y0 - line_height >= 0 else y0
        left = max(0.0, min(x0, columns - 8 * line_height))  # a box at the right edge (or a tiny image): shift left
        label_box = _clip_box(left, top, max(x1, left + 8 * line_height), top + line_height, rows, columns)
        if label_box[2] <= label_box[0] or label_box[3] <= label_box[1]:
            continue  # no room for a label (a box on the bottom edge of a tiny image): the box itself is drawn
        texts.append(
            TextObject(
                text_value=f"Opacity {det.score:.2f}",
                units=AnnotationUnitsValues.PIXEL,
                bounding_box=label_box,
                tracking_id=f"Opacity {i} score",
                tracking_uid=tracking_uid(source.SOPInstanceUID, model.version, f"{i}-text"),
            )
        )
    verdict = "POSITIVE" if prediction.positive else "negative"
    if prediction.operating_point == "pediatric":
        verdict += f" (pediatric threshold {prediction.threshold:.2f})"
    header = (
        f"{BANNER} - AI {model.name} {model.version}{' DEMO MODEL' if model.demo else ''}: "
        f"pneumonia {verdict} p={prediction.probability:.2f}"
    )
    texts.append(
        TextObject(
            text_value=header,
            units=AnnotationUnitsValues.PIXEL,
            bounding_box=_clip_box(0, 0, columns, line_height, rows, columns),
        )
    )
    if prediction.age_unknown:  # the adult gate judged a film without an age: say so under the header
        texts.append(
            TextObject(
                text_value=AGE_UNKNOWN_WARNING,
                units=AnnotationUnitsValues.PIXEL,
                bounding_box=_clip_box(0, line_height, columns, 2 * line_height, rows, columns),
            )
        )
    annotation = GraphicAnnotation(
        referenced_images=[source],
        graphic_layer=layer,
        graphic_objects=graphics or None,
        text_objects=texts,
    )
    presentation_lut = None
    inverse = str(source.get("PresentationLUTShape", "") or "").strip().upper() == "INVERSE"
    if str(source.get("PhotometricInterpretation", "")) == "MONOCHROME1" or inverse:
        presentation_lut = hd.PresentationLUTTransformation(
            presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE
        )
    equipment = equipment_attributes(model)
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=[source],
        series_instance_uid=derive_uid(source.SOPInstanceUID, model.version, "gsps-series"),
        series_number=series_number,
        sop_instance_uid=derive_uid(source.SOPInstanceUID, model.version, "gsps"),
        instance_number=1,
        manufacturer=equipment["manufacturer"],
        manufacturer_model_name=equipment["manufacturer_model_name"],
        # highdicom annotates these two narrower than its base class accepts: ``tuple[str]`` (one version) where
        # any sequence of versions is written, and ``str`` where None (no serial number) leaves the attribute out.
        software_versions=cast("tuple[str]", equipment["software_versions"]),
        device_serial_number=cast(str, None),
        content_label=CONTENT_LABEL,
        content_description=f"AI findings by {model.label}"[:64],
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        presentation_lut_transformation=presentation_lut,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[algorithm_equipment(model)],
        series_description=series_description("GSPS", model.demo),
    )
    _carry_luts(gsps, source)
    carry_anatomy(gsps, source)  # General Series: Laterality is Type 2C
    return gsps
