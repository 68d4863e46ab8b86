"""Audit write benchmark: the group-committing, rotating ``Audit`` vs the writer it replaced (one open + O_APPEND write
+ close per line under a process-wide lock), side by side in one run, as ratios.

Threads stand for the receiver's concurrent associations; each ``record`` returns only once its line is in the file
(both writers). With ``--fsync`` both force each write to disk (the baseline one fsync per line, ours one per batch).
Usage:
    .venv/bin/python bench/audit_write.py [--threads 1 4 16] [--lines 2000] [--fsync]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from triage_node.audit import Audit


class OldAudit:
    """The writer before rotation and group commit (triage_node/audit.py up to commit 7bb7020)."""

    _lock = threading.Lock()

    def __init__(self, path: Path, fsync: bool) -> None:
        self.path, self.fsync = path, fsync

    def record(self, event: str, **fields) -> None:
        line = (json.dumps({"ts": round(time.time(), 3), "event": event, "pid": os.getpid(), **fields}) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
                if self.fsync:
                    os.fdatasync(fd)
            finally:
                os.close(fd)


def run(writer, threads: int, lines: int) -> float:
    """Lines per second with ``threads`` threads each recording ``lines`` lines."""
    barrier = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        barrier.wait()
        for i in range(lines):
            writer.record("received", sop_instance_uid=f"1.2.826.0.1.{t}.{i}", ms=3.1, channel="dimse")

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join()
    return threads * lines / (time.perf_counter() - t0)


def main(args: argparse.Namespace) -> None:
    print(f"audit writes, {args.lines} lines per thread, fsync={'on' if args.fsync else 'off'}")
    print(f"{'threads':>8} {'old lines/s':>12} {'new lines/s':>12} {'new/old':>8}")
    for threads in args.threads:
        with tempfile.TemporaryDirectory() as d:
            old = run(OldAudit(Path(d) / "old.jsonl", args.fsync), threads, args.lines)
            new = run(Audit(Path(d) / "new.jsonl", fsync=args.fsync), threads, args.lines)
            n_old = sum(1 for _ in open(Path(d) / "old.jsonl", "rb"))
            n_new = sum(1 for _ in open(Path(d) / "new.jsonl", "rb"))
            assert n_old == n_new == threads * args.lines, (n_old, n_new)
        print(f"{threads:>8} {old:>12.0f} {new:>12.0f} {new / old:>8.2f}x")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--lines", type=int, default=2000)
    p.add_argument("--fsync", action="store_true")
    return p


if __name__ == "__main__":
    main(get_args_parser().parse_args())
