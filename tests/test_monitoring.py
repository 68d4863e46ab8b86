"""Input statistics, reference profile, PSI, the drift window, the monitor's alerts, the site point, the mode switch.

Real pieces: the RSNA sample films decoded by dicom_io, a real audit trail written by ``Audit``, a real HTTP server
receiving the drift alert, the shared Redis for the mode switch.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pydicom
import pytest

from triage_node import config as config_mod
from triage_node import dicom_io
from triage_node.audit import Audit
from triage_node.audit import read as read_audit
from triage_node.inference import filmstats
from triage_node.inference.types import ModelInfo, Prediction
from triage_node.monitoring import drift, mode, profile, site
from triage_node.monitoring.monitor import Monitor, load_state
from triage_node.monitoring.stats import auc, wilson


@pytest.fixture(scope="module")
def film(sample_paths):
    ds = pydicom.dcmread(sample_paths[0])
    return ds, dicom_io.pixels(ds)


def box_blur(img: np.ndarray, k: int = 9) -> np.ndarray:
    pad = np.pad(img, k // 2, mode="edge")
    c = np.cumsum(np.cumsum(pad, 0), 1)
    c = np.pad(c, ((1, 0), (1, 0)))
    h, w = img.shape
    return ((c[k:k + h, k:k + w] - c[:h, k:k + w] - c[k:k + h, :w] + c[:h, :w]) / (k * k)).astype(np.float32)


def test_image_statistics_follow_the_pixels(film):
    _, img = film
    base = filmstats.image_statistics(img)
    blurred = filmstats.image_statistics(box_blur(img))
    brighter = filmstats.image_statistics(np.clip(img + 0.15, 0, 1))
    noisy = filmstats.image_statistics(np.clip(img + np.random.default_rng(0).normal(0, 0.05, img.shape), 0, 1)
                                       .astype(np.float32))
    assert blurred["sharpness"] < 0.5 * base["sharpness"] and blurred["noise"] < base["noise"]
    assert brighter["mean"] == pytest.approx(base["mean"] + 0.15, abs=0.03) and brighter["p50"] > base["p50"]
    assert brighter["saturated"] > base["saturated"]  # more pixels clipped at white
    assert noisy["noise"] > 2 * base["noise"]
    sub = img[::4, ::4]
    q = np.percentile(sub, (5, 25, 50, 75, 95))
    got = [base[k] for k in ("p05", "p25", "p50", "p75", "p95")]
    assert np.allclose(got, q, atol=1.5 / 4095)  # the histogram quantiles are the subsample's percentiles
    assert base["mean"] == pytest.approx(float(sub.mean()), abs=1e-6)
    assert base["std"] == pytest.approx(float(sub.std()), abs=1e-6)
    # the fast reduction equals the plain block mean
    f = 4
    plain = img[:1024, :1024].reshape(256, f, 256, f).mean((1, 3))
    assert np.allclose(filmstats.reduce_to(img), plain, atol=1e-6)


def test_image_statistics_are_cheap(film):
    _, img = film
    filmstats.image_statistics(img)
    best = float("inf")
    for _ in range(5):  # CPU time of this process, best of 5: a loaded host slows the wall clock, not this
        t = time.process_time()
        for _ in range(10):
            filmstats.image_statistics(img)
        best = min(best, (time.process_time() - t) / 10 * 1000)
    assert best < 8, best  # ~1.4 ms per 1024 px film; generous for a slow CI host


def test_header_statistics(film):
    ds, _ = film
    h = filmstats.header_statistics(ds, 45.0)
    assert h["rows"] == ds.Rows and h["columns"] == ds.Columns and h["age_band"] == "40-64"
    assert h["transfer_syntax"] == str(ds.file_meta.TransferSyntaxUID) and h["photometric"] == "MONOCHROME2"
    assert filmstats.header_statistics(ds, None)["age_band"] == "unknown"
    with pytest.raises(ValueError):
        filmstats.image_statistics(np.zeros((2, 2), np.float32))


def _stats(rng, n, shift=0.0, rows=1024.0, view="PA"):
    return [{"mean": 0.5 + shift + rng.normal(0, 0.05), "sharpness": 0.03 + rng.normal(0, 0.003), "rows": rows,
             "view": view, "pixel_spacing": float("nan")} for _ in range(n)]


def test_profile_and_psi():
    rng = np.random.default_rng(1)
    prof = profile.build_reference_profile(_stats(rng, 400), scores=rng.uniform(0, 1, 400), threshold=0.7,
                                           source="synthetic")
    json.dumps(prof)  # JSON as it is
    assert prof["films"] == 400 and prof["outputs"]["flagged_rate"] == pytest.approx(0.3, abs=0.06)
    m = prof["numeric"]["mean"]
    assert len(m["proportions"]) == len(m["edges"]) + 1 and m["proportions"][0] == 0 and m["proportions"][-1] == 0
    assert prof["numeric"]["pixel_spacing"]["missing"] == 1.0
    assert prof["categorical"]["view"] == {"PA": 1.0, "(other)": 0.0}
    rows = prof["numeric"]["rows"]  # a constant: one bin, below and above it the others
    assert rows["proportions"] == [0.0, 1.0, 0.0]

    def psi_of(stats, key):
        counts, _ = profile.numeric_shares(prof["numeric"][key], [s[key] for s in stats])
        return profile.psi(profile.reference_shares(prof["numeric"][key]), prof["films"], counts)

    same, moved = _stats(rng, 300), _stats(rng, 300, shift=0.1)
    assert psi_of(same, "mean") < 0.1
    assert psi_of(moved, "mean") > 0.25
    assert psi_of(_stats(rng, 300, rows=512.0), "rows") > 1.0  # resized films fall outside the reference
    with pytest.raises(ValueError):
        profile.build_reference_profile([])


def _cfg(tmp_path, **mon):
    cfg = config_mod.Config()
    return replace(cfg, audit_log=str(tmp_path / "audit.jsonl"),
                   spool=replace(cfg.spool, directory=str(tmp_path / "spool")),
                   model=replace(cfg.model, path="untrained", site_operating_point=str(tmp_path / "site.json")),
                   monitoring=replace(cfg.monitoring, reference_profile=str(tmp_path / "profile.json"), **mon))


def _record(audit, stats_list, positive_share=0.3, start=0):
    for i, s in enumerate(stats_list):
        pos = (i % 10) < positive_share * 10
        audit.record("analysed", sop_instance_uid=f"1.2.3.{start + i}", probability=0.9 if pos else 0.1,
                     positive=pos, model="m 1", stats=s)


def test_drift_window_states(tmp_path):
    rng = np.random.default_rng(2)
    cfg = _cfg(tmp_path, window_films=60, min_films=40)
    audit = Audit.from_config(cfg)
    assert drift.evaluate(cfg)["input"]["state"] == "no reference"  # never a crash without a profile
    ref = profile.build_reference_profile(_stats(rng, 500), scores=[0.9] * 150 + [0.1] * 350, threshold=0.5)
    (tmp_path / "profile.json").write_text(json.dumps(ref))
    _record(audit, _stats(rng, 20))
    r = drift.evaluate(cfg)
    assert r["input"]["state"] == "insufficient" and r["output"]["state"] == "insufficient"
    _record(audit, _stats(rng, 40), start=20)
    r = drift.evaluate(cfg)
    assert r["films"] == 60 and r["input"]["state"] == "ok", r["input"]
    assert r["output"]["state"] == "ok" and r["output"]["reference_flagged_rate"] == pytest.approx(0.3)
    _record(audit, _stats(rng, 60, shift=0.15), start=100, positive_share=0.8)  # brighter, and flagged more
    r = drift.evaluate(cfg)
    assert r["input"]["state"] == "drift" and r["input"]["drifted"] == ["mean"], r["input"]["drifted"]
    assert r["output"]["flagged_band"] == "drift" and r["output"]["state"] == "drift"
    _record(audit, _stats(rng, 60), start=200)  # normal films return: the window forgets the shifted ones
    r = drift.evaluate(cfg)
    assert r["input"]["state"] == "ok" and r["output"]["state"] == "ok"
    json.dumps(drift.jsonable(r), allow_nan=False)


class _Hook(BaseHTTPRequestHandler):
    bodies: list = []

    def do_POST(self):
        _Hook.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_monitor_alerts_once_per_state_change(tmp_path):
    srv = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Hook.bodies = []
    try:
        rng = np.random.default_rng(3)
        cfg = _cfg(tmp_path, window_films=50, min_films=30, alert_to=("ops",))
        cfg = replace(cfg, destinations=(config_mod.Destination(name="ops", kind="webhook",
                                                                url=f"http://127.0.0.1:{srv.server_port}/"),))
        (tmp_path / "profile.json").write_text(json.dumps(profile.build_reference_profile(
            _stats(rng, 500), scores=[0.9] * 150 + [0.1] * 350, threshold=0.5)))
        audit = Audit.from_config(cfg)
        mon = Monitor(cfg, audit)
        _record(audit, _stats(rng, 50))
        assert mon.check() == {"input": "ok", "output": "ok"} and not _Hook.bodies
        _record(audit, _stats(rng, 50, shift=0.2), start=50, positive_share=0.8)  # brighter, flagged more
        drift._cached.clear()
        assert mon.check() == {"input": "drift", "output": "drift"}
        drift._cached.clear()
        assert mon.check()["input"] == "drift"  # still drifting: no second alert
        assert sorted((b["kind"], b["state"]) for b in _Hook.bodies) == [("input", "drift"), ("output", "drift")]
        assert "mean" in next(b for b in _Hook.bodies if b["kind"] == "input")["detail"]
        assert "flagged rate 0.800 over 50 films against 0.300" in next(
            b for b in _Hook.bodies if b["kind"] == "output")["detail"]
        _record(audit, _stats(rng, 50), start=100)
        drift._cached.clear()
        assert mon.check() == {"input": "ok", "output": "ok"} and len(_Hook.bodies) == 4
        assert load_state(cfg) == {"input": "ok", "output": "ok"}
        changes = [(e["kind"], e["state_from"], e["state"], e["alerted"]) for e in read_audit(cfg.audit_log)
                   if e["event"] == "drift_state"]
        assert changes == [("input", "ok", "drift", ["ops"]), ("output", "ok", "drift", ["ops"]),
                           ("input", "drift", "ok", ["ops"]), ("output", "drift", "ok", ["ops"])]
    finally:
        srv.shutdown()


def test_alerts_by_hl7_and_fhir():
    from test_flags import MLLPListener

    from triage_node.monitoring.monitor import alert_body, send_alert

    lis = MLLPListener()
    srv = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _Hook.bodies = []
    try:
        report = {"input": {"films": 500, "drifted": ["sharpness"]}, "reference": "x"}
        body = alert_body("input", "ok", "drift", report)
        send_alert(config_mod.Destination(name="ris", kind="hl7", port=lis.port), body)
        assert "ORU^R01" in lis.messages[0] and "OBX|1|ST|DRIFT^Drift state^L||drift" in lis.messages[0]
        assert "sharpness" in lis.messages[0] and "PID" not in lis.messages[0]  # about the node, no patient
        send_alert(config_mod.Destination(name="fhir", kind="fhir", url=f"http://127.0.0.1:{srv.server_port}/"),
                   body)
        issue = _Hook.bodies[0]["entry"][0]["resource"]
        assert issue["resourceType"] == "DetectedIssue" and issue["severity"] == "high"
        with pytest.raises(ValueError):
            send_alert(config_mod.Destination(name="pacs", kind="dicom"), body)
    finally:
        lis.close()
        srv.shutdown()


def _pred(p: float, op: str = "adult") -> Prediction:
    return Prediction(p, 0.5, (), ModelInfo("m", "1"), operating_point=op)


def test_site_point_applies_to_its_package_and_point(tmp_path):
    cfg = _cfg(tmp_path)
    assert site.apply_site_point(cfg, _pred(0.4)) == _pred(0.4)  # no file: unchanged
    site.write_site_point(cfg, 0.3, "adult", "rule", {"n": 10}, by="tester", when="2026-12-07T17:00:00Z")
    got = site.apply_site_point(cfg, _pred(0.4))
    assert got.threshold == 0.3 and got.positive and got.operating_point == "site 2026-12-07T17:00:00Z"
    assert site.apply_site_point(cfg, _pred(0.4, "pediatric")).threshold == 0.5  # another point: unchanged
    doc = json.loads((tmp_path / "site.json").read_text())
    doc["package_sha256"] = "0" * 64  # calibrated for another package
    (tmp_path / "site.json").write_text(json.dumps(doc))
    assert site.apply_site_point(cfg, _pred(0.4)).threshold == 0.5


def test_mode_switch_through_the_broker(tmp_path, redis_url):
    cfg = _cfg(tmp_path)
    cfg = replace(cfg, broker=replace(cfg.broker, url=redis_url))
    audit = Audit.from_config(cfg)
    assert mode.current(cfg) == ("live", "config")
    assert mode.set_mode(cfg, "shadow", audit, who="tester") == "shadow"
    assert mode.current(cfg) == ("shadow", "runtime")
    assert mode.set_mode(cfg, "default", audit, who="tester") == "live"
    lines = [e for e in read_audit(cfg.audit_log) if e["event"] == "mode_changed"]
    assert [(e["mode_from"], e["mode_to"], e["by"]) for e in lines] == [("live", "shadow", "tester"),
                                                                        ("shadow", "live", "tester")]
    with pytest.raises(ValueError):
        config_mod.OutputConfig(mode="dark")


def test_stats_helpers():
    assert auc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.1]) == pytest.approx(0.75)
    assert auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)


def test_status_says_mode_and_drift(tmp_path):
    from triage_node.spool import Spool
    from triage_node.status import summarise

    rng = np.random.default_rng(4)
    cfg = _cfg(tmp_path, window_films=50, min_films=30)
    cfg = replace(cfg, outputs=replace(cfg.outputs, mode="shadow"))
    (tmp_path / "profile.json").write_text(json.dumps(profile.build_reference_profile(
        _stats(rng, 500), scores=[0.9] * 150 + [0.1] * 350, threshold=0.5)))
    _record(Audit.from_config(cfg), _stats(rng, 50, shift=0.2))
    text = summarise(cfg, Spool.from_config(cfg))
    assert text.startswith("MODE: SHADOW (config)") and "NOTHING is sent" in text
    assert "INPUT DRIFT: DRIFT (mean)" in text and "mean: PSI" in text
    assert "OUTPUT DRIFT: OK: flagged 15/50 = 0.300" in text and "vs 0.300 on validation" in text


def test_monitor_web_and_validate_paths_do_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys, triage_node.cli, triage_node.monitoring.monitor, triage_node.web.monitoring, "
            "triage_node.status, triage_node.validate.cli, triage_node.monitoring.site_cli;"
            "from triage_node import config; from triage_node.monitoring import drift;"
            f"from dataclasses import replace; c = config.Config(); c = replace(c, audit_log={str(tmp_path / 'a')!r});"
            "drift.evaluate(c); print('torch' in sys.modules, 'matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


def test_a_profile_of_another_package_is_refused(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "model.json").write_text(json.dumps({"name": "cxr", "version": "2.0"}))
    rng = np.random.default_rng(5)
    (pkg / "reference_profile.json").write_text(json.dumps(profile.build_reference_profile(
        _stats(rng, 50), package="cxr 1.0")))
    prof, why = profile.load_reference_profile(pkg)
    assert prof is None and "is for cxr 1.0, not cxr 2.0" in why
    (pkg / "reference_profile.json").write_text(json.dumps(profile.build_reference_profile(
        _stats(rng, 50), package="cxr 2.0")))
    prof, why = profile.load_reference_profile(pkg)
    assert prof is not None and why.endswith("reference_profile.json")
    (pkg / "reference_profile.json").unlink()
    assert profile.load_reference_profile(pkg) == (None, "no reference profile in the model package")
