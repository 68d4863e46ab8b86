"""The acknowledgement guarantee under faults at each step of a C-STORE: the sender sees 0x0000 only when the instance
is in the spool (a complete file) and its task is in the broker; otherwise a failure status or no response at all.

Real associations and a real Redis throughout; the faults are real where the system allows it (a paused or killed
broker, a receiver killed while it waits for the broker, a spool path that cannot be written) and injected at the
system call where it does not (fsync and rename failing)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import redis
from conftest import SAMPLES, SPOOL_UNGUARDED, write_toml
from pydicom.uid import generate_uid
from test_receiver import receiver, store  # noqa: F401 - the in-process receiver fixture

from triage_node.audit import read
from triage_node.services import PrivateRedis, free_port, wait_port
from triage_node.transport import scp


def fresh(i: int = 0) -> pydicom.Dataset:
    ds = pydicom.dcmread(SAMPLES[i])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def queued_sops(url: str) -> list[str]:
    msgs = [json.loads(m) for m in redis.Redis.from_url(url).lrange("infer", 0, -1)]
    return [json.loads(base64.b64decode(m["body"]))[0][0]["sop_instance_uid"] for m in msgs]


def check_ack(status: int | None, sop: str, spool, url: str, audit_log: str) -> None:
    """0x0000 <=> complete spool file + queued task + 'received' audit line; otherwise no file, no line."""
    path = spool.instance_path(sop)
    received = [e for e in read(audit_log) if e["event"] == "received" and e["sop_instance_uid"] == sop]
    if status == 0x0000:
        assert pydicom.dcmread(path).SOPInstanceUID == sop
        assert queued_sops(url).count(sop) == 1
        assert len(received) == 1
    else:
        assert not path.exists(), "a refused instance was left in the spool"
        assert not received
        assert not list(spool.instances.glob(".tmp-*")), "a partial write was left behind"


@pytest.mark.parametrize("fault", ["fsync", "rename", "spool_path", "enqueue_exception"])
def test_fault_at_each_step_is_never_acknowledged(receiver, redis_url, monkeypatch, fault):  # noqa: F811
    cfg, spool, server = receiver()
    ds = fresh()
    if fault in ("fsync", "rename"):
        target = "fsync" if fault == "fsync" else "replace"
        real = getattr(os, target)

        def failing(*args, **kwargs):
            if threading.current_thread().name.startswith("AcceptorThread"):
                raise OSError(5, "Input/output error (injected)")
            return real(*args, **kwargs)

        monkeypatch.setattr(os, target, failing)
    elif fault == "spool_path":  # the instances folder replaced by a file: every write fails with a real OSError
        spool.instances.rmdir()
        spool.instances.write_bytes(b"")
    else:  # the enqueue raises something unforeseen (not a broker error)
        def boom(*args):
            raise RuntimeError("injected")

        monkeypatch.setattr(server.ingest, "submit", boom)
    status = store(cfg.receiver.port, ds)
    assert status == scp.OUT_OF_RESOURCES  # the sender keeps the instance and retries later
    if fault == "spool_path":
        spool.instances.unlink()
        spool.instances.mkdir()
    check_ack(status, str(ds.SOPInstanceUID), spool, redis_url, cfg.audit_log)
    monkeypatch.undo()
    ok = fresh(1)
    assert store(cfg.receiver.port, ok) == 0x0000  # the node keeps serving once the fault is gone
    check_ack(0x0000, str(ok.SOPInstanceUID), spool, redis_url, cfg.audit_log)


@pytest.fixture
def own_redis(tmp_path):
    r = PrivateRedis(tmp_path / "own-redis", persist=False).start()
    yield r
    if r.proc and r.proc.poll() is None:
        r.proc.send_signal(signal.SIGCONT)
    r.stop()


def test_paused_broker_answers_out_of_resources(receiver, own_redis):  # noqa: F811
    """SIGSTOP on redis-server: the enqueue times out, the sender gets 0xA700, the spool file is removed."""
    cfg, spool, _ = receiver(broker=own_redis.url)
    ds = fresh()
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        status = store(cfg.receiver.port, ds)
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    assert status == scp.OUT_OF_RESOURCES
    assert not spool.instance_path(str(ds.SOPInstanceUID)).exists()
    refused = [e for e in read(cfg.audit_log) if e["event"] == "refused"]
    assert refused[-1]["reason"].startswith("broker unavailable")
    # the LPUSH the paused broker executes on resuming refers to a file that is gone: a recorded no-op for the
    # worker (workers/app.py), never an instance analysed without having been acknowledged... and the node serves
    ok = fresh(1)
    assert store(cfg.receiver.port, ok) == 0x0000
    assert str(ok.SOPInstanceUID) in queued_sops(own_redis.url)


def test_receiver_killed_between_spool_and_enqueue(tmp_path, own_redis):
    """`triage-node serve` killed (SIGKILL) while its handler waits on a paused broker, i.e. after the spool write
    and before the enqueue: the sender gets no response (never 0x0000), the spooled file stays for the start-up
    reconcile, and the sender's retry is stored and acknowledged normally."""
    port = free_port()
    cfg = {"audit_log": str(tmp_path / "audit.jsonl"),
           "receiver": {"port": port, "allowed_calling_aets": ["TESTSCU"]},
           "spool": {"directory": str(tmp_path / "spool"), **SPOOL_UNGUARDED}, "broker": {"url": own_redis.url},
           "retry": {"dead_letter_dir": str(tmp_path / "dead")}}
    path = write_toml(tmp_path / "serve.toml", cfg)

    def serve() -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "triage_node.cli", "serve", "--config", str(path)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_port("127.0.0.1", port, 30)
        return p

    proc = serve()
    assert store(port, fresh(1)) == 0x0000  # fully started (the port opens before the server runs)
    ds = fresh()
    spooled = Path(cfg["spool"]["directory"]) / "instances" / f"{ds.SOPInstanceUID}.dcm"
    result: dict = {}
    own_redis.proc.send_signal(signal.SIGSTOP)
    try:
        t = threading.Thread(target=lambda: result.setdefault("status", store(port, ds)))
        t.start()
        deadline = time.time() + 4  # inside the broker's 5 s socket timeout
        while not spooled.exists() and time.time() < deadline:
            time.sleep(0.02)
        assert spooled.exists(), "the handler never reached the enqueue step"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    except Exception:
        proc.kill()
        raise
    finally:
        t.join(60) if "t" in locals() else None
        own_redis.proc.send_signal(signal.SIGCONT)
    assert result.get("status") != 0x0000, "acknowledged without the task in the broker"
    assert spooled.exists()  # not lost: the start-up reconcile (or the resent copy) takes it
    received = [e for e in read(cfg["audit_log"])
                if e["event"] == "received" and e["sop_instance_uid"] == str(ds.SOPInstanceUID)]
    assert not received
    proc = serve()  # the sender retries, as a PACS does
    try:
        assert store(port, ds) == 0x0000
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    # the killed handler's LPUSH may have reached the paused broker before the kill: at most one extra task,
    # which finds the file already processed or processes it once (output UIDs are deterministic)
    assert 1 <= queued_sops(own_redis.url).count(str(ds.SOPInstanceUID)) <= 2, "the resent copy was not queued"
