"""Reconcile against a real Redis broker (no workers): a spool file is re-enqueued only when no queued or
unacknowledged task refers to it, so a backlog longer than the visibility timeout is not analysed twice, while a lost
queue (broker restarted without persistence) or a dead worker's task is recovered."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace

import pytest
import redis as redis_lib

from triage_node import config
from triage_node.cli import _submitter, reconcile
from triage_node.queue import REPORT_TASK, broker_held_sops, make_app, submit
from triage_node.services import PrivateRedis
from triage_node.spool import Spool

pytestmark = pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not installed (make setup)")

SOPS = [f"1.2.826.0.1.3680043.8.498.{n}" for n in (101, 102, 103, 104)]


@pytest.fixture
def broker(tmp_path):
    r = PrivateRedis(tmp_path / "redis", persist=False).start()
    yield r
    r.stop()


def setup(tmp_path, broker):
    cfg = config.Config()
    cfg = replace(cfg, broker=replace(cfg.broker, url=broker.url), audit_log=str(tmp_path / "audit.jsonl"),
                  spool=replace(cfg.spool, directory=str(tmp_path / "spool")))
    spool = Spool(tmp_path / "spool", tmp_path / "dead")
    old = time.time() - 3600
    for sop in SOPS:
        p = spool.instance_path(sop)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"not read by reconcile")
        os.utime(p, (old, old))  # waited an hour: older than any visibility timeout
    return cfg, spool


def queued(cfg) -> list[str]:
    import base64
    import json

    client = redis_lib.Redis.from_url(cfg.broker.url)
    out = []
    for q in (cfg.broker.infer_queue, cfg.broker.report_queue):
        for raw in client.lrange(q, 0, -1):
            out.append(json.loads(base64.b64decode(json.loads(raw)["body"]))[0][0]["sop_instance_uid"])
    return sorted(out)


def test_queued_and_unacked_tasks_are_not_enqueued_twice(tmp_path, broker):
    cfg, spool = setup(tmp_path, broker)
    app = make_app(cfg)
    submit(app, str(spool.instance_path(SOPS[2])), SOPS[2], 0.0)
    with app.connection_for_read() as conn:  # a worker takes SOPS[2] and has not acknowledged it yet
        taken = conn.default_channel.basic_get(cfg.broker.infer_queue, no_ack=False)
        assert taken is not None
        submit(app, str(spool.instance_path(SOPS[0])), SOPS[0], 0.0)  # waiting in the infer queue (a long backlog)
        app.send_task(REPORT_TASK, args=[{"sop_instance_uid": SOPS[1], "path": "x", "prediction": {}}])  # report
        held = broker_held_sops(cfg)
        assert held == {SOPS[0], SOPS[1], SOPS[2]}
        assert broker_held_sops(cfg, include_unacked=False) == {SOPS[0], SOPS[1]}
        assert queued(cfg) == sorted([SOPS[0], SOPS[1]])

        n = reconcile(cfg, spool, _submitter(cfg), older_than_s=900, touch=True, reason="periodic sweep")
        assert n == 1  # only SOPS[3]: no task anywhere refers to it
        assert queued(cfg) == sorted([SOPS[0], SOPS[1], SOPS[3]])
        assert time.time() - spool.instance_path(SOPS[3]).stat().st_mtime < 60  # touched: once per period
        assert time.time() - spool.instance_path(SOPS[0]).stat().st_mtime > 3000  # held ones untouched

        # a second sweep in the same period re-sends nothing (SOPS[3] is queued now and its file was touched)
        assert reconcile(cfg, spool, _submitter(cfg), older_than_s=900, touch=True) == 0

        # start-up with a private broker: the unacknowledged task belonged to a worker that died with the node
        assert reconcile(cfg, spool, _submitter(cfg), older_than_s=0, include_unacked=False) == 1
        assert queued(cfg).count(SOPS[2]) == 1
    from triage_node.audit import read

    recs = [e for e in read(cfg.audit_log) if e["event"] == "reconciled"]
    assert [(r["count"], r["held_by_broker"]) for r in recs] == [(1, 3), (0, 3), (1, 3)]


def test_a_lost_queue_is_recovered(tmp_path, broker):
    """The broker restarted without persistence: nothing is held, every old spool file is re-enqueued once."""
    cfg, spool = setup(tmp_path, broker)
    app = make_app(cfg)
    for sop in SOPS:
        submit(app, str(spool.instance_path(sop)), sop, 0.0)
    redis_lib.Redis.from_url(cfg.broker.url).flushall()  # what a non-persistent restart leaves
    assert broker_held_sops(cfg) == set()
    assert reconcile(cfg, spool, _submitter(cfg), older_than_s=900) == len(SOPS)
    assert queued(cfg) == sorted(SOPS)


def test_unreadable_broker_falls_back_to_re_enqueueing(tmp_path, broker):
    cfg, _ = setup(tmp_path, broker)
    dead = replace(cfg, broker=replace(cfg.broker, url="redis://127.0.0.1:1/0"))
    assert broker_held_sops(dead) is None
    assert broker_held_sops(replace(cfg, broker=replace(cfg.broker, url="amqp://x"))) is None


def test_files_finished_during_the_scan_are_skipped_not_an_error(tmp_path, broker, monkeypatch):
    """Under load workers discard spool files while the sweep lists them; the 10,000-instance run's sweep failed on
    exactly that (FileNotFoundError from stat) and so never ran. Here the listing names a file that is already gone."""
    cfg, spool = setup(tmp_path, broker)
    gone = spool.instance_path("1.2.826.0.1.3680043.8.498.999")
    real_glob = type(spool.instances).glob
    monkeypatch.setattr(type(spool.instances), "glob", lambda self, pattern: [*real_glob(self, pattern), gone])
    assert [p.stem for p in spool.pending(older_than_s=900)] == sorted(SOPS)
    assert reconcile(cfg, spool, _submitter(cfg), older_than_s=900, touch=True) == len(SOPS)
