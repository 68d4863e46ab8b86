"""CPU cost of Celery task events per task, events on vs off, in one run (CPU time, not wall clock).

Starts a private redis-server and, for each setting, a Celery worker with the node's app settings
(``triage_node.queue.make_app``) running a task that does nothing, like each of the node's two workers: prefork with
one child (the infer worker) and a thread pool (the report worker). Sends N tasks the way the infer worker hands
over to the report queue (``send_task``) and reads, from /proc, the CPU (user + system) the worker's processes and
Redis spent until all N were done, and this process's CPU for the sends. Prints one JSON line per run::

    .venv/bin/python bench/celery_events.py --n 500 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = '''
import os
from triage_node.config import Config, BrokerConfig
from triage_node.queue import make_app
cfg = Config(broker=BrokerConfig(url=os.environ["BENCH_BROKER"]))
app = make_app(cfg, name="bench")
if os.environ["BENCH_EVENTS"] == "0":
    app.conf.update(worker_send_task_events=False, task_send_sent_event=False)
_redis = None

@app.task(name="triage.analyze", bind=True, acks_late=True)
def noop(self, payload):
    global _redis
    import redis
    _redis = _redis or redis.Redis.from_url(os.environ["BENCH_BROKER"])
    _redis.incr("bench-done")
'''


def _cpu(pid: int) -> float:
    """utime + stime of a process and its live children, seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(work: Path, url: str, redis_pid: int, events: bool, pool: str, n: int) -> dict:
    import redis

    env = dict(os.environ, BENCH_BROKER=url, BENCH_EVENTS="1" if events else "0",
               PYTHONPATH=f"{work}{os.pathsep}{ROOT}")
    pool_args = ["--pool=prefork", "--concurrency=1"] if pool == "prefork" else ["--pool=threads", "--concurrency=4"]
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "benchapp", "worker", "-Q", "infer",
                               "-l", "warning", "--without-mingle", "--without-gossip", *pool_args],
                              env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=open(work / "worker.log", "ab"))
    client = redis.Redis.from_url(url)
    sys.path[:0] = [str(work)]
    os.environ.update(BENCH_BROKER=url, BENCH_EVENTS=env["BENCH_EVENTS"])
    import importlib

    import benchapp

    importlib.reload(benchapp)
    try:
        client.set("bench-done", 0)
        for _ in range(5):  # warm-up: the worker is up and has run tasks
            benchapp.app.send_task("triage.analyze", args=[{"warm": True}])
        deadline = time.time() + 120
        while int(client.get("bench-done") or 0) < 5:
            if time.time() > deadline or worker.poll() is not None:
                raise SystemExit("worker did not start:\n" + (work / "worker.log").read_text()[-2000:])
            time.sleep(0.05)
        time.sleep(0.5)
        client.set("bench-done", 0)
        w0, r0 = _cpu(worker.pid), _cpu(redis_pid)
        c0 = time.process_time()
        for i in range(n):
            benchapp.app.send_task("triage.analyze", args=[{"sop_instance_uid": f"1.2.{i}", "path": "/x"}])
        send = time.process_time() - c0
        while int(client.get("bench-done") or 0) < n:
            time.sleep(0.02)
        w1, r1 = _cpu(worker.pid), _cpu(redis_pid)
    finally:
        worker.terminate()
        worker.wait(30)
    ms = 1000 / n
    return {"events": events, "pool": pool, "n": n, "worker_cpu_ms_per_task": round((w1 - w0) * ms, 2),
            "redis_cpu_ms_per_task": round((r1 - r0) * ms, 2), "send_cpu_ms_per_task": round(send * ms, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2, help="on/off alternations per pool (default 2)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="celery-events-"))
    (work / "benchapp.py").write_text(APP)
    port = _free_port()
    server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                               "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work)],
                              stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        url = f"redis://127.0.0.1:{port}/0"
        for pool in ("prefork", "threads"):
            for _ in range(args.rounds):
                for events in (True, False):
                    print(json.dumps(run_one(work, url, server.pid, events, pool, args.n)), flush=True)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
