"""Audit trail: group commit, rotation under concurrent writer processes, readers (/metrics, status) across rotations.

Writers are real separate Python processes (like the receiver and the Celery workers), each with several threads,
appending while the trail rotates every few KB; a reader in this process follows the trail the whole time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT, SPOOL_UNGUARDED, write_toml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from triage_node import audit as audit_mod
from triage_node import config
from triage_node.audit import Audit, read, rotated_files
from triage_node.spool import Spool
from triage_node.status import summarise
from triage_node.web.metrics import NodeCollector, render
from triage_node.web.probes import Probes
from triage_node.web.state import AuditState

WRITER = """
import sys, threading, time
from pathlib import Path
from triage_node.audit import Audit
path, name = sys.argv[1], sys.argv[2]
threads, n, max_bytes, go = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), Path(sys.argv[6])
audit = Audit(path, max_bytes=max_bytes, keep=0)
while not go.exists():
    time.sleep(0.005)
def run(t):
    for i in range(n):
        if i % 10 == 9:  # some lines go in pairs, in one write
            audit.record_many([("received", {"w": f"{name}-{t}", "i": i, "pad": "x" * 40}),
                               ("analysed", {"w": f"{name}-{t}", "i": i, "pair": True})])
        else:
            audit.record("received", w=f"{name}-{t}", i=i, pad="x" * 40)
ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
"""


def _run_writers(tmp_path: Path, path: Path, procs: int, threads: int, n: int, max_bytes: int,
                 follow: AuditState | None = None) -> None:
    go = tmp_path / "go"
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    children = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"p{k}", str(threads), str(n),
                                  str(max_bytes), str(go)], env=env) for k in range(procs)]
    go.touch()
    while any(c.poll() is None for c in children):
        if follow is not None:
            follow.refresh()  # a reader follows the trail through the rotations while they happen
        time.sleep(0.01)
    assert [c.returncode for c in children] == [0] * procs


def _expected(procs: int, threads: int, n: int) -> Counter:
    want: Counter = Counter()
    for k in range(procs):
        for t in range(threads):
            for i in range(n):
                want[("received", f"p{k}-{t}", i)] += 1
                if i % 10 == 9:
                    want[("analysed", f"p{k}-{t}", i)] += 1
    return want


def test_rotation_under_concurrent_writer_processes_loses_and_duplicates_nothing(tmp_path):
    path = tmp_path / "audit.jsonl"
    procs, threads, n = 4, 3, 250
    live = AuditState(path)
    _run_writers(tmp_path, path, procs, threads, n, max_bytes=16 << 10, follow=live)
    rotated = rotated_files(path)
    assert len(rotated) >= 10, f"the trail should have rotated many times, got {len(rotated)}"
    entries = read(path)
    got = Counter((e["event"], e["w"], e["i"]) for e in entries)
    want = _expected(procs, threads, n)
    assert got == want, f"lost: {sum((want - got).values())}, duplicated: {sum((got - want).values())}"
    # every line is whole, and a pair from record_many stays adjacent in one file
    for f in rotated + [path]:
        lines = f.read_bytes().split(b"\n")
        assert lines[-1] == b"", f"{f.name} ends with a torn line"
        for a, b in zip(lines, lines[1:], strict=False):
            ea = json.loads(a)
            if b and json.loads(b).get("pair"):
                assert (ea["w"], ea["i"]) == (json.loads(b)["w"], json.loads(b)["i"])
    # the reader that followed the rotations live and a fresh one both count every line exactly once
    live.refresh()
    fresh = AuditState(path)
    fresh.refresh()
    total = sum(want.values())
    for st in (live, fresh):
        assert st.events["received"] == procs * threads * n
        assert st.events["analysed"] == procs * threads * (n // 10)
        assert sum(st.events.values()) == total


def test_group_commit_threads_in_one_process(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = Audit(path, max_bytes=0, fsync=True)
    barrier = threading.Barrier(8)

    def run(t: int) -> None:
        barrier.wait()
        for i in range(60):
            audit.record("received", w=t, i=i)

    ts = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    got = Counter((e["w"], e["i"]) for e in read(path))
    assert got == Counter({(t, i): 1 for t in range(8) for i in range(60)})
    assert not rotated_files(path), "max_bytes=0: never rotated"
    # a line recorded is in the file when record() returns (what the receiver relies on before 0x0000)
    audit.record("received", sop_instance_uid="1.2.3", PatientName="Never^Written")
    last = json.loads(path.read_bytes().splitlines()[-1])
    assert last["sop_instance_uid"] == "1.2.3" and "PatientName" not in last


def _scrape(state: AuditState, cfg: config.Config, spool: Spool) -> dict:
    reg = CollectorRegistry(auto_describe=False)  # as make_registry, without a Celery inspect: no broker here
    reg.register(NodeCollector(state, Probes(cfg, spool, state), with_workers=False))
    out = {}
    for fam in text_string_to_metric_families(render(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_and_status_equal_across_a_rotation(tmp_path):
    path = tmp_path / "audit.jsonl"
    cfg = config.Config(spool=config.SpoolConfig(directory=str(tmp_path / "spool")),
                        broker=config.BrokerConfig(url=""), audit_log=str(path),
                        retry=config.RetryConfig(dead_letter_dir=str(tmp_path / "dead")))
    spool = Spool(cfg.spool.directory, cfg.retry.dead_letter_dir)
    audit = Audit(path, max_bytes=2000, keep=0)
    web = AuditState(path)  # the dashboard's reader, kept across the rotations

    def burst(k: int) -> None:
        for i in range(k):
            audit.record("received", sop_instance_uid=f"1.2.{i}", ms=3.0)
            audit.record("sent", sop_instance_uid=f"1.2.{i}", latency_s=0.4)
        audit.record("skipped", sop_instance_uid="1.9", reason="modality MR not processed")

    burst(5)
    m1 = _scrape(web, cfg, spool)
    assert m1[("triage_instances_received_total", ())] == 5 and not rotated_files(path)
    burst(20)  # crosses several rotations between two scrapes
    assert len(rotated_files(path)) >= 2
    m2 = _scrape(web, cfg, spool)
    fresh = _scrape(AuditState(path), cfg, spool)  # a restarted dashboard
    for m in (m2, fresh):
        assert m[("triage_instances_received_total", ())] == 25
        assert m[("triage_results_sent_total", ())] == 25
        assert m[("triage_instances_skipped_total", (("reason", "modality MR not processed"),))] == 2
        assert m[("triage_stage_duration_seconds_count", (("stage", "end_to_end"),))] == 25
    assert web.last_hour()["counts"] == {"received": 25, "sent": 25, "skipped": 2}
    assert len(web.recent_studies()) == 21  # 20 distinct SOPs + the skipped one
    text = summarise(cfg, spool)
    assert "received 25" in text and "sent 25" in text and "skipped 2" in text, text
    # the real command, in its own process, on the rotated trail
    toml = write_toml(tmp_path / "node.toml", {"audit_log": str(path),
                                              "spool": {"directory": cfg.spool.directory, **SPOOL_UNGUARDED},
                                              "retry": {"dead_letter_dir": cfg.retry.dead_letter_dir}})
    out = subprocess.run([sys.executable, "-m", "triage_node.cli", "status", "--config", str(toml)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "received 25, sent 25, skipped 2" in out.stdout, out.stdout


def test_pruned_rotations_and_a_truncated_trail_are_survived(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = Audit(path, max_bytes=500, keep=2)
    st = AuditState(path)
    for i in range(60):
        audit.record("received", i=i)
        if i % 7 == 0:
            st.refresh()
    assert len(rotated_files(path)) == 2, "only `keep` rotated files are retained"
    retained = read(path)
    st.refresh()
    assert st.events["received"] == 60, "a reader that followed every rotation saw every line"
    fresh = AuditState(path)
    fresh.refresh()
    assert fresh.events["received"] == len(retained) < 60
    path.write_bytes(b"")  # someone truncates the active file: the reader starts over on what is retained
    st.refresh()
    assert st.events["received"] == len(read(path))
    assert audit_mod.lock_path(path).exists()


def test_rotation_waits_for_a_write_in_flight_in_another_process(tmp_path):
    """The rename needs the exclusive lock: while any process holds the shared one (it is between opening the
    active file and finishing its write), the trail is not rotated, so that write cannot land in a rotated file."""
    import fcntl
    import os

    path = tmp_path / "audit.jsonl"
    Audit(path, max_bytes=0).record("received", i=0)  # creates the file and the lock file
    fd = os.open(audit_mod.lock_path(path), os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_SH)  # this process is "mid-write"
    child = subprocess.Popen([sys.executable, "-c", "import sys; from triage_node.audit import Audit; "
                              "Audit(sys.argv[1], max_bytes=10).record('received', i=1)", str(path)],
                             env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    try:
        deadline = time.time() + 30
        while sum(1 for _ in read(path)) < 2 and time.time() < deadline:  # the child's write itself goes through
            time.sleep(0.05)
        time.sleep(0.5)
        assert child.poll() is None and not rotated_files(path), "rotated while a write was in flight"
    finally:
        os.close(fd)  # the write "finishes": the rotation may go ahead
    assert child.wait(30) == 0
    assert len(rotated_files(path)) == 1 and not path.exists()
    assert [e["i"] for e in read(path)] == [0, 1]


@pytest.mark.integration
def test_metrics_endpoint_and_dashboard_api_across_rotations(tmp_path, redis_url):
    """The running web server (real HTTP, real Redis) scraped before, between and after rotations driven by another
    process: the counters only ever grow by what was written, and a restarted server reports the same totals."""
    import requests

    from triage_node import web
    from triage_node.services import free_port

    path = tmp_path / "audit.jsonl"
    cfg = config.Config(spool=config.SpoolConfig(directory=str(tmp_path / "spool")),
                        broker=config.BrokerConfig(url=redis_url), audit_log=str(path),
                        retry=config.RetryConfig(dead_letter_dir=str(tmp_path / "dead")),
                        web=config.WebConfig(port=free_port()), audit_max_bytes=4096, audit_keep=0)
    spool = Spool(cfg.spool.directory, cfg.retry.dead_letter_dir)

    def scrape(base: str) -> tuple[float, int]:
        text = requests.get(base + "metrics", timeout=30).text
        got = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels}
        ov = requests.get(base + "api/overview", timeout=30).json()  # what the dashboard shows for the last hour
        return got["triage_instances_received_total"], ov["last_hour"]["counts"].get("received", 0)

    srv = web.start(cfg, spool, Audit.from_config(cfg))
    assert srv is not None
    try:
        assert scrape(srv.url) == (0, 0)
        want = 0
        for k, n in enumerate((3, 15, 50)):  # lines per writer thread; each burst crosses more rotations
            (tmp_path / f"burst{k}").mkdir()
            _run_writers(tmp_path / f"burst{k}", path, procs=2, threads=2, n=n, max_bytes=4096)
            want += 2 * 2 * n
            assert scrape(srv.url) == (want, want), k
        assert len(rotated_files(path)) >= 5
    finally:
        srv.stop()
    again = web.start(cfg, spool, Audit.from_config(cfg))  # a restarted dashboard reads the rotated files too
    assert again is not None
    try:
        assert scrape(again.url) == (want, want)
    finally:
        again.stop()
