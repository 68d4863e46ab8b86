"""What the dashboard and /metrics show, derived at request time from the audit trail, Redis and the spool.

The audit trail is read incrementally (file and byte offset kept), so everything works across processes: receiver,
workers and ``triage-node replay`` all append to it. Rotation is followed: the rest of the file being read is taken
from its rotated copy, then any files rotated since, then the new active file; a fresh reader counts every retained
file. A truncated file, or one pruned before it was read to the end, makes the reader count the retained trail again.
Only UIDs, accession numbers, reasons and numbers are kept, never patient demographics.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter, OrderedDict, deque
from pathlib import Path
from typing import IO, Any

from .. import audit as audit_mod

log = logging.getLogger(__name__)

#: Histogram bucket upper bounds in seconds (stage durations range from ms to minutes).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: stage label -> (audit event, field, factor to seconds)
STAGES = {"receive": ("received", "ms", 0.001), "analyse": ("analysed", "ms", 0.001),
          "sr_delivered": ("sr_sent", "latency_s", 1.0), "end_to_end": ("sent", "latency_s", 1.0)}
#: Audit events counted per stage (analyze, build, send, reconcile) for /metrics and the dashboard.
FAILURE_EVENTS = ("failed", "retry", "dead_lettered")
MAX_STUDIES = 2000
WINDOW_S = 3600.0
CHUNK = 4 << 20


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        self.total += 1
        self.sum += v
        for i, b in enumerate(BUCKETS):
            if v <= b:
                self.counts[i] += 1

    def buckets(self) -> list[tuple[str, int]]:
        return [(repr(b), c) for b, c in zip(BUCKETS, self.counts)] + [("+Inf", self.total)]


def destination_of(reason: str) -> str:
    """Send-failure reasons start with ``<destination name>:``; several failures are joined by ``; ``."""
    head = (reason or "").split(";")[0]
    return head.split(":", 1)[0].strip() if ":" in head else "unknown"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class AuditState:
    """Cumulative counters + recent studies, fed by reading only the new bytes of the audit file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.offset, self.seg_name = 0, ""
        self.inode: int | None = None
        self.events: Counter = Counter()  # event -> n
        self.reasons: Counter = Counter()  # (event, reason) for skipped/refused/failed/dead_lettered/...
        self.send_failures: Counter = Counter()  # (destination, event) for retry/dead_lettered/replay_failed
        self.stage_failures: Counter = Counter()  # (stage, event) for failed/retry/dead_lettered
        self.hist = {stage: Histogram() for stage in STAGES}
        self.studies: OrderedDict[str, dict[str, Any]] = OrderedDict()  # SOP Instance UID -> row
        self.window: deque = deque()  # (ts, event, latency_s or None) for the last hour
        self.model: dict[str, Any] = {}  # last analysed line: model, hostname, ts
        self.model_by_host: dict[str, str] = {}
        self.last_model_error: float = 0.0
        self.last_analysed: float = 0.0

    def refresh(self) -> None:
        """Read what was appended since the last call, following rotations (every retained file is read once)."""
        with self.lock:
            segs = audit_mod.open_segments(self.path)
            try:
                if not segs:
                    if self.offset or self.inode is not None:
                        self._reset()
                    return
                start = self._resume_index(segs)
                if start is None:  # our file is gone (pruned) or was truncated: count the retained trail afresh
                    log.warning("audit trail %s: read position lost (file pruned or truncated); re-reading", self.path)
                    self._reset()
                    start = 0
                for i in range(start, len(segs)):
                    seg = segs[i]
                    if i > start or self.inode is None:  # a file not read before: from its start
                        self.offset = 0
                    self.inode, self.seg_name = seg.inode, seg.path.name
                    self._read(seg.file)
                    if i < len(segs) - 1:
                        # a rotated file never grows again; a torn tail (crash mid-write) is skipped for good
                        self.offset = os.fstat(seg.file.fileno()).st_size
            finally:
                for seg in segs:
                    seg.file.close()
            self._prune()

    def _resume_index(self, segs: list[audit_mod.Segment]) -> int | None:
        if self.inode is None:
            return 0
        for i, seg in enumerate(segs):
            # the active file keeps its inode when rotated; a rotated file keeps its name
            if seg.inode == self.inode and (seg.path.name == self.seg_name or self.seg_name == self.path.name):
                size = os.fstat(seg.file.fileno()).st_size
                return i if size >= self.offset else None
        return None

    def _read(self, f: IO[bytes]) -> None:
        size = os.fstat(f.fileno()).st_size
        while self.offset < size:  # bounded chunks: a large trail is not read into memory at once
            f.seek(self.offset)
            data = f.read(min(size - self.offset, CHUNK))
            if not data.endswith(b"\n"):
                data += f.readline()  # complete the last line (or reach the end of the file)
            end = data.rfind(b"\n") + 1  # a torn last line is read next time
            if end == 0:
                break
            self.offset += end
            for line in data[:end].splitlines():
                try:
                    e = json.loads(line)
                except ValueError:
                    continue
                if isinstance(e, dict) and "event" in e:
                    self._apply(e)

    def _apply(self, e: dict[str, Any]) -> None:
        ev, ts = str(e["event"]), float(e.get("ts", 0) or 0)
        self.events[ev] += 1
        reason = str(e.get("reason", ""))
        if ev in ("skipped", "refused", "failed", "dead_lettered", "replay_failed"):
            self.reasons[(ev, reason)] += 1
        if ev in ("retry", "dead_lettered", "replay_failed") and e.get("stage", "send") == "send":
            self.send_failures[(destination_of(reason), ev)] += 1
        if ev in FAILURE_EVENTS:  # lines from before stages were recorded: a retry or dead letter was a send's
            self.stage_failures[(str(e.get("stage") or ("analyze" if ev == "failed" else "send")), ev)] += 1
        for stage, (sev, key, factor) in STAGES.items():
            if ev == sev and isinstance(e.get(key), (int, float)) and not e.get("duplicate"):
                self.hist[stage].observe(float(e[key]) * factor)
        if ev in ("received", "sent", "shadow", "skipped", "refused", "dead_lettered", "failed"):
            self.window.append((ts, ev, e.get("latency_s") if ev == "sent" else None))
        if ev == "analysed":
            self.last_analysed = ts
            self.model = {"model": str(e.get("model", "")), "hostname": str(e.get("hostname", "")), "ts": ts}
            if e.get("hostname"):
                self.model_by_host[str(e["hostname"])] = str(e.get("model", ""))
        if ev == "failed" and reason.startswith("model:"):
            self.last_model_error = ts
        self._study(ev, ts, e, reason)

    def _study(self, ev: str, ts: float, e: dict[str, Any], reason: str) -> None:
        sop = e.get("sop_instance_uid")
        status = {"received": "received", "skipped": "skipped", "refused": "refused", "analysed": "analysed",
                  "sr_sent": "SR sent", "sent": "sent", "dead_lettered": "dead-lettered", "failed": "failed",
                  "replayed": "sent (replayed)", "shadow": "shadow"}.get(ev)  # shadow: archived, not sent
        if not sop or not status or (ev == "received" and e.get("duplicate") and sop in self.studies):
            return
        row = self.studies.pop(sop, None) or {"sop_instance_uid": sop, "study_instance_uid": "", "accession": "",
                                             "received_ts": ts, "positive": None, "probability": None}
        self.studies[sop] = row
        for key in ("study_instance_uid", "accession"):
            if e.get(key):
                row[key] = str(e[key])
        for key in ("positive", "probability", "boxes", "latency_s", "model"):
            if key in e:
                row[key] = e[key]
        row.update(status=status, updated_ts=ts, reason=reason if ev in ("skipped", "refused", "failed",
                                                                          "dead_lettered") else "")
        if len(self.studies) > MAX_STUDIES:
            self.studies.popitem(last=False)

    def _prune(self) -> None:
        cutoff = time.time() - WINDOW_S
        while self.window and self.window[0][0] < cutoff:
            self.window.popleft()

    def last_hour(self) -> dict[str, Any]:
        with self.lock:
            self._prune()
            counts = Counter(ev for _, ev, _ in self.window)
            lat = [float(x) for _, ev, x in self.window if ev == "sent" and isinstance(x, (int, float))]
        return {"counts": dict(counts), "results_per_hour": counts.get("sent", 0),
                "latency_s": {"n": len(lat), "p50": percentile(lat, 50), "p90": percentile(lat, 90),
                              "p95": percentile(lat, 95), "p99": percentile(lat, 99),
                              "max": max(lat) if lat else None}}

    def failures_by_stage(self) -> dict[str, dict[str, int]]:
        """``{stage: {"failed": n, "retry": n, "dead_lettered": n}}`` since the audit trail began."""
        with self.lock:
            counts = dict(self.stage_failures)
        out: dict[str, dict[str, int]] = {}
        for (stage, ev), n in sorted(counts.items()):
            out.setdefault(stage, dict.fromkeys(FAILURE_EVENTS, 0))[ev] = n
        return out

    def recent_studies(self, limit: int = 100) -> list[dict[str, Any]]:
        """Flagged results (positive, SR at the PACS) first, then everything else; newest first within each group."""
        with self.lock:
            rows = [dict(r) for r in reversed(self.studies.values())]
        for r in rows:
            r["flagged"] = bool(r.get("positive")) and (r["status"].startswith("sent") or r["status"] == "SR sent")
        rows.sort(key=lambda r: not r["flagged"])  # stable: keeps newest-first order inside each group
        return rows[:limit]
