"""``triage-node validate`` and ``calibrate --site``: a hand-made audit trail and ground truth with hand-computed
figures, the ORU keyword labeller on hand-written reports, bad input named row by row, the MLLP collector, the HTML
report in headless Chromium, and the site point reaching the SR's Algorithm Parameters."""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from conftest import ARTIFACTS, SAMPLES, require, write_toml

from triage_node import cli
from triage_node.audit import Audit
from triage_node.audit import read as read_audit
from triage_node.services import free_port
from triage_node.transport.flags import _mllp_exchange
from triage_node.validate import truth as T
from triage_node.validate.cli import listen_mllp

# eight films: hand-computed AUC 14/16 = 0.875; at 0.5 sensitivity 3/4, specificity 3/4
LABELS = [1, 1, 1, 0, 0, 0, 0, 1]
SCORES = [0.9, 0.8, 0.3, 0.6, 0.2, 0.1, 0.4, 0.7]
VIEWS = ["PA", "PA", "AP", "PA", "AP", "PA", "AP", "AP"]


def sop(i: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.{1000 + i}"


def make_trail(tmp_path: Path) -> Path:
    audit_path = tmp_path / "audit.jsonl"
    audit = Audit(audit_path)
    for i, (p, view) in enumerate(zip(SCORES, VIEWS)):
        audit.record("received", sop_instance_uid=sop(i), study_instance_uid=f"1.2.3.{i}", accession=f"ACC{i}")
        audit.record("analysed", sop_instance_uid=sop(i), probability=p, positive=p >= 0.5, threshold=0.5,
                     operating_point="adult", model="m 1.0",
                     stats={"view": view, "age_band": "40-64", "manufacturer": "ACME"})
    audit.record("analysed", sop_instance_uid=sop(99), probability=0.5, positive=True, model="m 1.0")  # no truth
    return audit_path


def config(tmp_path: Path, audit_path: Path, **model) -> Path:
    return write_toml(tmp_path / "node.toml", {
        "audit_log": str(audit_path), "spool": {"directory": str(tmp_path / "spool")},
        "model": {"path": "untrained", "site_operating_point": str(tmp_path / "site" / "point.json"), **model}})


def test_validate_hand_computed(tmp_path):
    trail = make_trail(tmp_path)
    csv = tmp_path / "truth.csv"
    csv.write_text("sop_instance_uid,label\n" + "".join(f"{sop(i)},{y}\n" for i, y in enumerate(LABELS)))
    out = tmp_path / "report"
    assert cli.main(["validate", "--config", str(config(tmp_path, trail)), "--truth", str(csv),
                     "--out", str(out)]) == 0
    r = json.loads((out / "report.json").read_text())
    o = r["overall"]
    assert o["n"] == 8 and o["positives"] == 4
    assert o["auc"] == pytest.approx(14 / 16)
    assert o["sensitivity"] == pytest.approx(0.75) and o["specificity"] == pytest.approx(0.75)
    assert (o["tp"], o["fn"], o["tn"], o["fp"]) == (3, 1, 3, 1)
    lo, hi = o["sensitivity_ci95"]
    assert lo == pytest.approx(0.3006, abs=1e-3) and hi == pytest.approx(0.9544, abs=1e-3)  # Wilson 3/4
    assert o["auc_ci95"][0] <= 0.875 <= o["auc_ci95"][1]
    # within view: PA films 0,1,3,5 -> labels 1,1,0,0 scores .9,.8,.6,.1: AUC 1; AP films 2,4,6,7 -> 1,0,0,1:
    # positives .3,.7 over negatives .2,.4: (2 + 1) / 4 = 0.75
    assert r["subgroups"]["view"]["PA"]["auc"] == pytest.approx(1.0)
    assert r["subgroups"]["view"]["AP"]["auc"] == pytest.approx(0.75)
    assert {d["sop_instance_uid"] for d in r["discordant"]} == {sop(2), sop(3)}
    cal = {c["bin"]: c for c in r["calibration"]}
    assert cal["0.9-1.0"]["n"] == 1 and cal["0.9-1.0"]["observed"] == 1.0
    for f in ("report.html", "roc.png", "scores.png"):
        assert (out / f).stat().st_size > 1000


def test_validate_by_accession_and_bad_rows(tmp_path, capsys):
    trail = make_trail(tmp_path)
    csv = tmp_path / "truth.csv"
    csv.write_text("accession_number,label\nACC0,1\nACC1,1\nACC2,1\nACC3,0\nACC4,0\nACC5,0\nACC6,0\nACC7,1\n"
                   "ACC404,1\n"       # row 10: never analysed
                   "ACC0,1\n"         # row 11: duplicate, same label: the first is kept
                   "ACC5,1\n"         # row 12: duplicate with another label: ACC5 is left out
                   "ACC6,maybe\n"     # row 13: not 0/1
                   ",1\n")            # row 14: no key
    out = tmp_path / "report"
    rc = cli.main(["validate", "--config", str(config(tmp_path, trail)), "--truth", str(csv), "--out", str(out)])
    assert rc == 1  # some input rejected; the report is still written
    err = capsys.readouterr().err
    assert "truth.csv row 10: Accession Number ACC404 was not analysed" in err
    assert "truth.csv row 11: duplicate accession_number ACC0 (first at row 2)" in err
    assert "truth.csv row 12: duplicate accession_number ACC5 (first at row 7, another label: both left out)" in err
    assert "truth.csv row 13: label 'maybe' is not 0 or 1" in err
    assert "truth.csv row 14: empty accession_number" in err
    r = json.loads((out / "report.json").read_text())
    assert r["overall"]["n"] == 7 and len(r["rejected_input"]) == 5  # nothing else lost: ACC5 only
    assert sop(5) not in {f["sop_instance_uid"] for f in r["films"]}


REPORTS = {
    "No consolidation.": 0,
    "Pneumonia is not excluded.": 1,
    "Right lower lobe consolidation consistent with pneumonia.": 1,
    "No focal consolidation, effusion or pneumothorax.": 0,
    "Lungs are clear. No evidence of pneumonia.": 0,
    "Previously seen pneumonia has resolved.": 0,
    "No effusion. Left basal opacity; pneumonia cannot be excluded.": 1,
    "No pneumothorax, but there is consolidation in the left lower lobe.": 1,
    "Indication: rule out pneumonia. Findings: the lungs are clear.": 0,
    "Consolidation is not seen.": 0,
    "Patchy airspace opacity at the right base, likely infection.": 1,
    "Without infiltrate.": 0,
    "No acute cardiopulmonary process.": 0,
    "Cannot rule out pneumonia.": 1,
    "Pneumonia unlikely.": 0,
    "No effusion, possible pneumonia.": 1,
    "No definite pneumonia, possibly atelectasis.": 0,
    "Left basal atelectasis versus pneumonia.": 1,
    "No evidence of focal consolidation, pleural effusion, or pneumothorax to suggest pneumonia.": 0,
    "Findings: bilateral infiltrates.": 1,
}


@pytest.mark.parametrize("text,label", list(REPORTS.items()))
def test_oru_keyword_labeller(text, label):
    assert T.label_report(text)[0] == label


def test_uncertain_wording_is_marked():
    assert T.label_report("Pneumonia is not excluded.") == (1, True)
    assert T.label_report("Cannot rule out pneumonia.") == (1, True)
    assert T.label_report("No effusion, possible pneumonia.") == (1, True)
    assert T.label_report("Right lower lobe pneumonia.") == (1, False)


def oru(accession: str, text: str, control: str = "C1") -> str:
    return "\r".join([f"MSH|^~\\&|RIS|HOSP|TRIAGE||20261207||ORU^R01^ORU_R01|{control}|P|2.5.1", "PID|1||X",
                      f"OBR|1||{accession}|71045^XR CHEST^CPT", f"OBX|1|TX|IMP^Impression^L||{text}||||||F"]) + "\r"


def test_validate_from_oru_folder_with_a_bad_message(tmp_path, capsys):
    trail = make_trail(tmp_path)
    folder = tmp_path / "oru"
    folder.mkdir()
    texts = {1: "Right lower lobe consolidation.", 0: "No consolidation. Lungs are clear."}
    for i, y in enumerate(LABELS):
        (folder / f"{i:02d}.hl7").write_text(oru(f"ACC{i}", texts[y], f"C{i}"))
    (folder / "50-broken.hl7").write_text("this is not HL7\r")
    (folder / "51-nokey.hl7").write_text(oru("", "Pneumonia.").replace("OBR|1|||", "OBR|1|||"))
    out = tmp_path / "report"
    rc = cli.main(["validate", "--config", str(config(tmp_path, trail)), "--oru", str(folder), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "50-broken.hl7 message 1: does not start with an MSH segment" in err
    assert "51-nokey.hl7 message 1: no accession number" in err
    r = json.loads((out / "report.json").read_text())
    assert r["overall"]["n"] == 8 and r["overall"]["auc"] == pytest.approx(14 / 16)


def test_mllp_collector_acks_and_keeps_messages(tmp_path):
    port, ready = free_port(), threading.Event()
    t = threading.Thread(target=listen_mllp, args=("127.0.0.1", port, tmp_path / "oru", 4.0, ready), daemon=True)
    t.start()
    assert ready.wait(5)
    ack = _mllp_exchange("127.0.0.1", port, oru("ACC1", "Pneumonia.", "K1"), 5)
    assert "MSA|AA|K1" in ack
    bad = _mllp_exchange("127.0.0.1", port, "MSH|^~\\&|RIS|H|T||2026||ADT^A01|K2|P|2.5.1\r", 5)
    assert "MSA|AE|K2" in bad and "expected ORU" in bad
    t.join(10)
    assert len(list((tmp_path / "oru").glob("*.hl7"))) == 2


def test_report_in_a_real_browser(tmp_path, chrome):
    trail = make_trail(tmp_path)
    csv = tmp_path / "truth.csv"
    csv.write_text("sop_instance_uid,label\n" + "".join(f"{sop(i)},{y}\n" for i, y in enumerate(LABELS))
                   + "1.2.3.404,1\n")
    out = tmp_path / "report"
    cli.main(["validate", "--config", str(config(tmp_path, trail)), "--truth", str(csv), "--out", str(out)])
    chrome.get((out / "report.html").as_uri())
    head = chrome.find_element("id", "headline").text
    assert "AUC 0.875" in head and "sensitivity 0.750" in head and "specificity 0.750" in head
    imgs = chrome.execute_script("return [...document.images].map(i => i.naturalWidth)")
    assert len(imgs) == 2 and all(w > 100 for w in imgs)  # both PNGs load
    rows = chrome.find_elements("css selector", "table.discordant tbody tr")
    assert len(rows) == 2 and sop(2) in rows[0].text + rows[1].text
    assert "1.2.3.404 was not analysed" in chrome.find_element("css selector", "ul.rejected").text
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    chrome.save_screenshot(str(ARTIFACTS / "validation_report.png"))


@pytest.fixture
def chrome(tmp_path):
    require("chromium", "chromedriver")
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
              "--window-size=1200,1600", f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
                              options=opts)
    yield driver
    driver.quit()


def test_calibrate_site_writes_beside_the_package_audits_and_names_the_sr(tmp_path):
    from triage_node import config as config_mod
    from triage_node import pipeline

    trail = make_trail(tmp_path)
    csv = tmp_path / "truth.csv"
    csv.write_text("sop_instance_uid,label\n" + "".join(f"{sop(i)},{y}\n" for i, y in enumerate(LABELS)))
    cfg_path = config(tmp_path, trail)
    assert cli.main(["calibrate", "--site", "--config", str(cfg_path), "--truth", str(csv),
                     "--min-sensitivity", "1.0", "--min-films", "5", "--by", "dr-lead"]) == 0
    point = json.loads((tmp_path / "site" / "point.json").read_text())
    # sensitivity 1.0 on labels/scores above: the lowest positive score, 0.3, is the highest threshold that keeps
    # every positive (accuracy 6/8 there: negatives .6, .4 flagged)
    assert point["threshold"] == pytest.approx(0.3) and point["by"] == "dr-lead"
    assert point["package_sha256"] == "" and point["calibration"]["sensitivity"] == 1.0
    line = [e for e in read_audit(trail) if e["event"] == "site_operating_point"][-1]
    assert line["by"] == "dr-lead" and line["threshold"] == pytest.approx(0.3) and line["action"] == "set"

    cfg = config_mod.load(cfg_path)
    src = tmp_path / "film.dcm"
    shutil.copy(SAMPLES[0], src)
    pred = pipeline.analyze(src, cfg)
    assert pred.threshold == pytest.approx(0.3) and pred.operating_point == f"site {point['calibrated_at']}"
    files = pipeline.build(src, pred, replace(cfg, outputs=replace(cfg.outputs, sc=False, archive_dir="")),
                           tmp_path / "out")
    sr = pydicom.dcmread(next(f for f in files if f.name.startswith("sr-")))
    texts: list[str] = []

    def walk(ds) -> None:
        for item in ds.get("ContentSequence", []):
            if "TextValue" in item:
                texts.append(str(item.TextValue))
            walk(item)

    walk(sr)
    assert f"operating_point=site {point['calibrated_at']}" in texts and "threshold=0.3" in texts
    assert cli.main(["calibrate", "--site", "--remove", "--config", str(cfg_path), "--by", "dr-lead"]) == 0
    assert pipeline.analyze(src, cfg).threshold == 0.5  # the untrained package's own point again


def test_only_one_models_films_are_measured(tmp_path, capsys):
    trail = make_trail(tmp_path)
    audit = Audit(trail)
    for i in range(4):  # a newer model re-analysed half the films: its scores must not mix with the older ones
        audit.record("analysed", sop_instance_uid=sop(i), probability=0.5, positive=True, model="m 2.0")
    csv = tmp_path / "truth.csv"
    csv.write_text("sop_instance_uid,label\n" + "".join(f"{sop(i)},{y}\n" for i, y in enumerate(LABELS)))
    cfg = str(config(tmp_path, trail))
    assert cli.main(["validate", "--config", cfg, "--truth", str(csv), "--out", str(tmp_path / "new")]) == 1
    new = json.loads((tmp_path / "new" / "report.json").read_text())
    assert new["model"] == "m 2.0" and new["overall"]["n"] == 4 and "2 models" in new["warning"]
    assert "was not analysed by this node (or by another model)" in capsys.readouterr().err
    assert cli.main(["validate", "--config", cfg, "--truth", str(csv), "--model-label", "m 1.0",
                     "--out", str(tmp_path / "old")]) == 0
    old = json.loads((tmp_path / "old" / "report.json").read_text())
    assert old["overall"]["n"] == 8 and old["overall"]["auc"] == pytest.approx(14 / 16)
