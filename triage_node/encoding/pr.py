"""Grayscale Softcopy Presentation State with the boxes and scores as graphic annotations.

Renders in Weasis-class viewers (OHIF does not apply presentation states yet). Boxes are closed 5-point POLYLINEs in
PIXEL units on the source image; each score is a text object just above its box; a warning and the image-level result
are text objects at the top. The source's VOI LUT (if any) is carried over by highdicom; MONOCHROME1 sources get an
INVERSE presentation LUT so they display as their modality intended.
"""

from __future__ import annotations

import highdicom as hd
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

from triage_node.encoding.sanitize import clean_source
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
        texts.append(
            TextObject(
                text_value=f"Opacity {det.score:.2f}",
                units=AnnotationUnitsValues.PIXEL,
                bounding_box=_clip_box(x0, top, max(x1, x0 + 8 * line_height), top + line_height, rows, columns),
                tracking_id=f"Opacity {i} score",
                tracking_uid=tracking_uid(source.SOPInstanceUID, model.version, f"{i}-text"),
            )
        )
    verdict = "POSITIVE" if prediction.positive else "negative"
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
    annotation = GraphicAnnotation(
        referenced_images=[source],
        graphic_layer=layer,
        graphic_objects=graphics or None,
        text_objects=texts,
    )
    presentation_lut = None
    if str(source.get("PhotometricInterpretation", "")) == "MONOCHROME1":
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
        software_versions=equipment["software_versions"],
        device_serial_number=None,
        content_label=CONTENT_LABEL,
        content_description=f"AI findings by {model.label}"[:64],
        graphic_annotations=[annotation],
        graphic_layers=[layer],
        presentation_lut_transformation=presentation_lut,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[algorithm_equipment(model)],
        series_description=series_description("GSPS", model.demo),
    )
    # General Series: Laterality is Type 2C (paired body parts). Chest is unpaired, so with Body Part Examined
    # known it is left out; a known laterality is copied; otherwise it is sent empty (= unknown), never guessed.
    if source.get("BodyPartExamined"):
        gsps.BodyPartExamined = source.BodyPartExamined
    if source.get("Laterality"):
        gsps.Laterality = source.Laterality
    elif not source.get("BodyPartExamined"):
        gsps.Laterality = None
    return gsps
