"""Several receiver processes on one port (``triage-node serve`` with ``receiver.processes``), real Redis, real
associations: each process accepts, a killed process leaves the port serving, and every 0x0000 still means
spooled + queued + audited."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import redis
from conftest import SAMPLES, SPOOL_UNGUARDED, write_toml
from pydicom.uid import generate_uid
from pynetdicom import AE

from triage_node.audit import read
from triage_node.services import free_port, wait_port


def fresh(i: int = 0) -> pydicom.Dataset:
    ds = pydicom.dcmread(SAMPLES[i % len(SAMPLES)])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out |= {int(c) for c in (task / "children").read_text().split()}
        except FileNotFoundError:  # that thread ended between the listing and the read
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text(errors="replace")
    except FileNotFoundError:
        return False


def listening_inodes(port: int, pid: int | None = None) -> set[str]:
    """Inodes of the TCP sockets listening on ``port`` (those of ``pid`` only, when given)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                found.add(f[9])
    if pid is None:
        return found
    owned = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            owned.add(target[8:-1])
    return found & owned


def wait_children(pid: int, n: int, timeout: float = 60.0) -> set[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        kids = children(pid)
        if len(kids) >= n:
            return kids
        time.sleep(0.2)
    raise TimeoutError(f"{n} receiver children expected, found {children(pid)}")


@pytest.fixture
def pool(tmp_path, redis_url):
    """`triage-node serve` with N receiver processes; yields a function starting it and returning (proc, cfg)."""
    procs: list[subprocess.Popen] = []

    def start(processes: int, balance: str = "shared", port: int = 0) -> tuple[subprocess.Popen, dict]:
        cfg = {"audit_log": str(tmp_path / "audit.jsonl"),
               "receiver": {"port": port or free_port(), "allowed_calling_aets": ["TESTSCU"], "processes": processes,
                            "balance": balance, "max_associations_per_address": 0},
               "spool": {"directory": str(tmp_path / "spool"), **SPOOL_UNGUARDED},
               "broker": {"url": redis_url},
               "retry": {"dead_letter_dir": str(tmp_path / "dead")}}
        path = write_toml(tmp_path / "serve.toml", cfg)
        skip = (tmp_path / "serve.log").read_text().count(f"listening on 127.0.0.1:{cfg['receiver']['port']}") \
            if (tmp_path / "serve.log").exists() else 0
        log = open(tmp_path / "serve.log", "ab")
        p = subprocess.Popen([sys.executable, "-m", "triage_node.cli", "serve", "--config", str(path)],
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        assert wait_port("127.0.0.1", cfg["receiver"]["port"], 30), (tmp_path / "serve.log").read_text()
        wait_children(p.pid, processes - 1)
        deadline = time.time() + 60  # every process logs "listening" once its server runs
        mark = f"listening on 127.0.0.1:{cfg['receiver']['port']}"
        while (tmp_path / "serve.log").read_text().count(mark) < processes + skip:
            assert time.time() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        return p, cfg

    yield start
    for p in procs:
        kids = children(p.pid) if p.poll() is None else set()
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
        for k in kids:  # children whose parent was killed by a test
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass


def open_assoc(port: int, ds: pydicom.Dataset):
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    assert assoc.is_established
    return assoc


def assert_guarantees(cfg: dict, redis_url: str, acked: list[str]) -> None:
    """Every acknowledged instance: spooled (a readable file), one queued task, a 'received' audit line."""
    spool = Path(cfg["spool"]["directory"]) / "instances"
    queued = [json.loads(m) for m in redis.Redis.from_url(redis_url).lrange("infer", 0, -1)]
    import base64

    task_sops = [json.loads(base64.b64decode(m["body"]))[0][0]["sop_instance_uid"] for m in queued]
    received = {e["sop_instance_uid"] for e in read(cfg["audit_log"]) if e["event"] == "received"}
    for sop in acked:
        assert pydicom.dcmread(spool / f"{sop}.dcm").SOPInstanceUID == sop
        assert task_sops.count(sop) == 1, sop
        assert sop in received, sop


def test_each_process_accepts_associations(pool, redis_url):
    proc, cfg = pool(3)
    port = cfg["receiver"]["port"]
    # Six associations open at once: an idle process accepts before a busy one, so they spread.
    datasets = [fresh(i) for i in range(6)]
    assocs = [open_assoc(port, ds) for ds in datasets]
    try:
        statuses = [int(a.send_c_store(ds).Status) for a, ds in zip(assocs, datasets)]
    finally:
        for a in assocs:
            a.release()
    assert statuses == [0] * 6
    pids = {e["pid"] for e in read(cfg["audit_log"]) if e["event"] == "received"}
    assert pids <= children(proc.pid) | {proc.pid}
    assert len(pids) >= 2, f"one process took every association: {pids}"
    assert_guarantees(cfg, redis_url, [str(ds.SOPInstanceUID) for ds in datasets])


@pytest.mark.parametrize("balance", ["shared", "reuseport"])
def test_killed_receiver_process_port_keeps_serving(pool, redis_url, balance):
    proc, cfg = pool(2, balance)
    port = cfg["receiver"]["port"]
    (victim,) = children(proc.pid)
    its_sockets = listening_inodes(port, victim) - listening_inodes(port, proc.pid)  # none when shared
    assert bool(its_sockets) == (balance == "reuseport")
    os.kill(victim, signal.SIGKILL)
    # Until the kernel has closed the dead process's listening socket, SO_REUSEPORT can still hash a new connection
    # to it (reset: the PACS retries); the test is about what the remaining processes serve afterwards. The thread
    # group leader shows as a zombie before its last thread has released the file table, so wait on the socket
    # itself, not on the process state.
    deadline = time.time() + 10
    while time.time() < deadline and (_alive(victim) or listening_inodes(port) & its_sockets):
        time.sleep(0.05)
    assert not listening_inodes(port) & its_sockets, "the killed receiver's socket is still listening"
    acked = []
    for i in range(8):  # new connections, each its own association: all served by what remains
        ds = fresh(i)
        a = open_assoc(port, ds)
        try:
            assert int(a.send_c_store(ds).Status) == 0
        finally:
            a.release()
        acked.append(str(ds.SOPInstanceUID))
    assert_guarantees(cfg, redis_url, acked)
    # the supervisor starts a replacement
    deadline = time.time() + 30
    while time.time() < deadline and (children(proc.pid) - {victim}) == set():
        time.sleep(0.2)
    assert children(proc.pid) - {victim}


def test_supervisor_killed_children_stop_and_free_the_port(pool, tmp_path):
    """Orphaned receiver processes would hold the port against the supervisor's restart: they stop by themselves
    (after finishing what they are serving) and a new `serve` binds the port."""
    proc, cfg = pool(3)
    port = cfg["receiver"]["port"]
    kids = children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(Path(f"/proc/{k}").exists() and "zombie" not in Path(f"/proc/{k}/status").read_text()
              for k in kids) and time.time() < deadline:
        time.sleep(0.2)
    assert not [k for k in kids if Path(f"/proc/{k}").exists()
                and "zombie" not in Path(f"/proc/{k}/status").read_text()], "orphaned receivers kept running"
    restarted, _ = pool(1, port=port)
    ds = fresh()
    a = open_assoc(port, ds)
    try:
        assert int(a.send_c_store(ds).Status) == 0
    finally:
        a.release()
