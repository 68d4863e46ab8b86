"""Backfill throughput beside a bare WADO-RS retrieve loop, in one run.

A private Orthanc (DICOMweb plugin) is loaded with ``--n`` copies of the shipped samples; then
1. the baseline: dicomweb-client retrieving every instance with ``--concurrency`` threads, nothing else;
2. ``triage-node backfill`` over the same archive (QIDO enumeration, retrieve, ingest gate: spool + enqueue + audit,
   done-set), no rate limit, into a private Redis (no workers: this measures the hand-over to the node).

    python bench/backfill.py --n 300 --concurrency 4
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from load import busy_warning  # noqa: E402  (bench/load.py)
from test_backfill import make_instances, upload  # noqa: E402

from triage_node.localpacs import LocalOrthanc  # noqa: E402
from triage_node.services import PrivateRedis  # noqa: E402
from triage_node.transport.senders import dicomweb_client  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args(argv)
    if busy_warning():
        print(busy_warning(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="backfill-bench-"))
    pacs = LocalOrthanc(work / "pacs").start()
    redis = PrivateRedis(work / "redis", persist=True).start()
    try:
        sops = make_instances(work / "in", args.n // 3, 3, "20240110")
        upload(pacs, work / "in")
        client = dicomweb_client(pacs.dicomweb_url)
        hits = client.search_for_instances(search_filters={"StudyDate": "20240101-20240131"}, limit=100000)
        triples = [tuple(h[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018")) for h in hits]
        assert len(triples) == len(sops)
        local = {}

        def fetch(t):
            import threading

            c = local.setdefault(threading.get_ident(), dicomweb_client(pacs.dicomweb_url))
            return c.retrieve_instance(*t)

        t0 = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(fetch, triples))
        bare = len(triples) / (time.monotonic() - t0)
        print(f"bare WADO-RS retrieve ({args.concurrency} threads): {bare:.1f} inst/s")
        cfg = work / "node.toml"
        cfg.write_text(f'audit_log = "{work}/audit.jsonl"\nlog_level = "WARNING"\n[spool]\ndirectory = "{work}/spool"\n'
                       f'max_disk_usage = 0.99\nreserve_mb = 0\n[broker]\nurl = "{redis.url}"\n'
                       f'[retry]\ndead_letter_dir = "{work}/dead"\n'
                       f'[backfill]\nurl = "{pacs.dicomweb_url}"\nconcurrency = {args.concurrency}\nrate_limit = 0.0\n')
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "triage_node.cli", "backfill", "--config", str(cfg), "--from",
                              "20240101", "--to", "20240131", "--no-progress", "--max-backlog", "0"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        wall = time.monotonic() - t0
        print(out, end="")
        print(f"backfill incl. process start: {len(sops) / wall:.1f} inst/s; ratio backfill / bare retrieve = "
              f"{len(sops) / wall / bare:.2f}x")
        return 0
    finally:
        redis.stop()
        pacs.stop()


if __name__ == "__main__":
    sys.exit(main())
