"""The age-specific (pediatric) operating point: Patient's Age, the model's choice of threshold, its packaging,
``triage-node calibrate`` and ``evaluate --population``, and the SR that says which point judged the film."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from conftest import REAL_DATA, ROOT, SAMPLES
from pydicom.dataset import Dataset

from triage_node import config, dicom_io, pipeline
from triage_node.errors import ModelError
from triage_node.inference.classifier import build_classifier
from triage_node.inference.model import CAM, AgeOperatingPoint, RawOutput, TriageModel, load_model, save_package
from triage_node.inference.prior import LungPrior
from triage_node.inference.types import ModelInfo, Prediction
from triage_node.training import calibrate, evaluate

DEMO = ROOT / "models" / "demo"
KERMANY = REAL_DATA / "kermany"


@pytest.mark.parametrize("value,years", [
    ("077Y", 77.0), ("005M", 5 / 12), ("003W", 21 / 365.25), ("010D", 10 / 365.25), ("48", 48.0), (" 048Y", 48.0),
    ("", None), (None, None), ("abcY", None), ("1234", None), ("12.5Y", None),
])
def test_patient_age_is_read_from_the_age_string(value, years):
    ds = Dataset()
    if value is not None:
        with warnings.catch_warnings():  # pydicom warns of the malformed values, which is the point here
            warnings.simplefilter("ignore", UserWarning)
            ds.PatientAge = value
    got = dicom_io.patient_age_years(ds)
    assert got == pytest.approx(years) if years is not None else got is None


def _model(threshold: float = 0.5, pediatric: AgeOperatingPoint | None = None) -> TriageModel:
    torch.manual_seed(0)
    heat = np.ones((64, 64), np.float32)
    return TriageModel(None, build_classifier("resnet18"), LungPrior(heat, 0.0), ModelInfo("age-test", "0.0.1-test"),
                       threshold=threshold, box_threshold=0.0, input_size=64, gate_size=64, detector_arch=CAM,
                       gate_arch="resnet18", device="cpu", pediatric=pediatric)


def _raw(probability: float) -> RawOutput:
    return RawOutput(np.array([[10, 10, 30, 40]], np.float32), np.array([probability], np.float32),
                     np.array([1.0], np.float32), probability, 64, 64)


def test_the_operating_point_follows_the_age():
    m = _model(0.5, AgeOperatingPoint("pediatric", 0.8, 6.0))
    assert m.threshold_for(3.0) == (0.8, "pediatric")
    assert m.threshold_for(6.0) == (0.5, "adult")  # "younger than": 6 years is no longer the pediatric point
    assert m.threshold_for(None) == (0.5, "age unknown")
    assert m.min_threshold == 0.5
    assert _model(0.5).threshold_for(3.0) == (0.5, "")  # one operating point: the age does not matter

    adult, child, unknown = (m.postprocess(_raw(0.6), age_years=a) for a in (40.0, 3.0, None))
    assert adult.positive and adult.detections and adult.operating_point == "adult"
    assert not child.positive and not child.detections and child.threshold == 0.8
    assert child.operating_point == "pediatric"
    assert unknown.positive and unknown.operating_point == "age unknown"


def test_boxes_are_computed_down_to_the_lowest_threshold_of_any_point():
    """A film below the adult threshold but above the pediatric one needs its CAM boxes: ``analyze`` must not skip
    them because the adult gate says negative."""
    img = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    p = _model().analyze([img], run_detector=True)[0].probability
    m = _model(min(p + 0.2, 1.0), AgeOperatingPoint("pediatric", max(p - 0.2, 0.0), 6.0))
    child, adult = m.predict([img, img], ages=[2.0, 30.0])
    assert child.positive and len(child.detections) > 0 and child.operating_point == "pediatric"
    assert not adult.positive and not adult.detections
    with pytest.raises(ValueError, match="ages"):
        m.predict([img], ages=[1.0, 2.0])


def test_the_point_travels_in_the_package_and_the_prediction(tmp_path):
    point = AgeOperatingPoint("pediatric", 0.31, 6.0, "a rule", {"n": 10})
    save_package(_model(0.5, point), tmp_path / "pkg")
    cfg = json.loads((tmp_path / "pkg" / "model.json").read_text())
    assert cfg["thresholds"]["gate_pediatric"]["threshold"] == 0.31
    assert load_model(tmp_path / "pkg", device="cpu").pediatric == point
    save_package(_model(0.5), tmp_path / "plain")
    assert load_model(tmp_path / "plain", device="cpu").pediatric is None
    cfg["thresholds"]["gate_pediatric"]["threshold"] = 1.5
    (tmp_path / "pkg" / "model.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="out of range"):
        load_model(tmp_path / "pkg", device="cpu")

    pred = _model(0.5, point).postprocess(_raw(0.4), age_years=2.0)
    back = Prediction.from_json(json.loads(json.dumps(pred.to_json())))
    assert back.operating_point == "pediatric" and back.positive
    old = pred.to_json()
    del old["operating_point"]  # a payload queued by a node before this field
    assert Prediction.from_json(old).operating_point == ""


def test_choose_threshold_on_a_hand_worked_case():
    y = np.array([1, 1, 1, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.3, 0.4, 0.2, 0.1])
    # sensitivity >= 0.6: t=0.8 (acc 5/6) and t=0.3 (acc 5/6) tie; the higher threshold wins
    got = calibrate.choose_threshold(y, p, 0.6)
    assert got["threshold"] == 0.8 and got["accuracy"] == pytest.approx(5 / 6)
    assert got["sensitivity"] == pytest.approx(2 / 3) and got["specificity"] == 1.0
    got = calibrate.choose_threshold(y, p, 0.9)  # only t <= 0.3 reach sensitivity 1
    assert got["threshold"] == 0.3 and got["specificity"] == pytest.approx(2 / 3)
    assert got["accuracy"] == pytest.approx(5 / 6)
    with pytest.raises(ValueError):
        calibrate.choose_threshold(np.ones(3), np.array([0.1, 0.2, 0.3]), 0.9)


def test_classification_at_a_threshold_per_film():
    y = np.array([1, 1, 0, 0])
    p = np.array([0.5, 0.3, 0.4, 0.1])
    c = evaluate.classification(y, p, np.array([0.6, 0.2, 0.6, 0.2]))
    assert (c["sensitivity"], c["specificity"], c["threshold"]) == (0.5, 1.0, [0.2, 0.6])
    assert evaluate.classification(y, p, 0.35)["threshold"] == 0.35


def _kermany_csv(tmp: Path, n: int = 8) -> Path:
    with open(KERMANY / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pick = [r for r in rows if r["label"] == "1"][: n // 2] + [r for r in rows if r["label"] == "0"][: n // 2]
    out = tmp / "kermany.csv"
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "id_prefix"])
        for r in pick:
            w.writerow([KERMANY / r["path"], r["label"], r["id_prefix"]])
    return out


def test_calibrate_and_evaluate_on_real_pediatric_films(tmp_path, capsys):
    """`calibrate` scores real pediatric films, writes the point into a copy of the package (weights untouched),
    and `evaluate --population pediatric` judges them at it."""
    labels = _kermany_csv(tmp_path)
    pkg = tmp_path / "pkg"
    shipped = (DEMO / "model.json").read_bytes()
    args = calibrate.get_args_parser().parse_args(
        ["--model", str(DEMO), "--image-labels", str(labels), "--max-age", "6", "--min-sensitivity", "1.0",
         "--out", str(pkg), "--threads", "1"])
    assert calibrate.main(args) == 0
    point = json.loads((pkg / "model.json").read_text())["thresholds"]["gate_pediatric"]
    assert (DEMO / "model.json").read_bytes() == shipped  # --out: the shipped package is not touched
    assert point["gate"]["file"] == "gate_pediatric.safetensors"  # the package's own pediatric gate is kept
    assert point["max_age_years"] == 6.0 and point["calibration"]["n"] == 8
    assert point["calibration"]["sensitivity"] == 1.0
    m = load_model(pkg, device="cpu")
    assert m.pediatric is not None and m.pediatric.threshold == point["threshold"]

    out = tmp_path / "eval"
    ev = evaluate.get_args_parser().parse_args(
        ["--model", str(pkg), "--image-labels", str(labels), "--population", "pediatric", "--out", str(out),
         "--threads", "1"])
    assert evaluate.main(ev) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["operating_points"] == {"pediatric": {"films": 8, "threshold": point["threshold"]}}
    assert rep["classification"]["threshold"] == point["threshold"]
    assert rep["classification"]["sensitivity"] == 1.0  # what it was calibrated to, on the same films
    with open(out / "per_image.csv", newline="") as f:
        flagged = [int(r["positive"]) for r in csv.DictReader(f)]
    assert sum(flagged) >= 4  # every positive of the 8 (sensitivity 1.0)


@pytest.fixture
def pediatric_demo(tmp_path) -> Path:
    """The demo package with a pediatric point that flags every child (threshold 0) and an adult point that flags
    nobody (threshold 1): what a film is called then says which point judged it."""
    pkg = tmp_path / "demo-ped"
    shutil.copytree(DEMO, pkg)
    cfg = json.loads((pkg / "model.json").read_text())
    cfg["thresholds"]["gate"] = 1.0
    cfg["thresholds"]["gate_pediatric"] = AgeOperatingPoint("pediatric", 0.0, 6.0, "test").settings()
    (pkg / "model.json").write_text(json.dumps(cfg))
    return pkg


def test_the_pipeline_reads_the_age_and_the_sr_names_the_point(tmp_path, pediatric_demo):
    cfg = config.Config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(pediatric_demo), device="cpu"))
    calls = {}
    for age in ("004Y", "045Y", ""):
        ds = pydicom.dcmread(SAMPLES[0])
        ds.PatientAge = age
        f = tmp_path / f"age-{age or 'none'}.dcm"
        ds.save_as(f)
        calls[age] = pipeline.analyze(f, cfg)
    assert calls["004Y"].positive and calls["004Y"].operating_point == "pediatric" and calls["004Y"].detections
    assert not calls["045Y"].positive and calls["045Y"].operating_point == "adult"
    assert calls[""].operating_point == "age unknown" and not calls[""].positive

    files = pipeline.build(tmp_path / "age-004Y.dcm", calls["004Y"], cfg, tmp_path / "out")
    sr = pydicom.dcmread(next(f for f in files if f.name.startswith("sr-")))
    texts: list[str] = []

    def walk(ds: Dataset) -> None:
        for item in ds.get("ContentSequence", []):
            if "TextValue" in item:
                texts.append(str(item.TextValue))
            walk(item)

    walk(sr)
    # the Algorithm Parameters of every measurement group: the image group and the one box's
    assert texts.count("operating_point=pediatric") == 2 and texts.count("threshold=0") == 2


def test_overlay_and_gsps_say_a_pediatric_threshold_judged_the_film():
    from triage_node.encoding.pr import build_gsps
    from triage_node.encoding.sc import render_overlay

    src = pydicom.dcmread(SAMPLES[0])
    base = Prediction(0.3, 0.2, (), ModelInfo("m", "1.0-demo"), int(src.Rows), int(src.Columns))
    child = dataclasses.replace(base, operating_point="pediatric")
    texts = [str(t.UnformattedTextValue) for g in [build_gsps(src, child)]
             for a in g.GraphicAnnotationSequence for t in a.get("TextObjectSequence", [])]
    assert any("POSITIVE (pediatric threshold 0.20)" in t for t in texts), texts
    display = np.full((int(src.Rows), int(src.Columns)), 128, np.uint8)
    assert not np.array_equal(render_overlay(display, base), render_overlay(display, child))  # the header line
    adult = dataclasses.replace(base, operating_point="adult")
    assert np.array_equal(render_overlay(display, base), render_overlay(display, adult))  # adult: as before


def test_evaluate_reads_the_age_as_the_node_does(tmp_path):
    """``--population auto``: the CSV's age column first, else the DICOM header's Patient's Age (the RSNA samples
    have no age column), else unknown; ``pediatric`` / ``adult`` override both."""
    ds = pydicom.dcmread(SAMPLES[0])
    ds.PatientAge = "004Y"
    child = tmp_path / "child.dcm"
    ds.save_as(child)
    png = tmp_path / "film.png"
    png.write_bytes(b"not read")
    items = [evaluate.Item(child, 1, "a"), evaluate.Item(child, 1, "b", age=40.0), evaluate.Item(png, 0, "c"),
             evaluate.Item(tmp_path / "broken.dcm", 0, "d")]
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 10)
    assert evaluate.film_ages(items, "auto") == [4.0, 40.0, None, None]
    assert evaluate.film_ages(items, "pediatric") == [0.0] * 4
    assert evaluate.film_ages(items, "adult") == [200.0] * 4


# ----------------------------------------------------------------------------------- a pediatric gate of its own
def _seeded_classifier(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_classifier("resnet18")
    with torch.no_grad():  # a distinct, non-trivial final layer, so the two gates disagree clearly
        for prm in net.parameters():
            if prm.dim() == 2:
                prm.normal_(0, 0.5)
    return net


def _two_gate_model(max_age: float = 6.0) -> TriageModel:
    point = AgeOperatingPoint("pediatric", 0.4, max_age, "test", gate=_seeded_classifier(2), gate_arch="resnet18")
    m = _model(0.5, point)
    m.gate = _seeded_classifier(1).eval()
    m.gate.to(memory_format=torch.channels_last)
    return m


def test_each_film_goes_through_its_own_populations_gate_only():
    films = [np.random.default_rng(i).random((80, 70), dtype=np.float32) for i in range(4)]
    ages = [3.0, 40.0, None, 5.9]
    m = _two_gate_model()
    mixed = [r.probability for r in m.analyze(films, ages=ages)]
    alone = [m.analyze([f], ages=[a])[0].probability for f, a in zip(films, ages)]
    assert mixed == pytest.approx(alone, abs=1e-5)  # batching children with adults changes nothing
    adult_only = [r.probability for r in m.analyze(films)]  # no ages: every film through the adult gate
    assert mixed[1] == pytest.approx(adult_only[1], abs=1e-5) and mixed[2] == pytest.approx(adult_only[2], abs=1e-5)
    assert abs(mixed[0] - adult_only[0]) > 1e-3 and abs(mixed[3] - adult_only[3]) > 1e-3
    child = _model(0.5)
    child.gate = m.pediatric.gate  # the pediatric gate alone gives the children's scores
    assert [r.probability for r in child.analyze([films[0], films[3]])] == pytest.approx([mixed[0], mixed[3]],
                                                                                          abs=1e-5)
    preds = m.predict(films, ages=ages)
    assert [p.operating_point for p in preds] == ["pediatric", "adult", "age unknown", "pediatric"]
    assert [p.threshold for p in preds] == [0.4, 0.5, 0.5, 0.4]


def test_int8_weights_round_trip_within_half_a_step_and_keep_the_scores(tmp_path):
    from triage_node.inference.model import _dequantize, _int8

    sd = _seeded_classifier(3).state_dict()
    back = _dequantize(_int8(sd))
    assert set(back) == set(sd)
    for k, v in sd.items():
        if v.is_floating_point() and v.dim() >= 2:
            step = v.abs().amax(dim=tuple(range(1, v.dim())), keepdim=True) / 127
            assert bool(((back[k] - v).abs() <= step / 2 + 1e-7).all()), k
    m = _two_gate_model()
    save_package(m, tmp_path / "fp16")
    save_package(m, tmp_path / "int8", weights="int8")
    sizes = {w: sum(f.stat().st_size for f in (tmp_path / w).glob("*.safetensors")) for w in ("fp16", "int8")}
    assert sizes["int8"] < 0.55 * sizes["fp16"]
    assert load_model(tmp_path / "int8", device="cpu").pediatric.gate is not None
    # a trained network: the shipped package is fp16 because int8 does not keep an EfficientNet-Lite gate's scores
    # (its depthwise layers compound the rounding: up to ~0.1 on these films); fp16 keeps them to 1e-3
    assert json.loads((DEMO / "model.json").read_text())["weights"] == "fp16"
    shipped = load_model(DEMO, device="cpu")
    save_package(shipped, tmp_path / "demo-fp16")
    save_package(shipped, tmp_path / "demo-int8", weights="int8")
    films = [dicom_io.pixels(pydicom.dcmread(f)) for f in SAMPLES[:6]]
    p0 = [r.probability for r in shipped.analyze(films)]
    pa = [r.probability for r in load_model(tmp_path / "demo-fp16", device="cpu").analyze(films)]
    pb = [r.probability for r in load_model(tmp_path / "demo-int8", device="cpu").analyze(films)]
    assert pa == pytest.approx(p0, abs=1e-3)
    assert max(abs(a - b) for a, b in zip(pb, p0)) > 0.01  # why 0.5.0 is not stored as int8


def test_a_pediatric_gate_without_its_checksum_is_refused(tmp_path):
    save_package(_two_gate_model(), tmp_path / "pkg", weights="int8")
    cfg = json.loads((tmp_path / "pkg" / "model.json").read_text())
    assert cfg["thresholds"]["gate_pediatric"]["gate"] == {"file": "gate_pediatric.safetensors", "arch": "resnet18"}
    assert cfg["weights"] == "int8"
    del cfg["files"]["gate_pediatric.safetensors"]
    (tmp_path / "pkg" / "model.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="gate_pediatric"):
        load_model(tmp_path / "pkg", device="cpu")


def test_age_gate_combines_two_packages(tmp_path):
    from triage_node.training import age_gate

    adult, child = _model(0.3), _model(0.7)
    child.gate = _seeded_classifier(5).eval()
    save_package(adult, tmp_path / "adult")
    save_package(child, tmp_path / "child")
    (tmp_path / "adult" / "split.json").write_text("{}")
    args = age_gate.get_args_parser().parse_args(
        ["--model", str(tmp_path / "adult"), "--pediatric-from", str(tmp_path / "child"), "--max-age", "6",
         "--version", "9.9-demo", "--out", str(tmp_path / "both")])
    assert age_gate.main(args) == 0
    both = load_model(tmp_path / "both", device="cpu")
    assert both.info.version == "9.9-demo" and both.threshold == 0.3
    assert both.pediatric is not None and both.pediatric.threshold == 0.7 and both.pediatric.max_age_years == 6.0
    assert (tmp_path / "both" / "split.json").exists()
    film = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    c = load_model(tmp_path / "child", device="cpu").analyze([film])[0].probability
    a = load_model(tmp_path / "adult", device="cpu").analyze([film])[0].probability
    kid, grown = both.analyze([film, film], ages=[2.0, 30.0])
    assert kid.probability == pytest.approx(c, abs=0.02) and grown.probability == pytest.approx(a, abs=0.02)
