"""Ops web server of `triage-node up` on real processes: Redis, Orthanc, Celery workers, headless Chromium.

The RSNA samples go through the node into Orthanc; one more instance is sent while Orthanc is down so it
dead-letters, one is not eligible. Then /metrics, /readyz, the JSON API and the dashboard (in Debian's chromium
driven by chromedriver) are checked, and the dead letter is replayed from the page into Orthanc.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pydicom
import pytest
from conftest import ARTIFACTS, SAMPLES, node_config, require, write_toml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import generate_uid
from pynetdicom import AE
from test_e2e import has_results

from triage_node.services import PrivateRedis, free_port, wait_port

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PATIENT = {"PatientName": "Webtest^Dashboard", "PatientBirthDate": "19321107"}


# -- helpers ---------------------------------------------------------------------------------------------------------
def http(url: str, auth: tuple[str, str] | None = None, method: str = "GET", headers: dict | None = None):
    """(status, body bytes) without raising on 4xx/5xx."""
    req = urllib.request.Request(url, method=method, headers=headers or {})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except urllib.error.URLError:  # not listening (yet / any more)
        return 0, b""


def wait_until(fn, timeout: float, what: str, interval: float = 0.5):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"{what} (last: {last!r})")


def ready(base: str, auth=None) -> dict | None:
    code, body = http(base + "readyz", auth)
    return json.loads(body) if code == 200 else None


def metrics(base: str, auth=None) -> tuple[str, dict]:
    code, body = http(base + "metrics", auth)
    assert code == 200, body
    text = body.decode()
    samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def total(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def c_store(port: int, datasets: list[pydicom.Dataset]) -> list[int]:
    ae = AE(ae_title="TESTSCU")
    for ctx in {(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets}:
        ae.add_requested_context(ctx[0], [ctx[1]])
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(d).Status) for d in datasets]
    finally:
        assoc.release()


def copy_with_new_uids(i: int) -> pydicom.Dataset:
    ds = pydicom.dcmread(SAMPLES[i])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    return ds


def flag_all_model(tmp_path) -> str:
    """The configured test model (TRIAGE_TEST_MODEL: untrained, demo or a package) with its gate threshold at 0:
    every analysed film is positive whatever the weights, so flagged-first ordering and thumbnails are deterministic."""
    from triage_node.inference.model import load_model, save_package, untrained_model
    from triage_node.pipeline import DEMO_MODEL

    path = os.environ.get("TRIAGE_TEST_MODEL", "")
    model = untrained_model() if path == "untrained" else load_model(path or DEMO_MODEL, device="cpu")
    model.threshold = 0.0
    return str(save_package(model, tmp_path / "flag-all-model"))


@pytest.fixture
def chrome(tmp_path):
    require("chromium", "chromedriver")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium fetch a browser or driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--window-size=1400,1600",
              f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver") or CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


# -- the whole story ---------------------------------------------------------------------------------------------------
def test_dashboard_metrics_health_and_replay(tmp_path, redis_url, orthanc_factory, make_node, chrome):
    pacs = orthanc_factory()
    dest = [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": pacs.dicom_port, "ae_title": "ORTHANC",
             "timeout": 3.0}]
    web_port = free_port()
    node = make_node(redis_url, dest, web={"port": web_port}, model={"path": flag_all_model(tmp_path)})
    base = f"http://127.0.0.1:{web_port}/"
    assert wait_port("127.0.0.1", web_port, 30), "web server did not start"
    assert http(base + "healthz")[0] == 200
    wait_until(lambda: ready(base), 120, "node never became ready")

    inputs = []
    for i in range(len(SAMPLES)):
        ds = pydicom.dcmread(SAMPLES[i])
        ds.PatientName, ds.PatientBirthDate = PATIENT["PatientName"], PATIENT["PatientBirthDate"]
        ds.AccessionNumber = f"WEBACC{i}"
        inputs.append(ds)
    skipped = copy_with_new_uids(1)
    skipped.Modality = "MR"
    assert c_store(node.port, inputs + [skipped]) == [0] * (len(inputs) + 1)
    n = len(inputs)
    entries = node.wait_audit(lambda es: sum(e["event"] == "sent" for e in es) >= n, timeout=600)

    # Orthanc goes away: the next result dead-letters (max_attempts=3 in conftest)
    pacs.stop()
    dead = copy_with_new_uids(2)
    dead.PatientName, dead.PatientBirthDate = PATIENT["PatientName"], PATIENT["PatientBirthDate"]
    dead.AccessionNumber = "WEBDEAD"
    inputs.append(dead)
    assert c_store(node.port, [dead]) == [0]
    dead_uid = str(dead.SOPInstanceUID)
    entries = node.wait_audit(lambda es: any(e["event"] == "dead_lettered" and e["sop_instance_uid"] == dead_uid
                                             for e in es), timeout=300)
    pacs.start()

    # -- /metrics: counters derived from the audit trail, Redis and the spool ----------------------------------------
    text, m = metrics(base)
    assert total(m, "triage_instances_received_total") == n + 1, "every eligible C-STORE counted once"
    assert total(m, "triage_results_sent_total") == n
    assert total(m, "triage_instances_analysed_total") == n + 1
    assert total(m, "triage_instances_skipped_total") == 1
    assert total(m, "triage_instances_skipped_total", reason="modality MR not processed") == 1
    assert total(m, "triage_results_dead_lettered_total") == 1
    retries = sum(e["event"] == "retry" for e in entries)
    assert retries >= 2 and total(m, "triage_send_failures_total", destination="pacs", event="retry") == retries
    assert total(m, "triage_send_failures_total", destination="pacs", event="dead_lettered") == 1
    assert total(m, "triage_stage_duration_seconds_count", stage="analyse") == n + 1
    assert total(m, "triage_stage_duration_seconds_count", stage="end_to_end") == n
    assert total(m, "triage_stage_duration_seconds_count", stage="sr_delivered") == n, "SR-first: SR latency"
    assert total(m, "triage_stage_duration_seconds_count", stage="receive") == n + 1
    assert total(m, "triage_stage_duration_seconds_bucket", stage="end_to_end", le="+Inf") == n
    assert total(m, "triage_queue_depth", queue="infer") == 0 and ("triage_queue_depth", (("queue", "report"),)) in m
    assert total(m, "triage_workers_online", role="infer") >= 1
    assert total(m, "triage_workers_online", role="report") >= 1
    assert total(m, "triage_dead_letters") == 1 and total(m, "triage_spool_bytes", area="dead_letter") > 0
    assert 0 < total(m, "triage_spool_disk_usage_ratio") < 1
    assert total(m, "triage_spool_disk_free_bytes") > 0 and total(m, "triage_spool_disk_reserve_bytes") == 0
    assert total(m, "triage_spool_disk_watermark_ratio") == 1.0  # the tests' unguarded spool (SPOOL_UNGUARDED)
    last = [e for e in entries if e["event"] == "analysed"][-1]
    assert m[("triage_model_info", (("hostname", last["hostname"]), ("version", last["model"])))] == 1

    # -- /readyz: all four checks pass -------------------------------------------------------------------------------
    r = ready(base)
    assert r and r["ready"] and set(r["checks"]) == {"receiver_listening", "broker_reachable", "spool_writable",
                                                       "model_loaded"}
    assert all(c["ok"] for c in r["checks"].values()), r

    # -- JSON API: flagged (sent + positive) first, thumbnails served downscaled ---------------------------------------
    code, body = http(base + "api/overview")
    ov = json.loads(body)
    positives = {e["sop_instance_uid"] for e in entries if e["event"] == "sent" and e.get("positive")}
    assert len(positives) == n, "gate threshold 0: every result is flagged"
    flags = [s["flagged"] for s in ov["studies"]]
    assert flags == sorted(flags, reverse=True), "flagged studies first"
    assert {s["sop_instance_uid"] for s in ov["studies"] if s["flagged"]} == positives
    by_uid = {s["sop_instance_uid"]: s for s in ov["studies"]}
    skipped_row = by_uid[str(skipped.SOPInstanceUID)]
    assert skipped_row["status"] == "skipped" and "modality MR" in skipped_row["reason"]
    assert by_uid[dead_uid]["status"] == "dead-lettered" and by_uid[dead_uid]["accession"] == "WEBDEAD"
    assert [d["sop_instance_uid"] for d in ov["dead_letters"]] == [dead_uid] and ov["dead_letters"][0]["replayable"]
    assert {w["role"] for w in ov["workers"]["workers"]} >= {"infer", "report"}
    assert ov["last_hour"]["latency_s"]["n"] == n and ov["last_hour"]["latency_s"]["p95"] > 0
    code, png = http(base + f"thumb/{inputs[0].SOPInstanceUID}.png")
    assert code == 200 and max(Image.open(io.BytesIO(png)).size) <= 256
    assert http(base + "thumb/..%2F..%2Fetc%2Fpasswd.png")[0] == 404

    # -- the dashboard in headless Chromium --------------------------------------------------------------------------
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chrome.get(base)
    wait = WebDriverWait(chrome, 60)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "body").get_attribute("data-updated"))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#studies tbody tr")) >= n + 2)
    rows = chrome.find_elements(By.CSS_SELECTOR, "#studies tbody tr")
    page_flags = [r.get_attribute("data-flagged") == "1" for r in rows]
    assert page_flags == sorted(page_flags, reverse=True), "flagged rows listed before the others"
    assert sum(page_flags) == n and rows[n].get_attribute("data-sop") == dead_uid, \
        "the newest row (dead-lettered, positive but not delivered) comes after every flagged result"
    assert {r.get_attribute("data-sop") for r in rows if r.get_attribute("data-flagged") == "1"} == positives
    # every flagged row (and every row with a result: with an untrained model nothing may be flagged) shows its
    # overlay thumbnail, loaded
    thumbs_ok = ("return [...document.querySelectorAll('#studies tbody tr')]"
                 ".filter(r => r.dataset.flagged === '1' || r.dataset.status.startsWith('sent')"
                 " || r.dataset.status === 'dead-lettered')"
                 ".map(r => { const i = r.querySelector('img.thumb');"
                 " return !!(i && i.complete && i.naturalWidth > 0); })")
    loaded = wait.until(lambda d: (lambda xs: xs if xs and all(xs) else None)(d.execute_script(thumbs_ok)))
    assert len(loaded) == n + 1
    assert "WEBACC0" in chrome.page_source and "WEBDEAD" in chrome.page_source
    # failures by stage: the sends retried while Orthanc was down, and the one dead letter
    cells = [c.text for c in chrome.find_elements(By.CSS_SELECTOR, '#failures tr[data-stage="send"] td')]
    assert cells == ["send", "0", str(retries), "1"], cells
    ARTIFACTS.mkdir(exist_ok=True)
    chrome.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    html = chrome.page_source
    # replay from the page: the dead letter disappears, the result arrives in Orthanc
    chrome.find_element(By.CSS_SELECTOR, f'#dead tr[data-sop="{dead_uid}"] button.replay').click()
    WebDriverWait(chrome, 120).until(lambda d: not d.find_elements(By.CSS_SELECTOR, f'#dead tr[data-sop="{dead_uid}"]'))
    assert "resent" in chrome.find_element(By.ID, "replay-msg").text
    pacs.wait_for(str(dead.StudyInstanceUID), has_results, timeout=60)
    assert not (tmp_path / "dead-letter" / dead_uid).exists()
    assert any(e["event"] == "replayed" and e["sop_instance_uid"] == dead_uid for e in node.audit())
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f'#studies tr[data-sop="{dead_uid}"]')
               .get_attribute("data-status") == "sent (replayed)")
    first = chrome.find_element(By.CSS_SELECTOR, "#studies tbody tr")
    assert first.get_attribute("data-sop") == dead_uid and first.get_attribute("data-flagged") == "1", \
        "once delivered, the replayed positive is the newest flagged study: listed first"
    _, m2 = metrics(base)
    assert total(m2, "triage_results_replayed_total") == 1 and total(m2, "triage_dead_letters") == 0
    # cross-site POSTs (no custom header) are refused
    assert http(base + f"api/replay/{dead_uid}", method="POST")[0] == 403

    # -- no patient demographics in what the web server shows -------------------------------------------------------
    text2 = metrics(base)[0]
    overview = http(base + "api/overview")[1].decode()
    shown = "\n".join([html, chrome.page_source, text, text2, overview, (tmp_path / "audit.jsonl").read_text()])
    for ds in inputs:
        for key in ("PatientName", "PatientID", "PatientBirthDate"):
            value = str(ds.get(key, "") or "")
            if len(value) >= 4:
                assert value not in shown, f"{key} of an input shown by the web server or audit"


def test_readyz_503_when_broker_stops_and_login_required(tmp_path, make_node):
    require("redis-server")
    redis = PrivateRedis(tmp_path / "own-redis", persist=False).start()
    try:
        dest = [{"name": "pacs", "kind": "dicom", "host": "127.0.0.1", "port": free_port(), "ae_title": "ORTHANC",
                 "timeout": 2.0}]
        web_port, secret = free_port(), "s3cret-Web-pass"
        node = make_node(redis.url, dest, web={"port": web_port, "username": "ops", "password": secret})
        base = f"http://127.0.0.1:{web_port}/"
        assert wait_port("127.0.0.1", web_port, 30), "web server did not start"
        r = wait_until(lambda: ready(base, ("ops", secret)), 120, "node never became ready")
        assert all(c["ok"] for c in r["checks"].values())
        assert ready(base) == {"ready": True}, "without login /readyz gives the verdict only"
        # login: everything but the probes needs it
        assert http(base + "metrics")[0] == 401 and http(base)[0] == 401 and http(base + "api/overview")[0] == 401
        assert http(base + "metrics", auth=("ops", "wrong"))[0] == 401
        assert http(base + "metrics", auth=("ops", secret))[0] == 200
        assert http(base, auth=("ops", secret))[0] == 200
        assert http(base + "healthz")[0] == 200
        redis.stop()
        code, body = wait_until(lambda: (lambda cb: cb if cb[0] == 503 else None)(http(base + "readyz")), 30,
                                "readyz stayed 200 after the broker stopped")
        assert json.loads(body) == {"ready": False}
        code, body = http(base + "readyz", ("ops", secret))
        r = json.loads(body)
        assert code == 503 and r["ready"] is False and r["checks"]["broker_reachable"]["ok"] is False
        assert r["checks"]["receiver_listening"]["ok"] and r["checks"]["spool_writable"]["ok"]
        assert http(base + "healthz")[0] == 200, "liveness does not depend on the broker"
        _, m = metrics(base, auth=("ops", secret))
        assert total(m, "triage_broker_up") == 0
    finally:
        redis.stop()
    node.stop()
    logs = [node.tmp / "node.log", *sorted((node.tmp / "log").glob("*.log"))]
    assert secret not in "\n".join(p.read_text(errors="replace") for p in logs if p.exists())


def test_up_refuses_web_beyond_loopback_without_password(tmp_path):
    cfg = node_config(tmp_path, free_port(), "", [], web={"bind": "0.0.0.0", "port": free_port()})
    cfg["destinations"] = [{"name": "pacs", "port": free_port()}]
    path = write_toml(tmp_path / "node.toml", cfg)
    out = subprocess.run([sys.executable, "-m", "triage_node.cli", "up", "--config", str(path)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "beyond loopback" in out.stderr and "password" in out.stderr
    assert not (tmp_path / "redis").exists(), "nothing started"
