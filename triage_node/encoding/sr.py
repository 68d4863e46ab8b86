"""TID 1500 Measurement Report (Comprehensive SR) of one prediction.

Layout (what OHIF-class viewers and PACS SR renderers expect)::

    Imaging Measurement Report (TID 1500)
      Observation context: device observer = the model (device UID per trained model)
      Procedure reported: Plain chest X-ray (SCT 399208008)
      Imaging Measurements
        TID 1501 group "Pneumonia assessment": Pneumonia (SCT 233604007) = Present/Absent,
                                               Probability = p {probability}, finding site Lung, TID 4019
                                               (Algorithm Parameters: threshold=, operating_point=, age_rule=,
                                               and age_warning= for a film judged without a known age)
        TID 1410 group per box: tracking id + UID, finding Opacity (DCM 112001), TID 4019, closed 5-point POLYLINE
                                on the source image, NUM "Opacity confidence" = score in % whose TID 300 concept
                                modifier carries the finding site Lung (SCT 39607008)

A prediction without boxes still yields a document ("no opacity detected" is a result).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    ComprehensiveSR,
    CoordinatesForMeasurement,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from triage_node.age import AGE_UNKNOWN_WARNING
from triage_node.encoding.sanitize import clean_source
from triage_node.encoding.uids import (
    algorithm_equipment,
    derive_uid,
    device_uid_of,
    equipment_attributes,
    lo,
    series_description,
    tracking_uid,
)
from triage_node.inference.types import Detection, Prediction

PNEUMONIA = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
OPACITY = hd.sr.CodedConcept("112001", "DCM", "Opacity")
LUNG = hd.sr.CodedConcept("39607008", "SCT", "Lung")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
UNIT_PERCENT = hd.sr.CodedConcept("%", "UCUM", "percent")
# Viewers (OHIF v3) label a box with "<NUM concept meaning>: <value> <UCUM code>" and do not show the group's
# Finding, so the per-box confidence is a NUM whose meaning names the finding, in percent (reads "Opacity
# confidence: 87.00 %" instead of "Certainty of Finding: 0.87 {probability}").
# OHIF 3.13.2 (cornerstone-dicom-sr _processTID1410Measurement) also adds a line "363698007: <meaning>" for a Finding
# Site (SCT 363698007) at the top level of a box group: a raw code under every box. TID 1410 leaves the group's
# Finding Site optional and TID 300 lets the measurement carry it (HAS CONCEPT MOD of the NUM), which OHIF does not
# turn into a label; so each box's finding site Lung sits on its confidence NUM. The image-level group (TID 1501,
# geometry nested in its NUM, which OHIF reads as non-geometric and labels no SCT site for) keeps it at group level.
OPACITY_CONFIDENCE = hd.sr.CodedConcept("OPACITYCONF", "99CXRTRIAGE", "Opacity confidence")
PLAIN_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")


def algorithm_name(prediction: Prediction) -> str:
    """Algorithm name as shown to a radiologist; carries the demo warning when the model is a demo."""
    model = prediction.model
    return f"{model.name} (DEMO MODEL, NOT FOR CLINICAL USE)" if model.demo else model.name


def box_polyline(det: Detection, rows: int, columns: int) -> np.ndarray:
    """Closed 5-point polyline (column, row) of a box, clipped to the image, first point repeated."""
    x0, y0, x1, y1 = det.xyxy
    x0, x1 = (float(np.clip(v, 0, columns)) for v in (x0, x1))
    y0, y1 = (float(np.clip(v, 0, rows)) for v in (y0, y1))
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float)


def whole_image_polyline(rows: int, columns: int) -> np.ndarray:
    """Closed polyline around the whole image: what the image-level probability was inferred from."""
    return np.array([[0, 0], [columns, 0], [columns, rows], [0, rows], [0, 0]], dtype=float)


def _algorithm_id(prediction: Prediction) -> AlgorithmIdentification:
    model = prediction.model
    return AlgorithmIdentification(
        name=algorithm_name(prediction),
        version=model.version,
        manufacturer=model.manufacturer or None,
        parameters=[f"threshold={prediction.threshold:g}"]
        + ([f"operating_point={prediction.operating_point}"] if prediction.operating_point else [])
        + ([f"age_rule={prediction.age_rule}"] if prediction.age_rule else [])
        + ([f"age_warning={AGE_UNKNOWN_WARNING}"] if prediction.age_unknown else []),
    )


def _groups(source: Dataset, prediction: Prediction) -> list:
    sop_uid = source.SOPInstanceUID
    version = prediction.model.version
    # One Algorithm Identification (TID 4019) for every group: the same items, written once per group (built three
    # times for two boxes, it was ~1/6 of the SR's construction). Nothing changes items once they are in the tree.
    algorithm_id = _algorithm_id(prediction)
    image_group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid(sop_uid, version, "image"),
            identifier=f"Pneumonia {'present' if prediction.positive else 'absent'} "
            f"(probability {prediction.probability:.2f})",
        ),
        algorithm_id=algorithm_id,
        finding_sites=[FindingSite(LUNG)],
        # INFERRED FROM a whole-image SCOORD: OHIF 3.x crashes on a measurement group without any geometry
        # (and this way it shows the image-level result too, as a frame around the image).
        measurements=[Measurement(
            name=PROBABILITY, value=round(100 * float(prediction.probability), 1), unit=UNIT_PERCENT,
            referenced_coordinates=[CoordinatesForMeasurement(
                graphic_type=GraphicTypeValues.POLYLINE,
                graphic_data=whole_image_polyline(int(source.Rows), int(source.Columns)),
                source_image=SourceImageForRegion.from_source_image(source),
            )],
        )],
        qualitative_evaluations=[
            QualitativeEvaluation(PNEUMONIA, PRESENT if prediction.positive else ABSENT),
        ],
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
    )
    groups: list = [image_group]
    for i, det in enumerate(prediction.detections, start=1):
        region = ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=box_polyline(det, int(source.Rows), int(source.Columns)),
            source_image=SourceImageForRegion.from_source_image(source),
        )
        groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=tracking_uid(sop_uid, version, i),
                    identifier=f"Opacity {i} (score {det.score:.2f})",
                ),
                referenced_region=region,
                finding_type=OPACITY,
                algorithm_id=algorithm_id,
                measurements=[Measurement(name=OPACITY_CONFIDENCE, value=round(100 * float(det.score), 1),
                                          unit=UNIT_PERCENT, finding_sites=[FindingSite(LUNG)])],
            )
        )
    return groups


def build_sr(
    source: Dataset,
    prediction: Prediction,
    *,
    series_number: int = 9901,
    instance_number: int = 1,
    institution_name: str | None = None,
    predecessor: Dataset | None = None,
    check_tree: bool = False,
) -> ComprehensiveSR:
    """Build the TID 1500 Comprehensive SR of ``prediction`` for ``source``.

    Parameters
    ----------
    source
        The analysed image (cleaned with :func:`clean_source` here again; cleaning is idempotent).
    prediction
        Image-level probability and boxes in source pixel coordinates.
    series_number, instance_number
        Numbers of the result series and instance.
    institution_name
        Institution of the node, if configured.
    predecessor
        An earlier SR of the same image (e.g. from another model version), referenced in the Predecessor Documents
        Sequence. Ignored when it is this very instance (same SOP Instance UID).
    check_tree
        Hand the whole content tree to highdicom's document constructor, which deep-copies it, parses it back and
        searches it three times (references within the evidence, no SCOORD3D): ~60 ms per SR, 3/4 of its cost.
        Off by default: the tree built here references the source only and holds 2D coordinates only, and
        ``tests/test_enc_perf.py`` checks that both ways write the same bytes.

    Returns
    -------
    highdicom.sr.ComprehensiveSR
        In the source study, in its own (derived) series, with derived SOP Instance UID.
    """
    source, _ = clean_source(source)
    model = prediction.model
    sop_uid = derive_uid(source.SOPInstanceUID, model.version, "sr")
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid_of(model),
            name=lo(algorithm_name(prediction)),
            manufacturer_name=lo(model.manufacturer) or None,
            model_name=lo(f"{model.name} {model.version}"),
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=_groups(source, prediction),
    )
    root = report[0]
    previous = None
    if predecessor is not None and predecessor.get("SOPInstanceUID") != sop_uid:
        previous = [predecessor]
    sr = ComprehensiveSR(
        evidence=[source],
        content=root if check_tree else _without_children(root),
        series_instance_uid=derive_uid(source.SOPInstanceUID, model.version, "sr-series"),
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        institution_name=lo(institution_name) if institution_name else None,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=previous,
        contributing_equipment=[algorithm_equipment(model)],
        series_description=series_description("SR", model.demo),
        **equipment_attributes(model),
    )
    if not check_tree:
        sr[_CONTENT_SEQUENCE] = root[_CONTENT_SEQUENCE]  # what highdicom would copy in; the tree is not re-read
    local_codes = Dataset()  # declares the private coding scheme of OPACITY_CONFIDENCE (SOP Common module)
    local_codes.CodingSchemeDesignator = OPACITY_CONFIDENCE.scheme_designator
    local_codes.CodingSchemeName = "CXR triage node local codes"
    local_codes.CodingSchemeResponsibleOrganization = lo(model.manufacturer) or "CXR Triage Node project"
    sr.CodingSchemeIdentificationSequence = [local_codes]
    return sr


_CONTENT_SEQUENCE = 0x0040A730


def _without_children(root: Dataset) -> Dataset:
    """The root CONTAINER item with an empty Content Sequence (same element objects, nothing copied)."""
    shell = Dataset()
    for elem in root:
        if elem.tag != _CONTENT_SEQUENCE:
            shell.add(elem)
    shell.ContentSequence = []
    return shell
