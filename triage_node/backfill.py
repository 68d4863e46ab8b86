"""``triage-node backfill``: re-analyse an archive through DICOMweb.

QIDO-RS finds the studies (date range, modalities), their series (modality, body part) and instances; WADO-RS
retrieves each instance, which then passes the same ingest gate as a C-STORE (checks, spool, enqueue, audit), so
its results go to the configured destinations like any other.

Resumable without a date cursor: a durable done-set (sqlite) holds every SOP Instance UID the gate has answered
for good, and every run walks the whole range again, so an instance that arrives late in an old study is found by
the next run and nothing done is fetched twice. An instance whose gate answer was lost to an interruption (after
the enqueue, before the done-set write) is recognised by the broker's queued-marker and not queued twice.
Bounded: ``concurrency`` retrievals at once, at most ``rate_limit`` DICOMweb requests per second, and a pause while
the node's queue holds more than ``max_backlog`` tasks.

Study enumeration never pages a query that filters on ModalitiesInStudy: Orthanc (1.10, DICOMweb plugin 1.7)
answers such a query's second page (``offset`` = page size) with nothing, so an archive with more matching studies
than one page lost all but the first page, silently. A query whose first page comes back full is split into two date
ranges instead, down to single days. A day that still fills a page is paged by date alone, which Orthanc does
page correctly, and the modality is then checked at the series level, as it is for every study.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audit import has_entry
from .config import BackfillConfig
from .ingest import OUT_OF_RESOURCES, Ingest

log = logging.getLogger(__name__)
_STUDY, _SERIES, _SOP = "0020000D", "0020000E", "00080018"
_MODALITY, _BODY_PART = "00080060", "00180015"


def split_date_range(date_range: str) -> tuple[str, str] | None:
    """``YYYYMMDD-YYYYMMDD`` -> its two halves (by days); None for one day, an open range or anything else."""
    first, sep, last = date_range.partition("-")
    try:
        a, b = dt.datetime.strptime(first, "%Y%m%d").date(), dt.datetime.strptime(last, "%Y%m%d").date()
    except ValueError:
        return None
    if not sep or b <= a:
        return None
    mid = a + (b - a) // 2
    return f"{a:%Y%m%d}-{mid:%Y%m%d}", f"{mid + dt.timedelta(days=1):%Y%m%d}-{b:%Y%m%d}"


def _value(item: dict, tag: str) -> str:
    vals = item.get(tag, {}).get("Value") or [""]
    return str(vals[0])


class RateLimiter:
    """At most ``rate`` acquisitions per second across threads (0 = unlimited)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next = time.monotonic()
        self.lock = threading.Lock()
        self.count = 0

    def acquire(self) -> None:
        with self.lock:
            self.count += 1
            now = time.monotonic()
            at = max(self.next, now)
            self.next = at + self.interval
        if at > now:
            time.sleep(at - now)


class DoneSet:
    """SOP Instance UIDs the ingest gate has answered for good (received, skipped, refused), with the outcome."""

    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.db = sqlite3.connect(str(path), check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS done (sop TEXT PRIMARY KEY, study TEXT, outcome TEXT, ts REAL)")
        self.db.commit()

    def __contains__(self, sop: str) -> bool:
        with self.lock:
            return self.db.execute("SELECT 1 FROM done WHERE sop=?", (sop,)).fetchone() is not None

    def mark(self, sop: str, study: str, outcome: str) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO done VALUES (?, ?, ?, ?)", (sop, study, outcome, time.time()))
            self.db.commit()

    def __len__(self) -> int:
        with self.lock:
            return int(self.db.execute("SELECT COUNT(*) FROM done").fetchone()[0])


@dataclass
class Summary:
    studies: int = 0
    found: int = 0
    already_done: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    requests: int = 0
    wall_s: float = 0.0
    interrupted: bool = False

    @property
    def handled(self) -> int:
        return sum(v for k, v in self.outcomes.items() if k not in ("deferred", "error"))

    def lines(self, rate_limit: float) -> list[str]:
        wall = max(self.wall_s, 1e-9)
        out = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())) or "nothing new"
        first = (f"backfill{' (interrupted)' if self.interrupted else ''}: {self.found} instance(s) in "
                 f"{self.studies} study(ies); {self.already_done} already done; {out}")
        second = (f"backfill: {self.handled} in {self.wall_s:.1f} s = {self.handled / wall:.1f} inst/s, "
                  f"{self.bytes / wall / 1e6:.1f} MB/s, {self.requests} DICOMweb requests "
                  f"({self.requests / wall:.1f}/s, limit {rate_limit:g}/s)")
        return [first, second]


class Backfill:
    def __init__(self, cfg: BackfillConfig, ingest: Ingest, done: DoneSet, date_range: str = "",
                 limit: int | None = None, max_backlog: int = 0, progress: bool = True) -> None:
        self.cfg, self.ingest, self.done = cfg, ingest, done
        self.date_range, self.limit, self.max_backlog, self.progress = date_range, limit, max_backlog, progress
        self.rate = RateLimiter(cfg.rate_limit)
        self.local = threading.local()
        self.summary = Summary()
        self.stop = threading.Event()
        self.lock = threading.Lock()

    # -- DICOMweb, rate-limited, one client per thread ---------------------------------------------------------
    def _client(self) -> Any:
        if not hasattr(self.local, "client"):
            from .transport.senders import dicomweb_client

            self.local.client = dicomweb_client(self.cfg.url, self.cfg.username, self.cfg.password, self.cfg.token)
        return self.local.client

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        self.rate.acquire()
        return getattr(self._client(), method)(*args, **kwargs)

    def _paged(self, method: str, *args: Any, **kwargs: Any) -> Iterator[dict]:
        offset = 0
        while not self.stop.is_set():
            page = self._call(method, *args, offset=offset, limit=self.cfg.page_size, **kwargs) or []
            yield from page
            if len(page) < self.cfg.page_size:
                return
            offset += len(page)

    # -- enumeration ---------------------------------------------------------------------------------------------
    def studies(self) -> Iterator[str]:
        seen: set[str] = set()
        for modality in self.cfg.modalities:
            for uid in self._studies_with(modality, self.date_range):
                if uid and uid not in seen:
                    seen.add(uid)
                    yield uid

    def _studies_with(self, modality: str, date_range: str) -> Iterator[str]:
        """Study UIDs in ``date_range`` with a series of ``modality``, without paging a ModalitiesInStudy query."""
        filters = {"ModalitiesInStudy": modality} | ({"StudyDate": date_range} if date_range else {})
        page = self._call("search_for_studies", search_filters=filters, fields=["StudyInstanceUID"],
                          limit=self.cfg.page_size) or []
        if len(page) < self.cfg.page_size:  # complete in one page: no offset needed
            yield from (_value(item, _STUDY) for item in page)
            return
        halves = split_date_range(date_range)
        if halves:
            for half in halves:
                yield from self._studies_with(modality, half)
            return
        # one day (or an open range) with a full page: page by date only; instances() checks the modality
        log.info("backfill: %s studies on %s fill a page; enumerating by date alone", modality, date_range or "all")
        by_date = {"StudyDate": date_range} if date_range else {}
        for item in self._paged("search_for_studies", search_filters=by_date, fields=["StudyInstanceUID"]):
            yield _value(item, _STUDY)

    def instances(self, study: str) -> Iterator[tuple[str, str]]:
        """(series, SOP Instance UID) of the study's wanted series, each once (Orthanc's QIDO answers one series
        row per instance when asked for a non-index attribute such as BodyPartExamined)."""
        wanted_parts = {b.upper() for b in self.cfg.body_parts}
        series_seen: set[str] = set()
        sops_seen: set[str] = set()
        for series in self._paged("search_for_series", study_instance_uid=study,
                                  fields=["Modality", "BodyPartExamined"]):
            series_uid = _value(series, _SERIES)
            if not series_uid or series_uid in series_seen:
                continue
            if _value(series, _MODALITY) not in self.cfg.modalities:
                continue
            if wanted_parts and _value(series, _BODY_PART).upper() not in wanted_parts:
                continue
            series_seen.add(series_uid)
            for inst in self._paged("search_for_instances", study_instance_uid=study,
                                    series_instance_uid=series_uid, fields=["SOPInstanceUID"]):
                sop = _value(inst, _SOP)
                if sop and sop not in sops_seen:
                    sops_seen.add(sop)
                    yield series_uid, sop

    # -- one instance --------------------------------------------------------------------------------------------
    def _wait_for_backlog(self) -> None:
        client = getattr(self.ingest.submit, "client", None)
        if not self.max_backlog or client is None:
            return
        queue = self.ingest.cfg.broker.infer_queue
        while not self.stop.is_set() and client.llen(queue) > self.max_backlog:
            time.sleep(0.5)

    def one(self, study: str, series: str, sop: str) -> str:
        """Retrieve one instance and pass it through the ingest gate; returns the outcome recorded."""
        is_queued = getattr(self.ingest.submit, "is_queued", None)
        if is_queued is not None and is_queued(sop):  # handed over by a run interrupted before its done-set write
            self._recover_audit(study, sop)
            self.done.mark(sop, study, "received")
            return "already queued"
        self._wait_for_backlog()
        ds = self._call("retrieve_instance", study, series, sop)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        with self.lock:
            self.summary.bytes += buf.tell()
        out = self.ingest.accept(ds, buf.getvalue, str(ds.SOPClassUID), sop, {"channel": "backfill"},
                                 str(ds.file_meta.TransferSyntaxUID))
        if out.status == OUT_OF_RESOURCES:
            return "deferred"  # disk or broker full or down: not done, the next run takes it
        self.done.mark(sop, study, out.event)
        return out.event

    def _recover_audit(self, study: str, sop: str) -> None:
        """The interrupted run may have died between the enqueue and its ``received`` audit line: write the line
        then, so the trail still holds exactly one ``received`` for every instance handed over."""
        trail = self.ingest.audit.path
        if trail is None or has_entry(trail, "received", sop):
            return
        self.ingest.audit.record("received", recovered=True, channel="backfill", sop_instance_uid=sop,
                                 study_instance_uid=study,
                                 reason="queued by an interrupted backfill run before its audit line was written")
        log.info("backfill: %s was queued by an interrupted run; its received line is written now", sop)

    def _finished(self, fut: Future, bar: Any) -> None:
        try:
            outcome = fut.result()
        except Exception as exc:
            log.warning("backfill: retrieve failed: %s", type(exc).__name__)
            outcome = "error"
        with self.lock:
            self.summary.outcomes[outcome] = self.summary.outcomes.get(outcome, 0) + 1
        if bar is not None:
            bar.update(1)

    # -- the run -------------------------------------------------------------------------------------------------
    def run(self) -> Summary:
        from tqdm import tqdm

        t0 = time.monotonic()
        bar = tqdm(total=0, unit="inst", disable=not self.progress, dynamic_ncols=True)
        pending: set[Future] = set()
        submitted = 0
        with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency), thread_name_prefix="backfill") as pool:
            try:
                for study in self.studies():
                    self.summary.studies += 1
                    for series, sop in self.instances(study):
                        self.summary.found += 1
                        if sop in self.done:
                            self.summary.already_done += 1
                            continue
                        if self.limit is not None and submitted >= self.limit:
                            self.stop.set()
                            break
                        bar.total += 1
                        bar.refresh()
                        while len(pending) >= 2 * max(1, self.cfg.concurrency):
                            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                            for f in finished:
                                self._finished(f, bar)
                        pending.add(pool.submit(self.one, study, series, sop))
                        submitted += 1
                    if self.stop.is_set():
                        break
            except KeyboardInterrupt:
                self.stop.set()
            finally:
                self.summary.interrupted = self.stop.is_set()
                if self.summary.interrupted:  # work not started yet stays for the next run
                    for f in pending:
                        f.cancel()
                finished, _ = wait(pending)
                for f in finished:
                    if not f.cancelled():
                        self._finished(f, bar)
        bar.close()
        self.summary.requests = self.rate.count
        self.summary.wall_s = time.monotonic() - t0
        return self.summary
