"""The patient's age when Patient's Age is missing (birth date and study date), the rule that judged the film, and
what the outputs say of a film judged without an age: the SR's Algorithm Parameters, the text burned into the SC
overlay, the GSPS text; all written to bytes and read back."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import warnings

import numpy as np
import pydicom
import pytest
from conftest import ROOT, SAMPLES
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from test_enc_common import dciodvfy, dcmpschk, display_of, dsrdump, prediction, synthetic_xray, write

from triage_node import config, dicom_io, pipeline
from triage_node.age import AGE_UNKNOWN_WARNING, AgeReading, parse_da, read_age, years_between
from triage_node.encoding.pr import build_gsps
from triage_node.encoding.sc import _WARN_INDEX, build_overlay
from triage_node.encoding.sr import build_sr
from triage_node.inference.types import Prediction

# the synthetic source carries header defects on purpose (test_enc_common.synthetic_xray); pydicom warns of them
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning",
                                        "ignore:The value length:UserWarning")


def _ds(**attrs: str) -> Dataset:
    ds = Dataset()
    with warnings.catch_warnings():  # pydicom warns of malformed values, which some cases are on purpose
        warnings.simplefilter("ignore", UserWarning)
        for k, v in attrs.items():
            setattr(ds, k, v)
    return roundtrip(ds)


def roundtrip(ds: Dataset) -> Dataset:
    """Written to bytes and read back, as the node reads a spooled film."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True)
        return pydicom.dcmread(io.BytesIO(buf.getvalue()), force=True)


UNKNOWN = "unknown ("


@pytest.mark.parametrize("attrs,years,rule", [
    # from the dates
    ({"PatientBirthDate": "20200115", "StudyDate": "20230115"}, 3.0, "PatientBirthDate and StudyDate"),
    ({"PatientBirthDate": "20200115", "StudyDate": "20230114"}, 2 + 364 / 365, "PatientBirthDate and StudyDate"),
    ({"PatientBirthDate": "20230115", "StudyDate": "20230115"}, 0.0, "PatientBirthDate and StudyDate"),  # newborn
    ({"PatientBirthDate": "19600701", "SeriesDate": "20200701"}, 60.0, "PatientBirthDate and SeriesDate"),
    ({"PatientBirthDate": "19600701", "StudyDate": "2020071", "AcquisitionDate": "20200701"}, 60.0,
     "PatientBirthDate and AcquisitionDate"),  # a malformed Study Date: the next date of the study
    ({"PatientBirthDate": "19600701", "ContentDate": "20200701"}, 60.0, "PatientBirthDate and ContentDate"),
    # missing
    ({}, None, "unknown (no PatientAge; no PatientBirthDate)"),
    ({"PatientBirthDate": "20200115"}, None,
     "unknown (no PatientAge; no StudyDate, SeriesDate, AcquisitionDate, ContentDate)"),
    ({"StudyDate": "20230115"}, None, "unknown (no PatientAge; no PatientBirthDate)"),
    # malformed
    ({"PatientBirthDate": "2020-01-15", "StudyDate": "20230115"}, None,
     "unknown (no PatientAge; PatientBirthDate malformed)"),
    ({"PatientBirthDate": "20200230", "StudyDate": "20230115"}, None,  # 30 February
     "unknown (no PatientAge; PatientBirthDate malformed)"),
    ({"PatientBirthDate": "20201315", "StudyDate": "20230115"}, None,
     "unknown (no PatientAge; PatientBirthDate malformed)"),
    ({"PatientBirthDate": "00000000", "StudyDate": "20230115"}, None,
     "unknown (no PatientAge; PatientBirthDate malformed)"),
    ({"PatientBirthDate": "20200115", "StudyDate": "2023011"}, None,
     "unknown (no PatientAge; StudyDate malformed)"),
    ({"PatientBirthDate": "20200115", "StudyDate": "20230132", "SeriesDate": "abc"}, None,
     "unknown (no PatientAge; StudyDate and SeriesDate malformed)"),
    # future: born after the study
    ({"PatientBirthDate": "20230116", "StudyDate": "20230115"}, None,
     "unknown (no PatientAge; PatientBirthDate after StudyDate)"),
    # placeholder birth dates (the NIH-derived files carry 19010101)
    ({"PatientBirthDate": "19010101", "StudyDate": "20230115"}, None,
     "unknown (no PatientAge; PatientBirthDate a placeholder: over 120 years before StudyDate)"),
    ({"PatientBirthDate": "19030115", "StudyDate": "20230115"}, 120.0, "PatientBirthDate and StudyDate"),  # the limit
    # Patient's Age present but unreadable: the dates, and a note
    ({"PatientAge": "abcY", "PatientBirthDate": "20200115", "StudyDate": "20230115"}, 3.0,
     "PatientBirthDate and StudyDate"),
    ({"PatientAge": "abcY"}, None, "unknown (PatientAge unreadable; no PatientBirthDate)"),
])
def test_age_from_birth_date_and_study_date(attrs, years, rule):
    got = read_age(_ds(**attrs))
    assert got.rule == rule
    if years is None:
        assert got.years is None and not got.known
    else:
        assert got.years == pytest.approx(years, abs=1e-9)
    assert dicom_io.patient_age_years(_ds(**attrs)) == got.years  # the callers' function reads the same
    assert ("PatientAge unreadable" in got.text) == ("abcY" in attrs.get("PatientAge", ""))
    for value in attrs.values():  # reasons name attributes, never their values
        assert value not in got.text


@pytest.mark.parametrize("study,years", [
    ("20220228", 5 + 364 / 365),  # a common year: not 6 before 1 March (the pediatric gate one day longer)
    ("20220301", 6.0),
    ("20240228", 7 + 364 / 365),  # 1 March 2023 to 29 February 2024, the birthday again: 365 days
    ("20240229", 8.0),
    ("20160229", 0.0),
    ("20170228", 365 / 366),  # 29 February 2016 to 1 March 2017: 366 days
    ("20170301", 1.0),
])
def test_a_leap_day_birthday(study, years):
    got = read_age(_ds(PatientBirthDate="20160229", StudyDate=study))
    assert got.rule == "PatientBirthDate and StudyDate"
    assert got.years == pytest.approx(years, abs=1e-9)
    assert years_between(parse_da("20160229"), parse_da(study)) == pytest.approx(years, abs=1e-9)


def test_the_age_crosses_six_on_the_sixth_birthday():
    """The gate boundary: 6 years is the adult gate (``age < max_age_years`` is pediatric)."""
    assert read_age(_ds(PatientBirthDate="20170610", StudyDate="20230609")).years < 6.0
    assert read_age(_ds(PatientBirthDate="20170610", StudyDate="20230610")).years == 6.0


@pytest.mark.parametrize("age,birth,study,note", [
    ("045Y", "19780301", "20230315", ""),  # 45.0 from the dates: agrees
    ("045Y", "19770401", "20230315", ""),  # 45.95: agrees (Patient's Age counts completed years)
    ("044Y", "19780301", "20230315", ""),  # one year apart: an archive computing it on another day
    ("004Y", "19780301", "20230315", "disagrees with PatientBirthDate and StudyDate (more than one year apart)"),
    ("003Y", "19010101", "20230315", ""),  # a placeholder birth date: nothing to disagree with
    ("006M", "20220901", "20230315", ""),
    ("006M", "20210901", "20230315", "disagrees with PatientBirthDate and StudyDate (more than one month apart)"),
])
def test_patient_age_wins_over_the_dates_and_says_when_they_disagree(age, birth, study, note):
    got = read_age(_ds(PatientAge=age, PatientBirthDate=birth, StudyDate=study))
    expected = int(age[:3]) * (1.0 if age.endswith("Y") else 1 / 12)
    assert got == AgeReading(pytest.approx(expected), "PatientAge", note)
    assert got.text == ("PatientAge; " + note if note else "PatientAge")


def test_the_age_rule_crosses_the_queue_and_older_payloads_still_read():
    pred = dataclasses.replace(prediction(), operating_point="age unknown",
                               age_rule="unknown (no PatientAge; no PatientBirthDate)")
    back = Prediction.from_json(json.loads(json.dumps(pred.to_json())))
    assert back == pred and back.age_unknown
    old = pred.to_json()
    del old["age_rule"]  # queued by a node before this field
    assert Prediction.from_json(old).age_rule == "" and Prediction.from_json(old).age_unknown  # by the point
    known = dataclasses.replace(pred, operating_point="adult", age_rule="PatientBirthDate and StudyDate")
    assert not known.age_unknown
    assert dataclasses.replace(known, operating_point="", age_rule="unknown (no PatientAge; x)").age_unknown


def _unknown_and_known():
    source = synthetic_xray("dx")
    base = prediction(rows=int(source.Rows), columns=int(source.Columns))
    unknown = dataclasses.replace(base, operating_point="age unknown",
                                  age_rule="unknown (no PatientAge; no PatientBirthDate)")
    known = dataclasses.replace(base, operating_point="adult", age_rule="PatientBirthDate and StudyDate")
    return source, unknown, known


def _sr_texts(ds: Dataset) -> list[str]:
    texts: list[str] = []

    def walk(items) -> None:
        for item in items:
            if "TextValue" in item:
                texts.append(f"{item.ConceptNameCodeSequence[0].CodeMeaning}: {item.TextValue}")
            walk(item.get("ContentSequence", []))

    walk(ds.get("ContentSequence", []))
    return texts


def test_the_sr_names_the_age_rule_and_warns_when_the_age_is_unknown(tmp_path):
    import highdicom as hd

    source, unknown, known = _unknown_and_known()
    for name, pred in (("unknown", unknown), ("known", known)):
        path = write(build_sr(source, pred), tmp_path / f"sr-{name}.dcm")
        back = pydicom.dcmread(path)
        texts = _sr_texts(back)
        # every measurement group's TID 4019 (the image group and the two boxes')
        assert texts.count(f"Algorithm Parameters: age_rule={pred.age_rule}") == 3, texts
        warned = texts.count(f"Algorithm Parameters: age_warning={AGE_UNKNOWN_WARNING}")
        assert warned == (3 if name == "unknown" else 0), texts
        # highdicom reads it back as a TID 1500 document: the image-level group's Algorithm Parameters
        group = hd.sr.srread(path).content.get_image_measurement_groups()[0]
        params = [str(item.TextValue) for item in hd.sr.utils.find_content_items(
            group[0], name=codes.DCM.AlgorithmParameters, value_type=hd.sr.ValueTypeValues.TEXT)]
        assert f"age_rule={pred.age_rule}" in params and f"operating_point={pred.operating_point}" in params
        assert (f"age_warning={AGE_UNKNOWN_WARNING}" in params) == (name == "unknown"), params
        assert "age_rule=" in dsrdump(path)  # DCMTK parses it too (it shortens long texts)
        errors, _ = dciodvfy(path)
        assert errors == [], errors


def _text_mask(text: str, font) -> np.ndarray:
    """``text`` drawn alone as the overlay draws it on a palette image (no anti-aliasing), cropped to its ink."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (2000, 200), 0)
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"
    draw.text((10, 10), text, fill=255, font=font)
    return _crop(np.asarray(image) > 0)


def _crop(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def test_the_overlay_burns_in_the_age_warning(tmp_path):
    """The warning is in the pixels: under the red banner, a line in the warning colour whose ink is exactly the
    warning's text rendered alone; absent when the age is known."""
    from triage_node.encoding.sc import _font

    source, unknown, known = _unknown_and_known()
    display = display_of(source)
    images = {}
    for name, pred in (("unknown", unknown), ("known", known)):
        path = write(build_overlay(source, display, pred), tmp_path / f"sc-{name}.dcm")
        back = pydicom.dcmread(path)
        assert back.BurnedInAnnotation == "YES"
        images[name] = back.pixel_array  # palette indices (the default jpeg-ls-palette encoding)
        errors, _ = dciodvfy(path)
        assert errors == [], errors
    red = {n: im == _WARN_INDEX for n, im in images.items()}
    banner_end = int(np.flatnonzero(red["known"].any(axis=1)).max())  # known age: the red banner only
    assert np.array_equal(red["known"][banner_end + 1:], np.zeros_like(red["known"][banner_end + 1:]))
    assert np.array_equal(red["unknown"][:banner_end + 1], red["known"][:banner_end + 1])  # the same banner
    warning_ink = red["unknown"][banner_end + 1:]
    assert warning_ink.any(), "no warning-coloured text under the banner"
    small = _font(max(10, round(24 * max(min(display.shape), 256) / 1024)))  # the overlay's small font
    assert np.array_equal(_crop(warning_ink), _text_mask(AGE_UNKNOWN_WARNING, small))
    assert not np.array_equal(_crop(warning_ink), _text_mask("AGE KNOWN", small))


def test_the_gsps_says_it_too(tmp_path):
    source, unknown, known = _unknown_and_known()
    for name, pred in (("unknown", unknown), ("known", known)):
        path = write(build_gsps(source, pred), tmp_path / f"gsps-{name}.dcm")
        back = pydicom.dcmread(path)
        texts = [str(t.UnformattedTextValue) for a in back.GraphicAnnotationSequence
                 for t in a.get("TextObjectSequence", [])]
        assert (AGE_UNKNOWN_WARNING in texts) == (name == "unknown"), texts
        dcmpschk(path)
        errors, _ = dciodvfy(path)
        assert errors == [], errors


@pytest.fixture
def pediatric_demo(tmp_path):
    """The demo package with a pediatric point flagging every child (threshold 0) and an adult point flagging none
    (threshold 1): the verdict says which gate judged the film."""
    from triage_node.inference.model import AgeOperatingPoint

    pkg = tmp_path / "demo-ped"
    shutil.copytree(ROOT / "models" / "demo", pkg)
    cfg = json.loads((pkg / "model.json").read_text())
    cfg["thresholds"]["gate"] = 1.0
    cfg["thresholds"]["gate_pediatric"] = AgeOperatingPoint("pediatric", 0.0, 6.0, "test").settings()
    (pkg / "model.json").write_text(json.dumps(cfg))
    return pkg


def test_the_node_routes_a_film_by_its_dates_and_says_so(tmp_path, pediatric_demo):
    """A real film without Patient's Age: a child by its dates goes to the pediatric point; with the NIH placeholder
    birth date its age is unknown, the adult point judges it, and the SR and the overlay say so."""
    cfg = config.Config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(pediatric_demo), device="cpu"))
    preds = {}
    for name, birth in (("child", "20200301"), ("placeholder", "19010101")):
        ds = pydicom.dcmread(SAMPLES[0])
        if "PatientAge" in ds:
            del ds.PatientAge
        ds.PatientBirthDate, ds.StudyDate = birth, "20230315"
        ds.save_as(tmp_path / f"{name}.dcm")
        preds[name] = pipeline.analyze(tmp_path / f"{name}.dcm", cfg)
    assert preds["child"].operating_point == "pediatric" and preds["child"].positive
    assert preds["child"].age_rule == "PatientBirthDate and StudyDate" and not preds["child"].age_unknown
    p = preds["placeholder"]
    assert p.operating_point == "age unknown" and not p.positive and p.age_unknown
    assert p.age_rule == "unknown (no PatientAge; PatientBirthDate a placeholder: over 120 years before StudyDate)"
    files = pipeline.build(tmp_path / "placeholder.dcm", p, cfg, tmp_path / "out")
    sr = pydicom.dcmread(next(f for f in files if f.name.startswith("sr-")))
    texts = _sr_texts(sr)
    assert f"Algorithm Parameters: age_rule={p.age_rule}" in texts
    assert f"Algorithm Parameters: age_warning={AGE_UNKNOWN_WARNING}" in texts


def test_evaluate_reads_the_age_from_the_dates_as_the_node_does(tmp_path):
    from triage_node.training import evaluate

    ds = pydicom.dcmread(SAMPLES[0])
    if "PatientAge" in ds:
        del ds.PatientAge
    ds.PatientBirthDate, ds.StudyDate = "20200315", "20230315"
    ds.save_as(tmp_path / "child.dcm")
    ds.PatientBirthDate = "19010101"
    ds.save_as(tmp_path / "placeholder.dcm")
    items = [evaluate.Item(tmp_path / "child.dcm", 1, "a"), evaluate.Item(tmp_path / "placeholder.dcm", 1, "b")]
    assert evaluate.film_ages(items, "auto") == [3.0, None]
