"""SR, SC and GSPS built from real RSNA samples and synthetic 16-bit CR/DX sources: validity and content."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest

# tests/ is not a package: pytest puts it on sys.path
from test_enc_common import (
    BOXES,
    MODEL,
    RSNA,
    dciodvfy,
    dcmpschk,
    display_of,
    dsrdump,
    prediction,
    roundtrip,
    synthetic_xray,
    write,
)

from triage_node.encoding import OUTPUT_MANUFACTURER, build_results, derive_uid, is_own_output
from triage_node.encoding.pr import build_gsps
from triage_node.encoding.sc import build_overlay
from triage_node.encoding.sr import build_sr
from triage_node.inference.types import Detection, ModelInfo

SOURCES = [pytest.param(("rsna", p), id=f"rsna-{p.stem[:8]}") for p in RSNA] + [
    pytest.param(("dx", False), id="dx-16bit"),
    pytest.param(("dx-proc", True), id="dx-processing-mono1"),
    pytest.param(("cr", False), id="cr-16bit"),
]
KINDS = ("sr", "sc", "gsps")


def load(spec) -> pydicom.Dataset:
    kind, arg = spec
    return pydicom.dcmread(arg) if kind == "rsna" else synthetic_xray(kind, monochrome1=arg)


@pytest.fixture(params=SOURCES)
def source(request) -> pydicom.Dataset:
    return load(request.param)


@pytest.mark.parametrize("boxes", [BOXES, ()], ids=["boxes", "nothing-found"])
def test_outputs_validate_with_third_party_tools(source, boxes, tmp_path):
    pred = prediction(boxes=boxes, probability=0.87 if boxes else 0.12)
    outputs, changed = build_results(source, display_of(source), pred, outputs=KINDS)
    assert "PatientAge" in changed
    assert [str(o.SOPClassUID) for o in outputs] == [
        "1.2.840.10008.5.1.4.1.1.88.33",
        "1.2.840.10008.5.1.4.1.1.7",
        "1.2.840.10008.5.1.4.1.1.11.1",
    ]
    for name, ds in zip(KINDS, outputs):
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        path = write(ds, tmp_path / f"{name}.dcm")
        back = pydicom.dcmread(path)
        assert back.SOPInstanceUID == derive_uid(source.SOPInstanceUID, MODEL.version, name)
        assert back.SeriesInstanceUID == derive_uid(source.SOPInstanceUID, MODEL.version, f"{name}-series")
        assert back.StudyInstanceUID == source.StudyInstanceUID
        assert back.PatientID == source.PatientID
        assert back.Manufacturer == OUTPUT_MANUFACTURER
        assert "DEMO MODEL NOT FOR CLINICAL USE" in back.SeriesDescription and len(back.SeriesDescription) <= 64
        assert is_own_output(back)
        errors, _warnings = dciodvfy(path)
        assert errors == [], f"{name}: {errors}"
    report = dsrdump(tmp_path / "sr.dcm")
    assert "Pneumonia" in report and ("Present" if boxes else "Absent") in report
    assert report.count('"Opacity"') == len(boxes)
    dcmpschk(tmp_path / "gsps.dcm")


def _sr_roundtrip(source, pred, **kwargs) -> hd.sr.ComprehensiveSR:
    return hd.sr.ComprehensiveSR.from_dataset(roundtrip(build_sr(source, pred, **kwargs)))


def _code(concept) -> tuple[str, str]:
    return (concept.value, concept.scheme_designator)


@pytest.mark.parametrize("spec", SOURCES[:1] + SOURCES[-3:-2])
@pytest.mark.parametrize("positive", [True, False])
def test_sr_content(spec, positive):
    source = load(spec)
    pred = prediction(probability=0.87 if positive else 0.2)
    sr = _sr_roundtrip(source, pred)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert "FrameOfReferenceUID" not in sr
    report = sr.content
    rois = report.get_planar_roi_measurement_groups()
    assert len(rois) == len(BOXES)
    uids = set()
    for i, (group, det) in enumerate(zip(rois, BOXES), start=1):
        assert group.tracking_uid and hd.UID(group.tracking_uid).is_valid
        uids.add(group.tracking_uid)
        assert group.tracking_identifier == f"Opacity {i} (score {det.score:.2f})"
        assert _code(group.finding_type) == ("112001", "DCM")
        # the finding site is on the box's measurement (TID 300), not the group: OHIF labels a group-level site
        # with a raw "363698007: Lung" line under the box
        assert group.finding_sites == []
        roi = group.roi
        assert roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        x0, y0, x1, y1 = det.xyxy
        expected = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]])
        np.testing.assert_allclose(roi.value, expected, atol=1e-3)
        assert roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        (score,) = group.get_measurements()
        # named after the finding, in percent: OHIF shows "Opacity confidence: 87.00 %" beside the box
        assert _code(score.name) == ("OPACITYCONF", "99CXRTRIAGE") and score.unit.value == "%"
        assert score.value == pytest.approx(round(100 * det.score, 1))
        assert [_code(s.value) for s in score.finding_sites] == [("39607008", "SCT")]
        names = {item.ConceptNameCodeSequence[0].CodeValue: item for item in group[0].ContentSequence}
        assert {"111001", "111003"} <= set(names)  # TID 4019 algorithm name + version in every group
        assert "DEMO" in names["111001"].TextValue and names["111003"].TextValue == MODEL.version
    assert len(uids) == len(BOXES)

    (image_group,) = report.get_image_measurement_groups()
    (evaluation,) = image_group.get_qualitative_evaluations()
    assert _code(evaluation.name) == ("233604007", "SCT")
    assert _code(evaluation.value) == (("52101004", "SCT") if positive else ("272519000", "SCT"))
    (probability,) = image_group.get_measurements()
    assert probability.value == pytest.approx(round(100 * pred.probability, 1))
    assert probability.unit.value == "%"
    # the local coding scheme is declared (SOP Common), and the image-level result has whole-image geometry
    # (OHIF 3.x cannot display a measurement group without any)
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99CXRTRIAGE"

    # evidence: the source image, in the same study
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    assert study.StudyInstanceUID == source.StudyInstanceUID
    ref = study.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    # IHE AIR contributing equipment
    (algo,) = [e for e in sr.ContributingEquipmentSequence
               if e.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"]
    purpose = algo.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodingSchemeDesignator, purpose.CodeMeaning) == ("99IHE", "Processing Algorithm")
    assert algo.ManufacturerModelName == MODEL.name and algo.SoftwareVersions == MODEL.version
    assert hd.UID(algo.DeviceUID).is_valid and algo.Manufacturer


def test_sr_without_findings_is_still_a_result():
    source = synthetic_xray("dx")
    sr = _sr_roundtrip(source, prediction(boxes=(), probability=0.01))
    assert sr.content.get_planar_roi_measurement_groups() == []
    (image_group,) = sr.content.get_image_measurement_groups()
    assert _code(image_group.get_qualitative_evaluations()[0].value) == ("272519000", "SCT")


def test_sr_deterministic_and_versioned():
    source = synthetic_xray("cr")
    a, b = _sr_roundtrip(source, prediction()), _sr_roundtrip(source, prediction())
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    ga = a.content.get_planar_roi_measurement_groups()
    gb = b.content.get_planar_roi_measurement_groups()
    assert [g.tracking_uid for g in ga] == [g.tracking_uid for g in gb]
    v2 = ModelInfo(name="test-model", version="0.0.2", demo=False)
    c = build_sr(source, prediction(model=v2), predecessor=a)
    assert c.SOPInstanceUID != a.SOPInstanceUID
    assert "DEMO" not in c.SeriesDescription
    pre = c.PredecessorDocumentsSequence[0]
    assert pre.StudyInstanceUID == source.StudyInstanceUID
    assert pre.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == a.SOPInstanceUID
    # redelivery of the same version never references itself
    assert "PredecessorDocumentsSequence" not in build_sr(source, prediction(), predecessor=a)


def test_boxes_clipped_to_image():
    source = synthetic_xray("dx")  # 512 rows x 640 columns
    sr = _sr_roundtrip(source, prediction(boxes=(Detection(600.0, -5.0, 100.0, 600.0, 0.9),)))
    (group,) = sr.content.get_planar_roi_measurement_groups()
    np.testing.assert_allclose(group.roi.value[2], [640.0, 512.0])
    np.testing.assert_allclose(group.roi.value[0], [600.0, 0.0])


def test_overlay_pixels_and_flags():
    source = synthetic_xray("dx")
    display = display_of(source)
    sc = roundtrip(build_overlay(source, display, prediction()))
    assert sc.Modality == "OT" and sc.BurnedInAnnotation == "YES"
    assert sc.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless  # the default encoding
    assert sc.PhotometricInterpretation == "PALETTE COLOR" and sc.pixel_array.shape == display.shape
    from pydicom.pixels import apply_color_lut

    pixels = (apply_color_lut(sc.pixel_array, sc) >> 8).astype(np.uint8)  # as a viewer shows it
    assert pixels.shape == (*display.shape, 3)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert list(sc.PatientOrientation) == ["L", "F"]
    x0, y0 = int(BOXES[0].x), int(BOXES[0].y)
    assert tuple(pixels[y0 + 30, x0]) != (display[y0 + 30, x0],) * 3  # box edge drawn in colour
    assert (pixels[:10].reshape(-1, 3) == 0).mean() > 0.5  # black warning banner on top


def test_overlay_rejects_mismatched_display():
    source = synthetic_xray("dx")
    with pytest.raises(ValueError):
        build_overlay(source, np.zeros((10, 10), np.uint8), prediction())
    with pytest.raises(ValueError):
        build_results(source, np.zeros((int(source.Columns), int(source.Rows)), np.uint8), prediction())
    with pytest.raises(ValueError):
        build_results(source, display_of(source), prediction(rows=1024, columns=1024))


def test_gsps_annotations():
    source = synthetic_xray("dx-proc", monochrome1=True)
    gsps = roundtrip(build_gsps(source, prediction()))
    (annotation,) = gsps.GraphicAnnotationSequence
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    objects = annotation.GraphicObjectSequence
    assert len(objects) == len(BOXES)
    for obj, det in zip(objects, BOXES):
        assert obj.GraphicType == "POLYLINE" and obj.GraphicAnnotationUnits == "PIXEL"
        assert obj.NumberOfGraphicPoints == 5
        pts = np.array(obj.GraphicData, dtype=float).reshape(-1, 2)
        np.testing.assert_allclose(pts[0], pts[-1])
        np.testing.assert_allclose(pts[2], det.xyxy[2:], atol=1e-3)
    texts = [t.UnformattedTextValue for t in annotation.TextObjectSequence]
    assert "Opacity 0.87" in texts and "Opacity 0.55" in texts
    assert any("NOT FOR DIAGNOSTIC USE" in t for t in texts)
    assert gsps.PresentationLUTShape == "INVERSE"  # MONOCHROME1 source


def test_no_own_output_confusion_after_manufacturer_rewrite():
    source = synthetic_xray("cr")
    outputs, _ = build_results(source, display_of(source), prediction(), outputs=KINDS)
    for ds in outputs:
        copy = roundtrip(ds)
        copy.Manufacturer = "Some PACS"
        assert is_own_output(copy)
    assert not is_own_output(source)


def test_unknown_output_rejected():
    source = synthetic_xray("cr")
    with pytest.raises(ValueError):
        build_results(source, display_of(source), prediction(), outputs=("sr", "seg"))
