"""Celery tooling works as-is against the node's broker: `celery -A workers.app inspect`, and Flower shows our
tasks with readable names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pydicom
import pytest
import requests
from conftest import SAMPLES, c_store

from triage_node.services import free_port, wait_port

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("task_events", [True, False], ids=["events", "events-off"])
def test_celery_inspect_and_flower_see_the_node(tmp_path, redis_url, make_node, task_events, monkeypatch):
    # [broker] task_events = false: Flower turns the workers' events on when it starts, and still lists the tasks
    monkeypatch.setenv("TRIAGE_BROKER_TASK_EVENTS", "1" if task_events else "0")
    node = make_node(redis_url, [{"name": "out", "kind": "folder", "path": str(tmp_path / "out")}])
    env = dict(os.environ, TRIAGE_BROKER_URL=redis_url, TRIAGE_CONFIG=str(node.config_path),
               FLOWER_UNAUTHENTICATED_API="1")  # loopback-only test instance
    flower_port = free_port()
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "workers.app", "flower", f"--port={flower_port}",
                               "--address=127.0.0.1"], env=env, cwd=tmp_path,
                              stdout=open(tmp_path / "flower.log", "wb"), stderr=subprocess.STDOUT)
    try:
        assert wait_port("127.0.0.1", flower_port, 60), (tmp_path / "flower.log").read_text()[-2000:]
        # plain Celery tooling: the two workers answer, with their queues
        deadline, queues = time.time() + 90, set()
        while queues != {"infer", "report"} and time.time() < deadline:  # the prefork worker starts a little later
            out = subprocess.run([sys.executable, "-m", "celery", "-A", "workers.app", "inspect", "active_queues",
                                  "--json", "--timeout", "5"], env=env, capture_output=True, text=True, cwd=tmp_path)
            if out.returncode == 0:
                replies = json.loads(out.stdout.strip().splitlines()[-1])
                queues = {q["name"] for per_worker in replies.values() for q in per_worker}
            time.sleep(1)
        assert queues == {"infer", "report"}, out.stdout[-1000:] + out.stderr[-1000:]
        registered = subprocess.run([sys.executable, "-m", "celery", "-A", "workers.app", "inspect", "registered",
                                     "--timeout", "5"], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert "triage.analyze" in registered.stdout and "triage.report" in registered.stdout
        # a study through the node; Flower lists its tasks by their readable names
        assert c_store(node.port, [pydicom.dcmread(SAMPLES[0])]) == [0]
        node.wait_audit(lambda es: any(e["event"] == "sent" for e in es), timeout=180)
        # the audit's "sent" line is written just before the task returns: wait for Flower to see both finish
        deadline, states = time.time() + 60, {}
        while time.time() < deadline and set(states.get(n) for n in ("triage.analyze", "triage.report")) != {"SUCCESS"}:
            tasks = requests.get(f"http://127.0.0.1:{flower_port}/api/tasks", timeout=10).json()
            states = {t.get("name"): t.get("state") for t in tasks.values()}
            time.sleep(1)
        assert {"triage.analyze", "triage.report"} <= set(states), states
        assert states["triage.analyze"] == "SUCCESS" and states["triage.report"] == "SUCCESS"
    finally:
        flower.terminate()
        flower.wait(20)
