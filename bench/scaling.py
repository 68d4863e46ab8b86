"""Scaling of the real node: results/s with 1 vs 2 inference worker processes, side by side, and what one CXR costs
the broker (Redis commands and bytes, from INFO commandstats / INFO stats over the burst).

For each worker count k the script starts a private redis-server, ``triage-node serve`` (the receiver, in its own
directory), one report worker (threads) and k inference workers (``celery -A workers.app worker -Q infer``, one
prefork child each: k processes, as k containers or k hosts would run them). With ``--mode http`` (default) the
workers run in another directory with their own spool, audit and dead-letter folders and fetch every instance from
the receiver's instance server (``[instances]``), as workers on other hosts do; ``--mode shared`` is the single-host
layout (one spool). Each inference worker is warmed up (model loaded) first; then ``--n`` unique instances are
C-STOREd over ``--assocs`` associations as fast as the receiver takes them, and results/s = n / (first C-STORE ->
last result delivered, from the workers' audit ``sent`` lines). Results go to a folder destination.

    .venv/bin/python bench/scaling.py --n 200                 # the docs/scaling.md table (an idle machine!)
    .venv/bin/python bench/scaling.py --n 200 --mode shared   # the single-host layout
    .venv/bin/python bench/scaling.py --n 4 --workers 1 2     # smoke run (seconds of work, figures meaningless)

Figures are only worth something on an otherwise idle machine; on a host with C cores, k inference processes
compete with the receiver, the report worker and Redis for them (docs/scaling.md discusses where each saturates).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import write_config  # noqa: E402  (bench/load.py)

SAMPLES = sorted((ROOT / "sample_dicom").glob("*.dcm"))
TOKEN = "bench-token"
OUT = ROOT / "test-artifacts" / "performance"


def make_datasets(n: int, offset: int):
    """n unique instances (new SOP/Study/Series UIDs), each parsed afresh from one of the RSNA samples."""
    import io

    import pydicom
    from pydicom.uid import generate_uid

    raw = [p.read_bytes() for p in SAMPLES]
    out = []
    for i in range(n):
        ds = pydicom.dcmread(io.BytesIO(raw[(i + offset) % len(raw)]))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        out.append(ds)
    if len({str(d.SOPInstanceUID) for d in out}) != n:
        raise SystemExit("instances are not unique")
    return out


def c_store_all(port: int, datasets, assocs: int) -> list[int]:
    """C-STORE the datasets over ``assocs`` concurrent associations; returns the statuses."""
    from pynetdicom import AE

    statuses: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    from triage_node.transport.scu import guard_responses

    def one(part) -> None:
        ae = AE(ae_title="BENCHSCU")
        for sop, ts in sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in part}):
            ae.add_requested_context(sop, [ts])
        assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
        if not assoc.is_established:
            errors.append("association refused by the node")
            return
        guard_responses(assoc)  # pynetdicom's requestor race (triage_node/transport/scu.py)
        try:
            got = [int(assoc.send_c_store(d).Status) for d in part]
        finally:
            assoc.release()
        with lock:
            statuses.extend(got)

    parts = [datasets[i::assocs] for i in range(assocs)]
    threads = [threading.Thread(target=one, args=(p,)) for p in parts if p]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(errors[0])
    return statuses


class Node:
    """Receiver + report worker + k inference workers + a private Redis, in ``work``."""

    def __init__(self, work: Path, k: int, mode: str, model: str, device: str) -> None:
        from triage_node.services import PrivateRedis, free_port

        self.work, self.k, self.mode = work, k, mode
        self.recv_dir = work / "recv"
        self.work_dir = work / "workers" if mode == "http" else self.recv_dir
        self.recv_dir.mkdir(parents=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.redis = PrivateRedis(work / "redis", persist=False).start()
        self.port, self.http_port = free_port(), free_port()
        common = {"log_level": "WARNING", "audit_log": "var/audit.jsonl",
                  "spool": {"directory": "var/spool", "max_disk_usage": 1.0, "reserve_mb": 0},  # guard off
                  "broker": {"url": self.redis.url, "visibility_timeout": 900},
                  "retry": {"max_attempts": 5, "backoff_base_s": 0.5, "backoff_max_s": 5.0,
                            "dead_letter_dir": "var/dead-letter"},
                  "model": {"path": model, "device": device},
                  "outputs": {"sr": True, "sc": True, "gsps": False, "archive_dir": ""},
                  "destinations": [{"name": "folder", "kind": "folder", "path": str(work / "pacs-folder")}],
                  "web": {"enabled": False},
                  "receiver": {"ae_title": "TRIAGE", "port": self.port, "allowed_calling_aets": ["BENCHSCU"],
                               "max_associations": 16}}
        if mode == "http":
            common["instances"] = {"url": f"http://127.0.0.1:{self.http_port}", "port": self.http_port,
                                   "token": TOKEN}
        write_config(self.recv_dir / "node.toml", common)
        if mode == "http":
            write_config(self.work_dir / "node.toml", {k_: v for k_, v in common.items() if k_ != "instances"})
        self.procs: list[subprocess.Popen] = []

    def _spawn(self, cwd: Path, args: list[str], name: str, **env: str) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "ab")
        p = subprocess.Popen(args, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "TRIAGE_CONFIG": str(cwd / "node.toml"), **env})
        self.procs.append(p)
        return p

    def start(self) -> Node:
        from triage_node.services import wait_port

        self.recv = self._spawn(self.recv_dir, [sys.executable, "-m", "triage_node.cli", "serve"], "receiver")
        env = {"TRIAGE_INSTANCES_TOKEN": TOKEN} if self.mode == "http" else {}
        worker = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "--without-gossip",
                  "--without-mingle", "--loglevel=WARNING"]
        self._spawn(self.work_dir, worker + ["-Q", "report", "-n", "report@%h", "--pool=threads",
                                             "--concurrency=4"], "worker-report", **env)
        for i in range(self.k):
            self._spawn(self.work_dir, worker + ["-Q", "infer", "-n", f"infer{i}@%h", "--pool=prefork",
                                                 "--concurrency=1"], f"worker-infer{i}", **env)
        if not wait_port("127.0.0.1", self.port, 90):
            self.stop()
            raise SystemExit("receiver did not start:\n" + (self.work / "receiver.log").read_text()[-3000:])
        return self

    def audit(self) -> list[dict]:
        from triage_node.audit import read

        return read(self.work_dir / "var" / "audit.jsonl")

    def wait_sent(self, sops: set[str], timeout: float) -> list[dict]:
        deadline = time.time() + timeout
        sent: list[dict] = []
        while time.time() < deadline:
            sent = [e for e in self.audit() if e["event"] == "sent" and e["sop_instance_uid"] in sops]
            if {e["sop_instance_uid"] for e in sent} >= sops:
                return sent
            time.sleep(0.2)
        raise SystemExit(f"only {len(sent)} of {len(sops)} results after {timeout:.0f} s; logs in {self.work}")

    def warm_up(self, timeout: float) -> None:
        """Until every inference process has analysed at least one instance (model loaded in each)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            ds = make_datasets(2 * self.k, 0)
            if any(c_store_all(self.port, ds, 1)):
                raise SystemExit(f"warm-up: C-STORE refused; see {self.work}")
            self.wait_sent({str(d.SOPInstanceUID) for d in ds}, timeout)
            hosts = {e.get("hostname") for e in self.audit() if e["event"] == "analysed"}
            if len(hosts) >= self.k:
                return
        raise SystemExit("warm-up: not every inference worker took a task")

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
        self.redis.stop()


def broker_counters(url: str) -> dict:
    import redis

    c = redis.Redis.from_url(url)
    stats = c.info("commandstats")
    net = c.info("stats")
    return {"calls": {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()},
            "in": int(net["total_net_input_bytes"]), "out": int(net["total_net_output_bytes"])}


def delta(after: dict, before: dict) -> dict:
    calls = {k: n - before["calls"].get(k, 0) for k, n in after["calls"].items()}
    return {"calls": {k: n for k, n in sorted(calls.items()) if n > 0}, "in": after["in"] - before["in"],
            "out": after["out"] - before["out"]}


def run_one(k: int, args, base: Path) -> dict:
    work = base / f"workers{k}-{args.mode}"
    node = Node(work, k, args.mode, args.model, args.device).start()
    try:
        node.warm_up(args.timeout)
        datasets = make_datasets(args.n, 1)
        sops = {str(d.SOPInstanceUID) for d in datasets}
        r0 = broker_counters(node.redis.url)
        r1 = broker_counters(node.redis.url)
        own = delta(r1, r0)  # what one reading of the counters itself adds (INFO replies are kilobytes)
        time.sleep(args.idle)  # the clock-driven commands of idle workers, to subtract from the burst's
        idle = delta(broker_counters(node.redis.url), r1)
        idle["in"], idle["out"] = max(idle["in"] - own["in"], 0), max(idle["out"] - own["out"], 0)
        before = broker_counters(node.redis.url)
        t0 = time.time()
        statuses = c_store_all(node.port, datasets, args.assocs)
        t_stored = time.time()
        sent = node.wait_sent(sops, args.timeout)
        t_end = max(e["ts"] for e in sent)
        burst = delta(broker_counters(node.redis.url), before)
        wall = max(t_end - t0, 1e-6)
        lat = sorted(e["latency_s"] for e in sent)
        by_worker: dict[str, int] = {}
        for e in node.audit():
            if e["event"] == "analysed" and e["sop_instance_uid"] in sops:
                by_worker[e.get("hostname", "?")] = by_worker.get(e.get("hostname", "?"), 0) + 1
        per_s = {c: n / args.idle for c, n in idle["calls"].items()} if args.idle else {}
        clock = {c: per_s.get(c, 0.0) * wall for c in burst["calls"]}
        per_cxr = {c: round(max(n - clock.get(c, 0.0), 0.0) / args.n, 2) for c, n in burst["calls"].items()
                   if c not in ("info", "config")}  # INFO is this script reading the counters
        idle_bytes = {d: idle[d] / args.idle * wall if args.idle else 0.0 for d in ("in", "out")}
        return {"workers": k, "mode": args.mode, "n": args.n, "refused": sum(s != 0 for s in statuses),
                "results_per_s": args.n / wall, "wall_s": wall, "store_s": t_stored - t0,
                "latency_p50_s": statistics.median(lat), "latency_max_s": lat[-1],
                "analysed_by_worker": by_worker,
                "redis_calls_per_cxr": per_cxr, "redis_calls_total": burst["calls"],
                "redis_in_bytes_per_cxr": max(burst["in"] - own["in"] - idle_bytes["in"], 0) / args.n,
                "redis_out_bytes_per_cxr": max(burst["out"] - own["out"] - idle_bytes["out"], 0) / args.n,
                "idle_calls_per_s": {c: round(v, 2) for c, v in per_s.items()}}
    finally:
        node.stop()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="instances per burst")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="inference worker processes to compare")
    p.add_argument("--mode", choices=["http", "shared"], default="http",
                   help="http: workers fetch from the receiver (no shared filesystem); shared: one spool")
    p.add_argument("--assocs", type=int, default=2, help="concurrent C-STORE associations")
    p.add_argument("--model", default="", help="model package ('' = the shipped demo model, 'untrained')")
    p.add_argument("--device", default="cpu")
    p.add_argument("--idle", type=float, default=3.0, help="seconds of idle broker traffic measured before the burst")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, audit trails)")
    return p


def main(args) -> int:
    base = Path(tempfile.mkdtemp(prefix="triage-scaling-"))
    rows = []
    try:
        for k in args.workers:
            print(f"[scaling] {k} inference worker process(es), mode {args.mode}, n={args.n} ...", file=sys.stderr,
                  flush=True)
            rows.append(run_one(k, args, base))
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(base, ignore_errors=True)
    first = rows[0]["results_per_s"]
    print(f"\nmode {args.mode}, n = {args.n}, {os.cpu_count()} CPUs, model {args.model or 'demo'} on {args.device}")
    print(f"{'infer workers':>13} | {'results/s':>9} | {'ratio':>5} | {'p50 latency s':>13} | {'Redis cmds/CXR':>14} | "
          f"{'Redis in B/CXR':>14} | {'Redis out B/CXR':>15} | analysed per worker")
    for r in rows:
        print(f"{r['workers']:>13} | {r['results_per_s']:>9.2f} | {r['results_per_s'] / first:>5.2f} | "
              f"{r['latency_p50_s']:>13.2f} | {sum(r['redis_calls_per_cxr'].values()):>14.1f} | "
              f"{r['redis_in_bytes_per_cxr']:>14.0f} | {r['redis_out_bytes_per_cxr']:>15.0f} | "
              f"{'/'.join(str(n) for _, n in sorted(r['analysed_by_worker'].items()))}")
    print("\nRedis commands per CXR (burst minus the idle rate of clock-driven polling):")
    print("  " + ", ".join(f"{c} {n}" for c, n in rows[-1]["redis_calls_per_cxr"].items() if n))
    refused = sum(r["refused"] for r in rows)
    if refused:
        print(f"WARNING: {refused} C-STORE(s) refused: figures count fewer instances than sent")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"scaling-{args.mode}.json").write_text(json.dumps(rows, indent=2))
    print(f"(written to {OUT / f'scaling-{args.mode}.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
