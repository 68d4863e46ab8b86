"""Ingest throughput of the node's receiver beside DCMTK, Orthanc and bare pynetdicom, in one run.

Starts a private Redis and ``triage-node serve`` (``--processes`` receiver processes on one port), then runs
``../shared/tools/ingest_anchor.sh`` with the node as its target, checks that every instance was spooled and queued,
and prints the anchor's lines plus the ratios the issue asks for::

    python bench/ingest.py --n 400 --assoc 1 --processes 1
    python bench/ingest.py --n 400 --assoc 4 --processes 2

Timed figures are only worth reporting on an otherwise idle machine (see ``BENCH_BUSY_LOCK`` in load.py).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from load import busy_warning  # noqa: E402  (bench/load.py)

from triage_node.services import PrivateRedis, free_port, wait_port  # noqa: E402

ANCHOR = ROOT.parent / "shared" / "tools" / "ingest_anchor.sh"


def write_config(path: Path, work: Path, port: int, broker: str, processes: int, balance: str) -> None:
    path.write_text(f"""audit_log = "{work}/audit.jsonl"
log_level = "WARNING"
[receiver]
ae_title = "TRIAGE"
port = {port}
processes = {processes}
balance = "{balance}"
max_associations_per_address = 0
[spool]
directory = "{work}/spool"
max_disk_usage = 0.99
reserve_mb = 0
[broker]
url = "{broker}"
[retry]
dead_letter_dir = "{work}/dead"
""")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--assoc", type=int, default=1)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--balance", choices=["shared", "reuseport"], default="shared")
    args = ap.parse_args(argv)
    if busy_warning():
        print(busy_warning(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    redis = PrivateRedis(work / "redis", persist=True).start()  # append-only, as `triage-node up` runs it
    port = free_port()
    cfg = work / "node.toml"
    write_config(cfg, work, port, redis.url, args.processes, args.balance)
    node = subprocess.Popen([sys.executable, "-m", "triage_node.cli", "serve", "--config", str(cfg)], cwd=ROOT,
                            stdout=open(work / "serve.log", "wb"), stderr=subprocess.STDOUT)
    try:
        assert wait_port("127.0.0.1", port, 60), (work / "serve.log").read_text()
        time.sleep(3.0)  # the pool's other processes import and start
        out = subprocess.run(["bash", str(ANCHOR), str(args.n), sys.executable, "TRIAGE", str(port)],
                             env={"ASSOC": str(args.assoc), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
                             capture_output=True, text=True, check=True).stdout
        print(out, end="")
        rates = {m[1]: float(m[2])
                 for m in re.finditer(r"^(\S+) \(\d+ assoc\): .* = ([\d.]+) inst/s", out, re.MULTILINE)}
        spooled = len(list((work / "spool" / "instances").glob("*.dcm")))
        import redis as redis_mod

        queued = redis_mod.Redis.from_url(redis.url).llen("infer")
        target = rates.get("target_TRIAGE", 0.0)
        print(f"node: processes={args.processes} ({args.balance}), {args.assoc} association(s): "
              f"spooled {spooled}/{args.n}, queued {queued}/{args.n}")
        got = dict(re.findall(r"(dcmtk|orthanc_files|pynetdicom)=(\d+)", out))
        for peer, key in (("pynetdicom_bare", "pynetdicom"), ("orthanc", "orthanc_files"), ("dcmtk_storescp", "dcmtk")):
            if int(got.get(key, 0)) < args.n:  # a baseline that started late answered nothing: its rate is void
                print(f"WARNING: {peer} received {got.get(key)} of {args.n}: its ratio is not valid")
            elif rates.get(peer):
                print(f"ratio node / {peer} = {target / rates[peer]:.2f}x")
        return 0 if spooled == queued == args.n else 1
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
