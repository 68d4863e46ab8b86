"""Real-world DICOM oddities (tests/oddities/make_corpus.py, generated from a real NIH film) through one running
node: each ends sent, skipped or dead-lettered with its reason; what is sent passes dciodvfy, carries the patient's
name in its character set, and shows the film the way the plain film shows (INVERSE, MONOCHROME1, signed data,
LUT sequences and padding included)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import ARTIFACTS, c_store, real_data, require

from triage_node import config, dicom_io, pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent / "oddities"))
from make_corpus import CASES, make_corpus

# tests/ is not a package: pytest puts it on sys.path
from test_enc_common import dciodvfy, prediction

TERMINAL = ("sent", "skipped", "dead_lettered")
SAME = [name for name in CASES if name not in ("lateral_view", "bits_allocated_32")]
#: Type 2 and 3 attributes of an SC, CR or DX source (Patient, General Study, Patient Study, General Series, General
#: Equipment, General Image, DX Positioning): real archives lack any of them, and our outputs must stay valid.
OPTIONAL = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize", "PatientWeight",
            "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription",
            "SeriesNumber", "SeriesDate", "SeriesTime", "SeriesDescription", "BodyPartExamined", "Laterality",
            "ViewPosition", "Manufacturer", "InstitutionName", "StationName", "InstanceNumber", "ContentDate",
            "ContentTime", "AcquisitionDate", "AcquisitionTime", "ImageComments", "PixelSpacing")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    film = real_data("nih", "original", "00000061_012.dcm")
    return make_corpus(tmp_path_factory.mktemp("oddities"), film)


def _on_grid(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling of ``img`` onto ``shape`` (to compare a 64 x 64 or 4256 x 3488 case)."""
    r = np.arange(shape[0]) * img.shape[0] // shape[0]
    c = np.arange(shape[1]) * img.shape[1] // shape[1]
    return img[r[:, None], c[None, :]]


def _same_display(img: np.ndarray, plain: np.ndarray, border: int = 0) -> tuple[float, float]:
    """(correlation, mean absolute difference) of two renderings in [0, 1] on the plain film's grid."""
    a = _on_grid(img, plain.shape) if img.shape != plain.shape else img
    b = plain if img.shape == plain.shape else _on_grid(_on_grid(plain, img.shape), plain.shape)
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1]), float(np.abs(a - b).mean())


@pytest.mark.parametrize("case", SAME)
def test_each_oddity_decodes_like_the_plain_film(corpus, case):
    """dicom_io.pixels (what the model sees): same orientation and grey levels as the plain film, within 2 %."""
    info = corpus[case]
    plain = dicom_io.pixels(pydicom.dcmread(corpus["_plain"]["file"]))
    img = dicom_io.pixels(pydicom.dcmread(info["file"]))
    border = info.get("border", 0)
    if border:
        assert float(img[:border].max()) == 0.0 and float(img[:, -border:].max()) == 0.0, "padding shows black"
    corr, mad = _same_display(img, plain, border)
    assert corr > 0.98 and mad < 0.02, f"{case}: correlation {corr:.3f}, mean abs difference {mad:.3f}"


@pytest.mark.parametrize("stripped", [False, True], ids=["as-is", "optional-absent"])
@pytest.mark.parametrize("case", SAME)
def test_each_oddity_gives_dciodvfy_clean_sr_sc_gsps(corpus, case, stripped, tmp_path):
    """SR, SC overlay and GSPS of every oddity pass dciodvfy with 0 errors, also when the source lacks every optional
    attribute (``google_nih_exact`` is the real Google NIH header: no BodyPartExamined, so the SC and GSPS must carry
    an empty Laterality, Type 2C in General Series)."""
    require("dciodvfy")
    src = Path(corpus[case]["file"])
    if stripped:
        ds = pydicom.dcmread(src)
        for kw in OPTIONAL:
            ds.pop(kw, None)
        src = tmp_path / f"{case}.dcm"
        ds.save_as(src, enforce_file_format=True)
    cfg = config.Config()
    cfg = replace(cfg, outputs=replace(cfg.outputs, sc=True, gsps=True, archive_dir=""))
    files = pipeline.build(src, prediction(), cfg, tmp_path / "out")
    assert sorted(f.name.split("-")[0] for f in files) == ["gsps", "sc", "sr"]
    errors = {f.name.split("-")[0]: dciodvfy(f)[0] for f in files}
    assert errors == {"gsps": [], "sc": [], "sr": []}, f"{case}: {errors}"


@pytest.mark.integration
def test_oddities_corpus_through_a_running_node(corpus, tmp_path, redis_url, make_node):
    require("dciodvfy")
    t0 = time.time()
    out = tmp_path / "out"
    node = make_node(redis_url, [{"name": "out", "kind": "folder", "path": str(out)}], outputs={"gsps": True},
                     web={"enabled": False})
    cases = {name: info for name, info in corpus.items() if not name.startswith("_")}
    statuses = c_store(node.port, [pydicom.dcmread(info["file"]) for info in cases.values()])
    assert statuses == [0] * len(cases), dict(zip(cases, statuses))
    uids = {info["sop_instance_uid"]: name for name, info in cases.items()}
    entries = node.wait_audit(lambda es: {e.get("sop_instance_uid") for e in es if e["event"] in TERMINAL}
                              >= set(uids), timeout=480)
    plain_display = dicom_io.pixels(pydicom.dcmread(corpus["_plain"]["file"]))
    summary: dict[str, dict] = {}
    problems = []
    for sop, name in uids.items():
        info = cases[name]
        ended = [e for e in entries if e.get("sop_instance_uid") == sop and e["event"] in TERMINAL]
        assert len(ended) == 1, f"{name}: {ended}"
        outcome, reason = ended[0]["event"], str(ended[0].get("reason", ""))
        row = summary[name] = {"outcome": outcome, "reason": reason}
        if outcome != info["expect"]:
            problems.append(f"{name}: {outcome} ({reason}), expected {info['expect']}")
            continue
        if outcome != "sent":
            assert info["reason"] in reason, f"{name}: reason {reason!r}"
            if outcome == "dead_lettered":
                assert (tmp_path / "dead-letter" / sop / "reason.json").exists()
            continue
        files = [f for uid in ended[0]["sent_uids"] for f in out.glob(f"*-{uid}.dcm")]
        assert sorted(f.name.split("-")[0] for f in files) == ["gsps", "sc", "sr"], f"{name}: {files}"
        row["dciodvfy_errors"] = 0
        for f in files:
            errors, _ = dciodvfy(f)
            row["dciodvfy_errors"] += len(errors)
            if errors:
                problems.append(f"{name} {f.name}: {errors}")
            ds = pydicom.dcmread(f)
            if "patient_name" in info:  # the name, decoded with the character set the output declares
                assert str(ds.PatientName) == info["patient_name"], f"{name} {f.name}: {ds.PatientName!r}"
            if f.name.startswith("gsps-"):  # a Weasis-class viewer shows the source through this state
                assert ds.PresentationLUTShape == info.get("gsps_presentation_lut", "IDENTITY"), name
                assert ("ModalityLUTSequence" in ds) == bool(info.get("gsps_modality_lut")), name
            if f.name.startswith("sc-") and min(ds.Rows, ds.Columns) >= 512:
                shown = ds.pixel_array
                if ds.PhotometricInterpretation == "PALETTE COLOR":  # as a viewer shows it
                    from pydicom.pixels import apply_color_lut

                    shown = apply_color_lut(shown, ds) >> 8
                grey = shown.astype(np.float32).mean(axis=2) / 255.0
                top = ds.Rows // 6  # below the banner
                sc = _on_grid(grey, plain_display.shape)
                corr, _ = _same_display(sc[top * 1024 // ds.Rows:], plain_display[top * 1024 // ds.Rows:],
                                        info.get("border", 0))
                row["overlay_correlation"] = round(corr, 3)
                assert corr > 0.9, f"{name}: the overlay does not show the film as the plain film shows ({corr:.2f})"
    counts = {k: sum(r["outcome"] == k for r in summary.values()) for k in TERMINAL}
    record = {"suite": "oddities", "cases": summary, "counts": counts, "total": len(summary),
              "dciodvfy_errors": sum(r.get("dciodvfy_errors", 0) for r in summary.values()),
              "unexpected": problems, "seconds": round(time.time() - t0, 1),
              "command": ".venv/bin/python -m pytest tests/test_oddities.py", "ts": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (ARTIFACTS / "reliability").mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "reliability" / "oddities.json").write_text(json.dumps(record, indent=1, ensure_ascii=False))
    assert problems == []
