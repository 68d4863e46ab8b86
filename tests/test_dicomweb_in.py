"""DICOMweb ingest: STOW-RS into the node (dicomweb-client and Orthanc as real STOW clients, auth), and the
QIDO-RS/WADO-RS pull mode against a real Orthanc: restarted and killed mid-way (nothing lost, nothing twice), and
instances that reach the PACS after their Study Date was polled (fetched once)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import date, timedelta

import pydicom
import pytest
import redis
import requests
from conftest import ROOT, SAMPLES
from dicomweb_client.api import DICOMwebClient

from triage_node import config
from triage_node.audit import Audit, read
from triage_node.cli import _submitter
from triage_node.ingest import Ingest
from triage_node.services import free_port
from triage_node.spool import Spool
from triage_node.transport.dicomweb_in import Puller, start_stow

pytestmark = pytest.mark.integration


@pytest.fixture
def gate(tmp_path, redis_url):
    cfg = config.Config(spool=config.SpoolConfig(directory=str(tmp_path / "spool")),
                        broker=config.BrokerConfig(url=redis_url),
                        retry=config.RetryConfig(dead_letter_dir=str(tmp_path / "dead")),
                        audit_log=str(tmp_path / "audit.jsonl"))
    spool = Spool(cfg.spool.directory, cfg.retry.dead_letter_dir)
    return cfg, spool, Ingest(cfg, spool, _submitter(cfg), Audit(cfg.audit_log))


def queued(url: str) -> int:
    return redis.Redis.from_url(url).llen("infer")


def test_stow_rs_into_the_node_with_auth(gate, redis_url):
    cfg, spool, ingest = gate
    srv = start_stow(config.DicomwebIngestConfig(enabled=True, port=0, username="pacs", password="pw"), ingest)
    base = f"http://127.0.0.1:{srv.server_port}"
    try:
        ok = requests.Session()
        ok.auth = ("pacs", "pw")
        client = DICOMwebClient(url=base, session=ok)
        client.set_http_retry_params(retry=False)
        datasets = [pydicom.dcmread(p) for p in SAMPLES[:2]]
        client.store_instances(datasets)
        assert {p.stem for p in spool.pending()} == {str(d.SOPInstanceUID) for d in datasets}
        assert queued(redis_url) == 2
        # wrong password: 401, nothing stored
        bad = DICOMwebClient(url=base, session=requests.Session())
        bad.set_http_retry_params(retry=False)
        with pytest.raises(requests.HTTPError) as err:
            bad.store_instances([pydicom.dcmread(SAMPLES[2])])
        assert err.value.response.status_code == 401 and queued(redis_url) == 2
        # one good, one refused (invalid UID): 202 with the failure reason per instance
        good = pydicom.dcmread(SAMPLES[2])
        broken = pydicom.dcmread(SAMPLES[3])
        broken.SOPInstanceUID = broken.file_meta.MediaStorageSOPInstanceUID = "1.2.3/../x"
        boundary = "XBOUNDARY"
        parts = b""
        for d in (good, broken):
            import io

            buf = io.BytesIO()
            d.save_as(buf, enforce_file_format=True)
            parts += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + buf.getvalue() + b"\r\n"
        parts += f"--{boundary}--\r\n".encode()
        r = ok.post(f"{base}/studies", data=parts, headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        assert r.status_code == 202
        body = r.json()
        assert body["00081199"]["Value"][0]["00081155"]["Value"] == [str(good.SOPInstanceUID)]
        assert body["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
        assert any(e["event"] == "refused" and e["channel"] == "stow-rs" for e in read(cfg.audit_log))
    finally:
        srv.shutdown()


def test_orthanc_pushes_by_stow_rs(gate, redis_url, orthanc_factory):
    cfg, spool, ingest = gate
    port = free_port()
    srv = start_stow(config.DicomwebIngestConfig(enabled=True, port=port, token="tok"), ingest)
    try:
        from triage_node.localpacs import LocalOrthanc

        pacs = orthanc_factory()
        pacs.stop()
        pacs = LocalOrthanc(pacs.dir.parent / "orthanc-stow", dicomweb_servers={
            "triage": {"Url": f"http://127.0.0.1:{port}/", "HttpHeaders": {"Authorization": "Bearer tok"}}}).start()
        try:
            ids = [pacs.upload(p)["ID"] for p in SAMPLES[:3]]
            r = requests.post(f"{pacs.url}/dicom-web/servers/triage/stow",
                              json={"Resources": ids, "Synchronous": True}, timeout=60)
            assert r.status_code == 200, r.text
        finally:
            pacs.stop()
        assert len(spool.pending()) == 3 and queued(redis_url) == 3
    finally:
        srv.shutdown()


def test_pull_mode_restart_midway_loses_and_duplicates_nothing(gate, redis_url, orthanc_factory, tmp_path):
    cfg, spool, ingest = gate
    pacs = orthanc_factory()
    for p in SAMPLES:
        pacs.upload(p)
    not_cxr = pydicom.dcmread(SAMPLES[0])
    not_cxr.Modality = "MR"
    not_cxr.SOPInstanceUID = not_cxr.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    not_cxr.SeriesInstanceUID = pydicom.uid.generate_uid()
    f = tmp_path / "mr.dcm"
    not_cxr.save_as(f)
    pacs.upload(f)
    pull = config.PullConfig(url=pacs.dicomweb_url, since="19000101", max_per_poll=2, interval_s=0.1)
    state = tmp_path / "pull.sqlite"
    assert Puller(pull, ingest, state).poll_once() == 2
    # the node restarts: a new Puller on the same state file continues where the first stopped
    p2 = Puller(pull, ingest, state)
    total = 2
    while (n := p2.poll_once()):
        total += n
    assert total == len(SAMPLES)
    assert Puller(pull, ingest, state).poll_once() == 0, "nothing fetched twice across restarts"
    assert queued(redis_url) == len(SAMPLES) and len(spool.pending()) == len(SAMPLES)
    received = [e for e in read(cfg.audit_log) if e["event"] == "received"]
    assert sorted(e["sop_instance_uid"] for e in received) == sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in SAMPLES)
    assert all(e["channel"] == "wado-rs-pull" for e in received)


# -- late arrivals: the pull cannot miss an instance whatever its Study Date ----------------------------------------
def _days_ago(k: int) -> str:
    return (date.today() - timedelta(days=k)).strftime("%Y%m%d")


def _put(pacs, tmp_path, i: int, study_date: str | None) -> str:
    """A copy of sample ``i`` with fresh UIDs and the given StudyDate (None: no StudyDate at all) into Orthanc."""
    ds = pydicom.dcmread(SAMPLES[i % len(SAMPLES)])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    if study_date is None:
        del ds.StudyDate
    else:
        ds.StudyDate = study_date
    f = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(f)
    pacs.upload(f)
    return str(ds.SOPInstanceUID)


def _queued_once(audit_log: str) -> Counter:
    """SOP -> how many times the gate queued it (``received`` lines without ``duplicate``)."""
    return Counter(e["sop_instance_uid"] for e in read(audit_log)
                   if e["event"] == "received" and not e.get("duplicate"))


def test_pull_fetches_late_arrivals_for_passed_dates_exactly_once(gate, redis_url, orthanc_factory, tmp_path):
    cfg, spool, ingest = gate
    pacs = orthanc_factory()
    already = [_put(pacs, tmp_path, 0, _days_ago(30)), _put(pacs, tmp_path, 1, None)]  # in the archive before
    recent = _put(pacs, tmp_path, 2, _days_ago(1))
    pull = config.PullConfig(url=pacs.dicomweb_url, lookback_days=2, sweep_interval_s=0, max_per_poll=100)
    puller = Puller(pull, ingest, tmp_path / "pull.sqlite")
    assert puller.poll_once() == 1, "the window fetches yesterday's film"
    assert puller.state.count("baseline") == 2, "what the archive held outside the window is the baseline"
    # instances that reach the PACS after their date was polled: in the window, long before it, without a date
    late = [_put(pacs, tmp_path, 3, _days_ago(1)), _put(pacs, tmp_path, 4, _days_ago(10)),
            _put(pacs, tmp_path, 0, None), _put(pacs, tmp_path, 1, _days_ago(400))]
    assert puller.poll_once() == 4
    assert puller.poll_once() == 0 and Puller(pull, ingest, tmp_path / "pull.sqlite").poll_once() == 0
    assert _queued_once(cfg.audit_log) == Counter({sop: 1 for sop in [recent, *late]})
    assert queued(redis_url) == 5 and {p.stem for p in spool.pending()} == {recent, *late}
    assert not set(already) & {p.stem for p in spool.pending()}


def test_pull_window_alone_catches_a_late_film_for_a_polled_date(gate, redis_url, orthanc_factory, tmp_path):
    """Between sweeps (sweep_interval_s of an hour) the window re-reads recent dates: a late film of yesterday
    is fetched on the next poll, and once."""
    cfg, spool, ingest = gate
    pacs = orthanc_factory()
    first = _put(pacs, tmp_path, 0, _days_ago(1))
    pull = config.PullConfig(url=pacs.dicomweb_url, lookback_days=2, sweep_interval_s=3600, max_per_poll=100)
    puller = Puller(pull, ingest, tmp_path / "pull.sqlite")
    assert puller.poll_once() == 1
    late = _put(pacs, tmp_path, 1, _days_ago(1))
    assert puller.poll_once() == 1 and puller.poll_once() == 0
    assert _queued_once(cfg.audit_log) == Counter({first: 1, late: 1})


PULL_CHILD = """
import sys
from pathlib import Path
from triage_node import config
from triage_node.audit import Audit
from triage_node.cli import _submitter
from triage_node.ingest import Ingest
from triage_node.spool import Spool
from triage_node.transport.dicomweb_in import Puller
url, spool_dir, dead, audit_log, redis_url, state = sys.argv[1:7]
cfg = config.Config(spool=config.SpoolConfig(directory=spool_dir), broker=config.BrokerConfig(url=redis_url),
                    retry=config.RetryConfig(dead_letter_dir=dead), audit_log=audit_log)
spool = Spool(spool_dir, dead)
ingest = Ingest(cfg, spool, _submitter(cfg), Audit(audit_log))
p = Puller(config.PullConfig(url=url, since="20000101", max_per_poll=1, sweep_interval_s=0), ingest, Path(state))
while True:
    p.poll_once()
"""


def test_pull_killed_midway_and_restarted_misses_nothing_twice(gate, redis_url, orthanc_factory, tmp_path):
    """The puller runs in its own process and is SIGKILLed mid-way (wherever it is: retrieving, spooling,
    queueing, committing the seen-set), then restarted on the same state."""
    cfg, spool, ingest = gate
    pacs = orthanc_factory()
    sops = [_put(pacs, tmp_path, i, _days_ago(3 * i)) for i in range(12)]
    state = tmp_path / "pull.sqlite"
    argv = [sys.executable, "-c", PULL_CHILD, pacs.dicomweb_url, cfg.spool.directory, cfg.retry.dead_letter_dir,
            cfg.audit_log, redis_url, str(state)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(argv, env=env)
    try:
        deadline = time.time() + 120
        while sum(_queued_once(cfg.audit_log).values()) < 4 and time.time() < deadline:
            assert child.poll() is None
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
        before = sum(_queued_once(cfg.audit_log).values())
        assert 4 <= before < len(sops), "killed mid-way"
        child = subprocess.Popen(argv, env=env)  # the node restarts
        deadline = time.time() + 120
        while {p.stem for p in spool.pending()} != set(sops) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # let it poll a few more times: nothing may come twice
    finally:
        child.kill()
        child.wait()
    assert {p.stem for p in spool.pending()} == set(sops), "nothing missed"
    once = _queued_once(cfg.audit_log)
    assert max(once.values()) == 1, f"queued twice: {[s for s, n in once.items() if n > 1]}"
    assert queued(redis_url) == sum(once.values())
    # a kill between spooling and queueing leaves one spooled, unqueued instance: the node's reconcile queues it
    assert len(once) >= len(sops) - 1
    assert Puller(config.PullConfig(url=pacs.dicomweb_url, since="20000101", sweep_interval_s=0), ingest,
                  state).poll_once() == 0


def test_pull_gives_up_on_an_instance_that_cannot_be_retrieved_and_audits_it(gate, orthanc_factory, tmp_path):
    """A PACS that lists an instance but answers 404 to its retrieval (deleted after the query): retried on the next
    polls, then given up with an audit line; the other instances are not held up."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    cfg, spool, ingest = gate
    pacs = orthanc_factory()
    good, gone = _put(pacs, tmp_path, 0, _days_ago(1)), _put(pacs, tmp_path, 1, _days_ago(1))

    class Proxy(BaseHTTPRequestHandler):  # the PACS, except that `gone` cannot be retrieved any more
        def do_GET(self):
            if gone in self.path and "/instances/" in self.path:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            r = requests.get(pacs.dicomweb_url.rstrip("/") + self.path, headers={
                "Accept": self.headers.get("Accept", "*/*")}, timeout=60)
            self.send_response(r.status_code)
            self.send_header("Content-Type", r.headers.get("Content-Type", "application/octet-stream"))
            self.send_header("Content-Length", str(len(r.content)))
            self.end_headers()
            self.wfile.write(r.content)

        def log_message(self, *args):
            pass

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        pull = config.PullConfig(url=f"http://127.0.0.1:{proxy.server_port}", lookback_days=2, sweep_interval_s=3600)
        puller = Puller(pull, ingest, tmp_path / "pull.sqlite")
        assert puller.poll_once() == 1, "the good one is fetched although the other fails"
        for _ in range(4):
            assert puller.poll_once() == 0
        assert puller.state.count("gave_up") == 1 and puller.state.seen(gone)
        failed = [e for e in read(cfg.audit_log) if e["event"] == "failed"]
        assert [(e["sop_instance_uid"], e["stage"]) for e in failed] == [(gone, "pull")]
        assert "retrieve failed 5 times" in failed[0]["reason"]
        assert puller.poll_once() == 0, "given up: not retried"
        assert sum(e["event"] == "failed" for e in read(cfg.audit_log)) == 1
        assert _queued_once(cfg.audit_log) == Counter({good: 1})
    finally:
        proxy.shutdown()
