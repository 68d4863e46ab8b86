"""Shadow mode and input drift on a running node (``triage-node up`` with real Celery workers and Redis).

Shadow: a real Storage SCP (pynetdicom) and a real MLLP listener as destinations get nothing while every film is
analysed, audited with its score and statistics and archived; ``triage-node mode live`` then switches the running
node (no restart) and the next film reaches both. Drift: the node is fed normal films, then the same films
blurred and brightened (gamma), then normal films again: the input drift state turns on for the image statistics
only (header statistics stay in band) and off again, in /metrics, in the audit (``drift_state``) and on the
dashboard in headless Chromium (screenshot in test-artifacts/).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pydicom
import pytest
from conftest import ARTIFACTS, SAMPLES, c_store
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from selenium.webdriver.support.ui import WebDriverWait
from test_flags import MLLPListener
from test_sr_first import RecordingPeer
from test_web import chrome  # noqa: F401  (fixture: headless Chromium)

from triage_node import dicom_io
from triage_node.age import read_age
from triage_node.inference import filmstats
from triage_node.monitoring.profile import build_reference_profile

pytestmark = pytest.mark.integration


def metrics(node) -> dict[tuple[str, tuple], float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{node.cfg['web']['port']}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def test_shadow_mode_sends_nothing_and_audits_every_film(tmp_path, redis_url, make_node, chrome):  # noqa: F811
    peer, lis = RecordingPeer(), MLLPListener()
    try:
        dests = peer.destination() + [{"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": lis.port,
                                       "positives_only": False}]
        node = make_node(redis_url, dests, outputs={"mode": "shadow"})
        films = [pydicom.dcmread(p) for p in SAMPLES[:3]]
        assert c_store(node.port, films) == [0, 0, 0]
        entries = node.wait_audit(lambda es: sum(e["event"] == "shadow" for e in es) >= 3)
        shadow = {e["sop_instance_uid"]: e for e in entries if e["event"] == "shadow"}
        assert set(shadow) == {str(d.SOPInstanceUID) for d in films}
        for uid, e in shadow.items():
            assert 0 <= e["probability"] <= 1 and "positive" in e and e["threshold"] > 0
            assert e["stats"]["rows"] == 1024 and e["stats"]["sharpness"] > 0  # the film's statistics
            assert list((tmp_path / "results" / uid).glob("sr-*.dcm")), "results archived"
        assert not any(e["event"] in ("sent", "sr_sent") for e in entries)
        trail = (tmp_path / "audit.jsonl").read_text()
        for d in films:  # the statistics carry no patient demographics
            for key in ("PatientName", "PatientID", "PatientBirthDate"):
                value = str(d.get(key, "") or "")
                assert len(value) < 4 or value not in trail, key
        m = metrics(node)
        assert m[("triage_mode", (("mode", "shadow"),))] == 1 and m[("triage_mode", (("mode", "live"),))] == 0
        assert m[("triage_results_shadow_total", ())] == 3 and m[("triage_results_sent_total", ())] == 0
        chrome.get(f"http://127.0.0.1:{node.cfg['web']['port']}/")
        WebDriverWait(chrome, 60).until(lambda d: d.find_element("id", "shadow-banner").is_displayed())
        assert "NOTHING is sent" in chrome.find_element("id", "shadow-banner").text
        rows = '#studies tr[data-status="shadow"]'
        WebDriverWait(chrome, 60).until(lambda d: len(d.find_elements("css selector", rows)) == 3)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        chrome.save_screenshot(str(ARTIFACTS / "dashboard_shadow.png"))
        status = subprocess.run([sys.executable, "-m", "triage_node.cli", "status", "--config",
                                 str(node.config_path)], capture_output=True, text=True, timeout=60)
        assert status.stdout.startswith("MODE: SHADOW"), status.stdout
        time.sleep(1.0)
        assert peer.got == [] and lis.messages == [], "shadow mode sent something"

        # switched to live on the running node: no restart
        out = subprocess.run([sys.executable, "-m", "triage_node.cli", "mode", "live", "--config",
                              str(node.config_path), "--by", "tester"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "LIVE" in out.stdout, out.stderr
        ds = pydicom.dcmread(SAMPLES[3])
        assert c_store(node.port, [ds]) == [0]
        node.wait_audit(lambda es: any(e["event"] == "sent" and e["sop_instance_uid"] == ds.SOPInstanceUID
                                       for e in es))
        assert {uid for _, uid, _ in peer.got} and len(lis.messages) == 1
        changed = [e for e in node.audit() if e["event"] == "mode_changed"]
        assert [(e["mode_from"], e["mode_to"], e["by"]) for e in changed] == [("shadow", "live", "tester")]
    finally:
        peer.server.shutdown()
        lis.close()


def _films(shift: bool) -> list[pydicom.Dataset]:
    """The samples re-encoded uncompressed with new UIDs; ``shift``: blurred (9 px box) and brightened (gamma 0.5)."""
    out = []
    for p in SAMPLES:
        ds = pydicom.dcmread(p)
        ds.decompress()  # Explicit VR Little Endian, the lossy-compression attributes kept as they were
        a = ds.pixel_array.astype(np.float64)
        if shift:
            k = 9
            c = np.pad(np.cumsum(np.cumsum(np.pad(a, k // 2, mode="edge"), 0), 1), ((1, 0), (1, 0)))
            h, w = a.shape
            a = np.clip((c[k:k + h, k:k + w] - c[:h, k:k + w] - c[k:k + h, :w] + c[:h, :w]) / (k * k), 0, 255)
            a = 255 * (a / 255) ** 0.5
        ds.PixelData = np.clip(a + 0.5, 0, 255).astype(np.uint8).tobytes()
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        out.append(ds)
    return out


def _fresh(films: list[pydicom.Dataset], n: int) -> list[pydicom.Dataset]:
    batch = []
    for i in range(n):
        ds = copy.deepcopy(films[i % len(films)])
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        batch.append(ds)
    return batch


def _stats(ds: pydicom.Dataset) -> dict:
    return filmstats.image_statistics(dicom_io.pixels(ds)) | filmstats.header_statistics(ds, read_age(ds).years)


WINDOW = 20


def test_input_drift_on_and_off_on_a_running_node(tmp_path, redis_url, make_node, chrome):  # noqa: F811
    normal, shifted = _films(False), _films(True)
    ref = build_reference_profile([_stats(d) for d in normal] * 8, source="the samples, uncompressed")
    (tmp_path / "profile.json").write_text(json.dumps(ref))
    node = make_node(redis_url, [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}],
                     outputs={"sc": False},
                     monitoring={"window_films": WINDOW, "min_films": WINDOW, "interval_s": 1.0,
                                 "reference_profile": str(tmp_path / "profile.json")})
    base = f"http://127.0.0.1:{node.cfg['web']['port']}/"

    def feed(films: list[pydicom.Dataset]) -> None:
        batch = _fresh(films, WINDOW)
        assert set(c_store(node.port, batch)) == {0}
        uids = {str(d.SOPInstanceUID) for d in batch}
        node.wait_audit(lambda es: uids <= {e.get("sop_instance_uid") for e in es if e["event"] == "analysed"},
                        timeout=400)

    def input_state(want: str, timeout: float = 60) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = metrics(node)
            if m[("triage_input_drift_state", ())] == {"ok": 0, "drift": 2}[want]:
                return m
            time.sleep(1)
        raise AssertionError(f"input drift state never {want}: {m}")

    feed(normal)
    m = input_state("ok")
    assert m[("triage_drift_window_films", ())] == WINDOW
    assert m[("triage_input_drift", (("statistic", "sharpness"),))] < 0.1

    feed(shifted)
    m = input_state("drift")
    band = {k[1][0][1]: v for k, v in m.items() if k[0] == "triage_input_drift_statistic_state"}
    # sharpness drifts; noise (the median Laplacian, which a 9 px box blur moves less at 256 px) leaves its stable
    # band and sits at watch or drift, near the small window's floor (20 films against 40)
    assert band["sharpness"] == 2 and band["noise"] >= 1, band
    for header in ("rows", "columns", "bits_stored", "transfer_syntax", "photometric", "view", "manufacturer",
                   "age_band"):
        assert band[header] == 0, (header, band)  # only the shifted statistics leave their band
    chrome.get(base)
    WebDriverWait(chrome, 60).until(
        lambda d: d.find_element("id", "input-state").get_attribute("data-state") == "drift")
    plot = chrome.find_element("css selector", '.plot[data-stat="sharpness"]')
    assert plot.get_attribute("data-band") == "drift" and plot.find_elements("css selector", "svg rect.win")
    assert chrome.find_element("css selector", '.plot[data-stat="rows"]').get_attribute("data-band") == "ok"
    assert not chrome.find_element("id", "shadow-banner").is_displayed()  # live
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    chrome.save_screenshot(str(ARTIFACTS / "dashboard_drift.png"))

    feed(normal)
    input_state("ok")
    chrome.refresh()
    WebDriverWait(chrome, 60).until(
        lambda d: d.find_element("id", "input-state").get_attribute("data-state") == "ok")
    def input_changes(es: list[dict]) -> list[tuple[str, str]]:
        return [(e["state_from"], e["state"]) for e in es if e["event"] == "drift_state" and e["kind"] == "input"]

    # the monitor evaluates every second: a window half normal, half shifted may pass through "watch" on the way
    entries = node.wait_audit(lambda es: input_changes(es)[-1:] == [("drift", "ok")]
                              or (input_changes(es)[-1:] == [("watch", "ok")]
                                  and "drift" in [s for _, s in input_changes(es)]))
    seq = input_changes(entries)
    states = ["ok"] + [to for _, to in seq]
    assert all(a == b for (a, _), b in zip(seq, states)) and all(a != b for a, b in seq), seq  # a chain of changes
    assert "drift" in states and states[-1] == "ok", seq
    assert "sharpness" in next(e for e in entries if e["event"] == "drift_state" and e["state"] == "drift")["detail"]
