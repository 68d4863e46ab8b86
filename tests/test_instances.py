"""Instances reach workers without a shared filesystem: the receiver serves its spool over HTTP (bearer token), the
tasks carry ``source_url``, workers fetch into their own spool and release (or dead-letter) at the receiver.

Real peers throughout: the HTTP server on loopback, a private redis-server, ``triage-node serve`` and Celery worker
processes in different working directories with different spool, audit and dead-letter folders. The spool path in
each task is relative (``var/spool/instances/<uid>.dcm``), so from the workers' directory it names their own, empty
spool: they can only get the bytes over HTTP, as on another host.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from http.server import HTTPServer, SimpleHTTPRequestHandler
from pathlib import Path
from threading import Thread

import pydicom
import pytest
import redis as redis_lib
from conftest import SAMPLES, SPOOL_UNGUARDED, c_store, write_toml
from pydicom.uid import generate_uid

from triage_node import config
from triage_node.audit import Audit, read
from triage_node.enqueue import make_submitter
from triage_node.errors import InstanceUnavailable
from triage_node.services import free_port, wait_port
from triage_node.spool import Spool
from triage_node.transport.instances import InstanceServer, fetch, release

TOKEN = "s3cret-token-for-tests"
SOP = "1.2.826.0.1.3680043.8.498.4242"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture
def served(tmp_path):
    spool = Spool(tmp_path / "recv" / "spool", tmp_path / "recv" / "dead")
    cfg = config.InstancesConfig(url="http://127.0.0.1:1", bind="127.0.0.1", port=free_port(), token=TOKEN,
                                 timeout_s=5, attempts=2)
    srv = InstanceServer(cfg, spool, Audit(tmp_path / "recv" / "audit.jsonl")).start()
    yield spool, replace(cfg, url=f"http://127.0.0.1:{srv.port}"), tmp_path
    srv.stop()


def _get(url: str, token: str | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_server_refuses_without_the_token_and_accepts_only_uids(served):
    spool, cfg, _ = served
    spool.store(SOP, b"DICM-bytes")
    url = f"{cfg.url}/instances/{SOP}.dcm"
    code, headers, _ = _get(url)
    assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert _get(url, "wrong-token")[0] == 403
    assert _get(url, TOKEN[:-1])[0] == 403, "a prefix of the token is not the token"
    assert _get(f"{cfg.url}/instances/{SOP}", "wrong-token", method="DELETE")[0] == 403
    assert spool.instance_path(SOP).exists(), "a refused DELETE drops nothing"
    for bad in ("..%2F..%2Fetc%2Fpasswd", "1.02.3", "1.2.x", "a" * 70):
        assert _get(f"{cfg.url}/instances/{bad}.dcm", TOKEN)[0] == 400, bad
    assert _get(f"{cfg.url}/instances/../node.toml", TOKEN)[0] in (400, 404)
    code, headers, _ = _get(f"{cfg.url}/instances/1.2.3.4.dcm", TOKEN)
    assert code == 404 and headers["X-Triage-Instances"] == "unknown"
    code, headers, body = _get(url, TOKEN)
    assert code == 200 and body == b"DICM-bytes" and headers["Content-Type"] == "application/dicom"
    assert _get(f"{cfg.url}/instances/{SOP}.dcm", TOKEN, method="DELETE")[0] == 405


def test_fetch_then_release_drops_the_spool_copy(served):
    spool, cfg, tmp = served
    data = SAMPLES[0].read_bytes()
    spool.store(SOP, data)
    dest = tmp / "worker" / "fetched" / f"{SOP}.dcm"
    assert fetch(cfg.url, SOP, dest, cfg) == len(data)
    assert dest.read_bytes() == data and not [p for p in dest.parent.iterdir() if p.name.startswith(".tmp-")]
    assert spool.instance_path(SOP).exists(), "fetching does not finish the instance"
    assert release(cfg.url, SOP, cfg, worker="w1") is True
    assert not spool.instance_path(SOP).exists() and spool.attempts(SOP) == {}
    assert fetch(cfg.url, SOP, tmp / "again.dcm", cfg) is None, "finished: the task is a no-op"
    assert release(cfg.url, SOP, cfg) is True, "releasing twice (a duplicate task) is fine"
    events = [(e["event"], e.get("outcome"), e.get("worker")) for e in read(tmp / "recv" / "audit.jsonl")]
    assert events == [("released", "done", "w1")]

    with pytest.raises(InstanceUnavailable, match="HTTP 403"):
        fetch(cfg.url, SOP, dest, replace(cfg, token="wrong"))


def test_dead_letter_at_the_worker_moves_the_receivers_copy_to_its_dead_letters(served):
    spool, cfg, tmp = served
    spool.store(SOP, b"DICM-bytes")
    assert release(cfg.url, SOP, cfg, worker="w2",
                   dead_letter={"reason": "send: pacs refused", "stage": "send", "path": "/w/dead/x"}) is True
    assert not spool.instance_path(SOP).exists()
    (info,) = spool.dead_letters()
    assert info["reason"] == "send: pacs refused" and info["stage"] == "send" and info["worker"] == "w2"
    assert info["worker_path"] == "/w/dead/x" and (Path(info["path"]) / "source.dcm").read_bytes() == b"DICM-bytes"


def test_a_404_from_something_else_is_not_taken_for_finished(tmp_path):
    """A misconfigured URL (another web server) answers 404 too; only our server's marked 404 means finished."""
    srv = HTTPServer(("127.0.0.1", 0), lambda *a: SimpleHTTPRequestHandler(*a, directory=str(tmp_path)))
    Thread(target=srv.serve_forever, daemon=True).start()
    try:
        cfg = config.InstancesConfig(token=TOKEN, attempts=1, timeout_s=5)
        with pytest.raises(InstanceUnavailable, match="HTTP 404"):
            fetch(f"http://127.0.0.1:{srv.server_port}", SOP, tmp_path / "x.dcm", cfg)
        assert release(f"http://127.0.0.1:{srv.server_port}", SOP, cfg) is False
    finally:
        srv.shutdown()
        srv.server_close()
    dead = config.InstancesConfig(token=TOKEN, attempts=2, timeout_s=2)
    t0 = time.time()
    with pytest.raises(InstanceUnavailable, match="instance server unavailable: ConnectionRefusedError"):
        fetch(f"http://127.0.0.1:{free_port()}", SOP, tmp_path / "x.dcm", dead)
    assert time.time() - t0 < 5, "bounded tries, then the task's own retry takes over"


def test_config_needs_a_token_and_env_sets_every_key():
    with pytest.raises(ValueError, match="token"):
        config.InstancesConfig(url="http://receiver:8490")
    with pytest.raises(ValueError, match="http"):
        config.InstancesConfig(url="receiver:8490", token="t")
    cfg = config.load(env={"TRIAGE_INSTANCES_URL": "http://recv:8490", "TRIAGE_INSTANCES_TOKEN": "t",
                           "TRIAGE_INSTANCES_BIND": "0.0.0.0", "TRIAGE_INSTANCES_PORT": "8491",
                           "TRIAGE_DEAD_LETTER_DIR": "/data/dead", "TRIAGE_AUDIT_LOG": "/data/audit.jsonl",
                           "TRIAGE_ARCHIVE_DIR": "", "TRIAGE_SPOOL_DIR": "/data/spool"})
    assert (cfg.instances.url, cfg.instances.token, cfg.instances.bind, cfg.instances.port) == (
        "http://recv:8490", "t", "0.0.0.0", 8491)
    assert cfg.retry.dead_letter_dir == "/data/dead" and cfg.audit_log == "/data/audit.jsonl"
    assert cfg.outputs.archive_dir == "var/results", "an empty variable overrides nothing"


def _queued_payloads(url: str) -> list[dict]:
    client = redis_lib.Redis.from_url(url)
    return [json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0] for raw in client.lrange("infer", 0, -1)]


def test_both_submit_paths_and_reconcile_carry_source_url(tmp_path, redis_url):
    from triage_node.cli import reconcile

    cfg = config.Config(broker=config.BrokerConfig(url=redis_url), audit_log=str(tmp_path / "audit.jsonl"),
                        instances=config.InstancesConfig(url="http://recv:8490/", token=TOKEN))
    make_submitter(cfg)("var/spool/instances/1.2.3.dcm", "1.2.3", 1.0)  # the receiver's direct LPUSH
    spool = Spool(tmp_path / "spool", tmp_path / "dead")
    spool.store("1.2.4", b"x")
    assert reconcile(cfg, spool, make_submitter(cfg), older_than_s=0) == 1
    from triage_node.queue import make_app, submit

    submit(make_app(cfg), "p", "1.2.5", 1.0, **{"source_url": "http://recv:8490"})  # what non-Redis brokers use
    payloads = _queued_payloads(redis_url)
    assert sorted(p["sop_instance_uid"] for p in payloads) == ["1.2.3", "1.2.4", "1.2.5"]
    assert {p["source_url"] for p in payloads} == {"http://recv:8490"}
    plain = replace(cfg, instances=config.InstancesConfig())
    redis_lib.Redis.from_url(redis_url).delete("infer")
    make_submitter(plain)("p", "1.2.6", 1.0)
    assert "source_url" not in _queued_payloads(redis_url)[0], "single host: the task is as before"


# -- end to end: receiver and workers with nothing on disk in common ---------------------------------------------------
class Split:
    """``triage-node serve`` in recv/ and two Celery workers in work/: separate spool, audit, dead letters."""

    def __init__(self, tmp: Path, broker: str, advertised_port: int | None = None,
                 visibility_timeout: int = 60) -> None:
        self.tmp, self.broker = tmp, broker
        self.recv, self.work, self.out = tmp / "recv", tmp / "work", tmp / "pacs-folder"
        for d in (self.recv, self.work):
            d.mkdir()
        self.port, self.http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{advertised_port or self.http_port}"
        common = {"log_level": "INFO", "audit_log": "var/audit.jsonl",
                  # relative: the same words name different folders
                  "spool": {"directory": "var/spool", **SPOOL_UNGUARDED},
                  "broker": {"url": broker, "visibility_timeout": visibility_timeout},
                  "retry": {"max_attempts": 3, "backoff_base_s": 0.2, "backoff_max_s": 1.0,
                            "dead_letter_dir": "var/dead-letter"},
                  "model": {"path": os.environ.get("TRIAGE_TEST_MODEL", "")},
                  "outputs": {"sr": True, "sc": True, "gsps": False, "archive_dir": ""},
                  "destinations": [{"name": "folder", "kind": "folder", "path": str(self.out)}],
                  "web": {"enabled": False}}
        write_toml(self.recv / "node.toml", {
            **common, "receiver": {"ae_title": "TRIAGE", "port": self.port, "allowed_calling_aets": ["TESTSCU"]},
            "instances": {"url": self.url, "bind": "127.0.0.1", "port": self.http_port, "token": TOKEN}})
        # the workers get the token from the environment, as a container would
        write_toml(self.work / "node.toml", {**common, "instances": {"timeout_s": 5.0, "attempts": 2}})
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, cwd: Path, args: list[str], name: str, **env: str) -> None:
        log = open(self.tmp / f"{name}.log", "ab")
        self.procs.append(subprocess.Popen(args, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, "TRIAGE_CONFIG": str(cwd / "node.toml"), **env},
                                           start_new_session=True))

    def worker(self, queue: str, cwd: Path, name: str) -> subprocess.Popen:
        pool = "prefork" if queue == "infer" else "threads"
        self._spawn(cwd, [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", queue,
                          "-n", f"{name}@%h", f"--pool={pool}", "--concurrency=1",
                          "--without-gossip", "--without-mingle", "--loglevel=INFO"],
                    f"worker-{name}", TRIAGE_INSTANCES_TOKEN=TOKEN)
        return self.procs[-1]

    def start(self) -> Split:
        self._spawn(self.recv, [sys.executable, "-m", "triage_node.cli", "serve", "--config", "node.toml"], "recv")
        self.infer = self.worker("infer", self.work, "infer-split")
        self.worker("report", self.work, "report-split")
        assert wait_port("127.0.0.1", self.port, 60) and wait_port("127.0.0.1", self.http_port, 10), self.logs()
        return self

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-2500:]}"
                         for f in sorted(self.tmp.glob("*.log")))

    def audit(self, side: str | Path) -> list[dict]:
        return read((getattr(self, side) if isinstance(side, str) else side) / "var" / "audit.jsonl")

    def wait(self, predicate, timeout: float = 240.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.3)
        raise TimeoutError("condition not met\nworker audit: " + repr(self.audit("work")[-6:]) + "\n" + self.logs())


def unique_instances(n: int) -> list[pydicom.Dataset]:
    out = []
    for i in range(n):
        ds = pydicom.dcmread(SAMPLES[i % len(SAMPLES)])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        out.append(ds)
    return out


@pytest.fixture
def split(tmp_path, redis_url):
    made: list[Split] = []

    def factory(**kw) -> Split:
        made.append(Split(tmp_path, redis_url, **kw).start())
        return made[-1]

    yield factory
    for s in made:
        s.stop()


@pytest.mark.integration
def test_workers_without_the_receivers_filesystem_deliver_every_instance_once(split):
    """Four CXRs and one whose pixel data cannot be decoded: each good one gets exactly one result; the bad one is
    dead-lettered by the worker, which tells the receiver, so it shows in the receiver host's dead letters too."""
    from pydicom.encaps import encapsulate

    node = split()
    datasets = unique_instances(5)
    datasets[-1].PixelData = encapsulate([b"\xff\xd8\xff\xe0 not a JPEG stream" * 4])
    bad = str(datasets[-1].SOPInstanceUID)
    sops = sorted(str(d.SOPInstanceUID) for d in datasets[:-1])
    assert c_store(node.port, datasets) == [0] * len(datasets)
    recv_instances = node.recv / "var" / "spool" / "instances"

    def done() -> bool:
        events = node.audit("work")
        return len([e for e in events if e["event"] == "sent"]) >= len(sops) and \
            any(e["event"] == "dead_lettered" for e in events) and not list(recv_instances.glob("*.dcm"))

    node.wait(done)
    work = node.audit("work")
    sent = [e["sop_instance_uid"] for e in work if e["event"] == "sent"]
    assert sorted(sent) == sops, "exactly one delivered result per instance"
    fetched = sorted(e["sop_instance_uid"] for e in work if e["event"] == "fetched")
    assert fetched == sorted(sops * 2 + [bad]), "each stage fetched its copy over HTTP (infer, then report)"
    assert not [e for e in work if e["event"] in ("analyze_noop", "report_noop", "release_failed")]
    assert [(e["sop_instance_uid"], e["stage"]) for e in work if e["event"] == "dead_lettered"] == [(bad, "analyze")]
    # the tasks named a path that, from the workers' directory, is their own empty spool: never the receiver's
    assert not list((node.work / "var" / "spool" / "instances").iterdir())
    assert not list((node.work / "var" / "spool" / "fetched").iterdir()), "worker copies removed when done"
    assert not list((node.work / "var" / "spool" / "outbox").iterdir())
    released = [(e["sop_instance_uid"], e["outcome"]) for e in node.audit("recv") if e["event"] == "released"]
    assert sorted(released) == sorted([(s, "done") for s in sops] + [(bad, "dead_lettered")])
    assert not list(recv_instances.iterdir()), "receiver spool emptied"
    # the dead letter: full on the worker, and at the receiver with its source and where the worker keeps it
    worker_dead = node.work / "var" / "dead-letter" / bad
    assert (worker_dead / "source.dcm").exists() and "pixel data" in json.loads(
        (worker_dead / "reason.json").read_text())["reason"]
    recv_reason = json.loads((node.recv / "var" / "dead-letter" / bad / "reason.json").read_text())
    assert recv_reason["stage"] == "analyze" and "pixel data cannot be decoded" in recv_reason["reason"]
    assert Path(recv_reason["worker_path"]).resolve() == worker_dead.resolve() and recv_reason["worker"]
    assert (node.recv / "var" / "dead-letter" / bad / "source.dcm").exists()
    srs = [f for f in node.out.glob("*.dcm")
           if str(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID) == SR_CLASS]
    refs = sorted(str(pydicom.dcmread(f).CurrentRequestedProcedureEvidenceSequence[0]
                      .ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for f in srs)
    assert refs == sops, "one SR per source in the destination"
    assert "s3cret" not in node.logs(), "the token is never logged"


@pytest.mark.integration
def test_unreachable_instance_server_retries_then_dead_letters_and_loses_nothing(split, redis_url):
    """The receiver advertises a URL nobody answers at: each task retries with backoff, is dead-lettered with its
    reason on the worker (not silently dropped, not retried for ever), and the receiver still holds the instance,
    so its reconcile (with the URL fixed) gets it delivered."""
    from triage_node.cli import reconcile

    node = split(advertised_port=free_port())
    (ds,) = unique_instances(1)
    sop = str(ds.SOPInstanceUID)
    assert c_store(node.port, [ds]) == [0]
    node.wait(lambda: any(e["event"] == "release_failed" for e in node.audit("work")), timeout=120)
    work = node.audit("work")
    fails = [e for e in work if e["event"] == "failed"]
    assert [e["stage"] for e in fails] == ["fetch"] * 3 and [e["will_retry"] for e in fails] == [True, True, False]
    assert all("ConnectionRefusedError" in e["reason"] for e in fails)
    assert len([e for e in work if e["event"] == "retry"]) == 2
    reason = json.loads((node.work / "var" / "dead-letter" / sop / "reason.json").read_text())
    assert reason["stage"] == "fetch" and reason["reason"].startswith("fetch: instance server unavailable")
    assert [e["event"] for e in work if e["event"] == "release_failed"] == ["release_failed"]
    assert (node.recv / "var" / "spool" / "instances" / f"{sop}.dcm").exists(), "nothing acknowledged is lost"
    assert not redis_lib.Redis.from_url(redis_url).llen("infer"), "no task left retrying for ever"

    # the receiver host's reconcile, with the right URL, re-enqueues it (relative paths: run from its directory)
    cfg = config.load(node.recv / "node.toml")
    cfg = replace(cfg, instances=replace(cfg.instances, url=f"http://127.0.0.1:{node.http_port}"))
    cwd = Path.cwd()
    os.chdir(node.recv)
    try:
        spool = Spool(cfg.spool.directory, cfg.retry.dead_letter_dir)
        assert reconcile(cfg, spool, make_submitter(cfg), older_than_s=0) == 1
    finally:
        os.chdir(cwd)
    node.wait(lambda: any(e["event"] == "sent" for e in node.audit("work")))
    node.wait(lambda: not (node.recv / "var" / "spool" / "instances" / f"{sop}.dcm").exists(), timeout=30)


def test_serve_re_enqueues_what_no_task_holds_with_its_source_url(tmp_path, redis_url):
    """The receiver host owns the spool when the workers are elsewhere: ``serve`` reconciles at start (and every
    visibility timeout), and the re-enqueued task names the instance server."""
    recv = tmp_path / "recv"
    recv.mkdir()
    spool = Spool(recv / "var" / "spool", recv / "var" / "dead-letter")
    path, _ = spool.store(SOP, b"left by a crash")
    os.utime(path, (time.time() - 3600,) * 2)
    port, http_port = free_port(), free_port()
    write_toml(recv / "node.toml", {
        "audit_log": "var/audit.jsonl", "spool": {"directory": "var/spool", **SPOOL_UNGUARDED},
        "broker": {"url": redis_url, "visibility_timeout": 60},
        "retry": {"dead_letter_dir": "var/dead-letter"}, "web": {"enabled": False},
        "receiver": {"port": port}, "instances": {"url": f"http://127.0.0.1:{http_port}", "port": http_port,
                                                  "token": TOKEN}})
    log = open(tmp_path / "serve.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "triage_node.cli", "serve", "--config", "node.toml"], cwd=recv,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not _queued_payloads(redis_url):
            time.sleep(0.2)
        (payload,) = _queued_payloads(redis_url)
        assert payload["sop_instance_uid"] == SOP and payload["path"] == f"var/spool/instances/{SOP}.dcm"
        assert payload["source_url"] == f"http://127.0.0.1:{http_port}"
        code, _, body = _get(f"{payload['source_url']}/instances/{SOP}.dcm", TOKEN)
        assert code == 200 and body == b"left by a crash"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert [e["reason"] for e in read(recv / "var" / "audit.jsonl") if e["event"] == "reconciled"] == ["restart"]


@pytest.mark.integration
def test_an_inference_worker_host_dying_mid_task_loses_nothing(split, tmp_path):
    """The whole inference worker (main process and child, as when its host dies) is killed right after it fetched
    the instance; the task was not acknowledged, Redis hands it out again after the visibility timeout, and an
    inference worker on a third "host" (its own directory and spool) fetches it from the receiver, which still
    holds it. The result is delivered (identical UIDs however many times) and the receiver's spool emptied."""
    node = split(visibility_timeout=5)
    (ds,) = unique_instances(1)
    sop = str(ds.SOPInstanceUID)
    assert c_store(node.port, [ds]) == [0]
    node.wait(lambda: any(e["event"] == "fetched" for e in node.audit("work")), timeout=120)
    os.killpg(node.infer.pid, signal.SIGKILL)
    node.infer.wait()
    mid_task = not any(e["event"] == "analysed" for e in node.audit("work"))
    assert (node.recv / "var" / "spool" / "instances" / f"{sop}.dcm").exists(), "held until released"
    other = tmp_path / "work2"
    other.mkdir()
    (other / "node.toml").write_text((node.work / "node.toml").read_text())
    node.worker("infer", other, "infer-other")
    node.wait(lambda: any(e["event"] == "sent" for e in node.audit("work"))
              and not (node.recv / "var" / "spool" / "instances" / f"{sop}.dcm").exists(), timeout=180)
    sent = [e for e in node.audit("work") if e["event"] == "sent"]
    assert {e["sop_instance_uid"] for e in sent} == {sop} and len({tuple(e["sent_uids"]) for e in sent}) == 1
    assert not [e for e in node.audit("work") + node.audit(other) if e["event"] == "dead_lettered"]
    if mid_task:  # the usual case: the kill landed during decode + model
        assert [e["event"] for e in node.audit(other) if e["event"] in ("fetched", "analysed")] == [
            "fetched", "analysed"], "the other host fetched and analysed it again"


def test_worker_spool_keeps_fetched_copies_apart_and_sweeps_stale_ones(tmp_path):
    """Fetched copies live in ``fetched/``, never in ``instances/`` (which reconcile re-enqueues); finishing an
    instance removes its copy, a dead letter keeps it as source.dcm, and day-old leftovers are swept."""
    spool = Spool(tmp_path / "spool", tmp_path / "dead")
    a, b, c = (f"1.2.826.0.1.3680043.8.498.90{i}" for i in (1, 2, 3))
    for sop in (a, b, c):
        spool.fetched_path(sop).write_bytes(b"copy of " + sop.encode())
    assert spool.local_copy(a) == spool.fetched_path(a) and spool.pending() == []
    spool.discard(a)
    assert spool.local_copy(a) is None
    target = spool.dead_letter(b, "analyze: bad dataset")
    assert (target / "source.dcm").read_bytes() == b"copy of " + b.encode() and spool.local_copy(b) is None
    os.utime(spool.fetched_path(c), (time.time() - 2 * 86400,) * 2)
    spool.fetched_path(a).write_bytes(b"fresh")
    assert spool.sweep_fetched(86400) == 1
    assert not spool.fetched_path(c).exists() and spool.fetched_path(a).exists()
