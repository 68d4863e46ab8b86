"""/readyz of a web server bound beyond loopback: the verdict for everyone, the checks (worker host names, model
version) only behind login. Real pieces: the web server listening on 0.0.0.0, the C-STORE receiver, a private Redis,
a real Celery inference worker (``celery -A workers.app``, named after a host), and ``requests`` as the client.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import requests
from conftest import ROOT, SPOOL_UNGUARDED, write_toml

from triage_node import config, web
from triage_node.audit import Audit, read
from triage_node.services import free_port, worker_command
from triage_node.spool import Spool
from triage_node.transport import scp

pytestmark = pytest.mark.integration

WORKER_HOST = "readyz-secret-host"
MODEL_VERSION = "cxr-secret-model 7.7.7"
USER, PASSWORD = "ops", "readyz-Pass-42"


def _get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, dict, str]:
    r = requests.get(url, auth=auth, timeout=30)
    return r.status_code, r.json(), r.text


def test_readyz_says_only_ready_without_login_and_details_with_it(tmp_path, redis_url):
    cfg = config.Config(
        receiver=config.ReceiverConfig(port=free_port()),
        spool=config.SpoolConfig(directory=str(tmp_path / "spool")),
        broker=config.BrokerConfig(url=redis_url),
        retry=config.RetryConfig(dead_letter_dir=str(tmp_path / "dead")),
        web=config.WebConfig(bind="0.0.0.0", port=free_port(), username=USER, password=PASSWORD),
        audit_log=str(tmp_path / "audit.jsonl"))
    toml = write_toml(tmp_path / "node.toml", {
        "audit_log": cfg.audit_log, "spool": {"directory": cfg.spool.directory, **SPOOL_UNGUARDED},
        "broker": {"url": redis_url},
        "retry": {"dead_letter_dir": cfg.retry.dead_letter_dir}})
    spool = Spool(cfg.spool.directory, cfg.retry.dead_letter_dir)
    audit = Audit.from_config(cfg)
    # what the last analysis wrote: the model version and the worker's host name
    audit.record("analysed", sop_instance_uid="1.2.3", model=MODEL_VERSION, hostname=f"infer@{WORKER_HOST}")
    receiver = scp.start(cfg, spool, lambda *a: "task-id", audit, block=False)
    cmd = worker_command("infer", 1, "solo", "WARNING")
    cmd[cmd.index("infer@%h")] = f"infer@{WORKER_HOST}"
    env = {**os.environ, "TRIAGE_CONFIG": str(toml), "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    srv = web.start(cfg, spool, audit)
    assert srv is not None
    base = f"http://127.0.0.1:{cfg.web.port}/readyz"
    try:
        deadline = time.time() + 120
        while (code := _get(base, (USER, PASSWORD))[0]) != 200 and time.time() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(1)
        # logged in: every check with its detail, naming the worker host and the model version
        code, body, text = _get(base, (USER, PASSWORD))
        assert code == 200 and body["ready"] is True, text
        assert set(body["checks"]) == {"receiver_listening", "broker_reachable", "spool_writable", "model_loaded"}
        assert WORKER_HOST in body["checks"]["model_loaded"]["detail"]
        assert MODEL_VERSION in body["checks"]["model_loaded"]["detail"]
        # no login, or a wrong one: the verdict and nothing else (still 200/503 for load balancers, not 401)
        for auth in (None, (USER, "wrong")):
            code, body, text = _get(base, auth)
            assert code == 200 and body == {"ready": True}, text
            assert WORKER_HOST not in text and "7.7.7" not in text and "infer@" not in text
        assert requests.get(f"http://127.0.0.1:{cfg.web.port}/metrics", timeout=30).status_code == 401
        # the worker goes: not ready, and still no detail without login
        worker.terminate()
        worker.wait(30)
        deadline = time.time() + 60
        while (res := _get(base))[0] != 503 and time.time() < deadline:
            time.sleep(1)
        code, body, _ = res
        assert code == 503 and body == {"ready": False}
        code, body, _ = _get(base, (USER, PASSWORD))
        assert code == 503 and body["checks"]["model_loaded"]["ok"] is False
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        srv.stop()
        receiver.shutdown()


def test_receiver_check_by_c_echo_when_the_dashboard_runs_apart(tmp_path):
    """[web] receiver_address (the dashboard in its own container): /readyz's receiver check is a C-ECHO to that
    address, not a look at local sockets; it fails with the reason when the probe's AE is not allowed or nothing
    answers, and it leaves no association open."""
    from triage_node.web.probes import Probes
    from triage_node.web.state import AuditState

    port = free_port()
    cfg = config.Config(
        receiver=config.ReceiverConfig(port=port, allowed_calling_aets=("ORTHANC", "TRIAGE-WEB")),
        spool=config.SpoolConfig(directory=str(tmp_path / "spool")),
        retry=config.RetryConfig(dead_letter_dir=str(tmp_path / "dead")),
        audit_log=str(tmp_path / "audit.jsonl"))
    spool = Spool(cfg.spool.directory, cfg.retry.dead_letter_dir)
    audit = Audit.from_config(cfg)
    receiver = scp.start(cfg, spool, lambda *a: "task-id", audit, block=False)

    def probe(**web_kw) -> tuple[bool, str]:
        # the dashboard's own config: another receiver port locally (nothing listens there), the real one remote
        c = config.Config(receiver=config.ReceiverConfig(port=free_port()), web=config.WebConfig(**web_kw),
                          spool=cfg.spool, audit_log=cfg.audit_log)
        return Probes(c, spool, AuditState(cfg.audit_log)).receiver_listening()

    try:
        ok, detail = probe(receiver_address=f"127.0.0.1:{port}")
        assert ok and "answers C-ECHO" in detail, detail
        assert not probe()[0], "without receiver_address the local check finds nothing on its own port"
        ok, detail = probe(receiver_address=f"127.0.0.1:{port}", probe_ae_title="INTRUDER")
        assert not ok and "rejected" in detail, detail
        assert not probe(receiver_address=f"127.0.0.1:{free_port()}")[0]
        assert not probe(receiver_address="no-port-here")[0]
        time.sleep(0.5)
        assert len(receiver.active_associations) == 0, "the probe released its association"
    finally:
        receiver.shutdown()
    events = [e["event"] for e in read(cfg.audit_log)]
    assert events.count("evt_accepted") >= 1 and events.count("evt_rejected") >= 1
