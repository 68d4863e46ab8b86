"""QIDO-RS/WADO-RS pull mode for a PACS that cannot push: fetch each new CR/DX instance exactly once.

QIDO-RS has no "received since" key, so no date checkpoint can see an instance that reaches the PACS after its
Study Date was passed. Instead the pull never advances a checkpoint: the durable seen-set of SOP Instance UIDs (sqlite,
one commit per instance) decides what is new, and two queries feed it:

* every poll, a **look-back window**: ``StudyDate >= today - lookback_days`` (today's and recent films, fast);
* every ``sweep_interval_s``, a **sweep** without a date bound (or from ``since``): late arrivals for any older date
  and instances without a Study Date (Type 2, often empty in real archives), which a date range never matches.

On a fresh state without ``since``, the first complete sweep takes what the archive holds before the first poll's
window (older Study Date, or none) as a baseline (recorded as seen, never fetched): the node starts with recent work,
not the whole archive. The horizon stays the first poll's window even if that sweep only completes days later.
Everything stored in the PACS after that is fetched, whatever its Study Date. With ``since`` set, the sweep fetches
everything from that date on (a backfill) and no baseline is taken.

An instance is marked seen only after the ingest gate took it (spooled and queued, skipped, or refused for good);
0xA700 (disk or broker trouble) leaves it unmarked for the next poll. A crash between the gate and the mark makes the
next poll fetch it again: the gate then finds it still pending in the spool and does not queue it twice.
"""

from __future__ import annotations

import io
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from ..config import PullConfig
from ..ingest import OUT_OF_RESOURCES, Ingest

log = logging.getLogger(__name__)
PAGE = 100
#: Retrieval failures (404 after a deletion, unparseable bytes) before an instance is given up (logged, marked).
MAX_TRIES = 5
_FIELDS = {"study": "0020000D", "series": "0020000E", "sop": "00080018", "date": "00080020"}


class PullState:
    """The seen-set (``seen``: SOP Instance UID, when, how) and a few checkpoints (``meta``), in sqlite."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (sop TEXT PRIMARY KEY, ts REAL)")
        if "how" not in {r[1] for r in self.db.execute("PRAGMA table_info(seen)")}:
            self.db.execute("ALTER TABLE seen ADD COLUMN how TEXT DEFAULT 'fetched'")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
        self.db.execute("CREATE TABLE IF NOT EXISTS tries (sop TEXT PRIMARY KEY, n INTEGER)")
        self.db.commit()

    def seen(self, sop: str) -> bool:
        return self.db.execute("SELECT 1 FROM seen WHERE sop=?", (sop,)).fetchone() is not None

    def mark(self, sop: str, how: str = "fetched") -> None:
        self.mark_many([sop], how)

    def mark_many(self, sops: list[str], how: str) -> None:
        now = time.time()
        self.db.executemany("INSERT OR IGNORE INTO seen VALUES (?, ?, ?)", [(s, now, how) for s in sops])
        self.db.executemany("DELETE FROM tries WHERE sop=?", [(s,) for s in sops])
        self.db.commit()

    def failed(self, sop: str) -> int:
        self.db.execute("INSERT INTO tries VALUES (?, 1) ON CONFLICT(sop) DO UPDATE SET n = n + 1", (sop,))
        self.db.commit()
        return int(self.db.execute("SELECT n FROM tries WHERE sop=?", (sop,)).fetchone()[0])

    def get(self, key: str, default: str = "") -> str:
        row = self.db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return row[0] if row else default

    def put(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        self.db.commit()

    def count(self, how: str | None = None) -> int:
        if how is None:
            return int(self.db.execute("SELECT COUNT(*) FROM seen").fetchone()[0])
        return int(self.db.execute("SELECT COUNT(*) FROM seen WHERE how=?", (how,)).fetchone()[0])


class Puller:
    """Polls QIDO-RS (window every poll, sweep every ``sweep_interval_s``) and ingests the instances not yet seen."""

    def __init__(self, cfg: PullConfig, ingest: Ingest, state_path: Path) -> None:
        self.cfg, self.ingest, self.state = cfg, ingest, PullState(state_path)
        self._stop = threading.Event()

    def _client(self):
        from .senders import dicomweb_client

        return dicomweb_client(self.cfg.url, self.cfg.username, self.cfg.password, self.cfg.token)

    def _hits(self, client, filters: dict[str, str]) -> Iterator[dict[str, str]]:
        for modality in self.cfg.modalities:
            offset = 0
            while True:
                page = client.search_for_instances(search_filters={"Modality": modality, **filters}, offset=offset,
                                                   limit=PAGE, fields=["StudyInstanceUID", "SeriesInstanceUID",
                                                                       "SOPInstanceUID", "StudyDate"])
                if not page:
                    break
                offset += len(page)
                for hit in page:
                    yield {k: str((hit.get(tag, {}).get("Value") or [""])[0]) for k, tag in _FIELDS.items()}

    def _pass(self, client, filters: dict[str, str], budget: int, baseline_before: str | None) -> tuple[int, bool]:
        """Fetch the unseen hits of one query. Returns (instances ingested, query completed with nothing left)."""
        n, complete, baseline = 0, True, []
        try:
            for hit in self._hits(client, filters):
                sop = hit["sop"]
                if not sop or self.state.seen(sop):
                    continue
                if baseline_before is not None and (not hit["date"] or hit["date"] < baseline_before):
                    baseline.append(sop)
                    if len(baseline) >= PAGE:
                        self.state.mark_many(baseline, "baseline")
                        baseline = []
                    continue
                if n >= budget or self._stop.is_set():
                    return n, False
                if self._ingest_one(client, hit):
                    n += 1
                else:
                    complete = False
        finally:
            if baseline:
                self.state.mark_many(baseline, "baseline")
        return n, complete

    def poll_once(self) -> int:
        """One poll (window, then the sweep when due); returns how many instances went to the ingest gate."""
        client = self._client()
        window = (date.today() - timedelta(days=self.cfg.lookback_days)).strftime("%Y%m%d")
        horizon = self.state.get("horizon")  # the window of the very first poll: the baseline is what lies before it
        if not horizon:
            self.state.put("horizon", window)
            horizon = window
        n, _ = self._pass(client, {"StudyDate": f"{window}-"}, self.cfg.max_per_poll, None)
        last = float(self.state.get("sweep_ts", "0") or 0)
        if n < self.cfg.max_per_poll and time.time() - last >= self.cfg.sweep_interval_s:
            started = time.time()
            first = not self.cfg.since and not self.state.get("baseline_done")
            filters = {"StudyDate": f"{self.cfg.since}-"} if self.cfg.since else {}
            k, complete = self._pass(client, filters, self.cfg.max_per_poll - n, horizon if first else None)
            n += k
            if complete:
                self.state.put("sweep_ts", repr(started))
                if first:
                    self.state.put("baseline_done", "1")
                    log.info("pull: baseline taken, %d instance(s) already in the archive left alone",
                             self.state.count("baseline"))
        return n

    def _ingest_one(self, client, hit: dict[str, Any]) -> bool:
        sop = hit["sop"]
        try:
            ds = client.retrieve_instance(hit["study"], hit["series"], sop)
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
        except Exception as exc:  # deleted since the query, or bytes pydicom cannot write back
            tries = self.state.failed(sop)
            log.warning("pull: retrieve %s failed (%s), try %d/%d", sop, type(exc).__name__, tries, MAX_TRIES)
            if tries >= MAX_TRIES:
                log.error("pull: giving up on %s after %d failed retrievals", sop, tries)
                self.ingest.audit.record("failed", sop_instance_uid=sop, stage="pull", channel="wado-rs-pull",
                                         reason=f"WADO-RS retrieve failed {tries} times ({type(exc).__name__})")
                self.state.mark(sop, "gave_up")
            return False
        out = self.ingest.accept(ds, buf.getvalue, str(ds.get("SOPClassUID", "")), sop, {"channel": "wado-rs-pull"},
                                 str(ds.file_meta.TransferSyntaxUID))
        if out.status == OUT_OF_RESOURCES:
            return False  # disk or broker trouble: not marked, fetched again next poll
        self.state.mark(sop)  # accepted, skipped or refused for good: never fetched again
        return True

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as exc:  # the PACS being down must not kill the node
                log.warning("pull: poll failed: %s", type(exc).__name__)
            self._stop.wait(self.cfg.interval_s)

    def start(self) -> Puller:
        threading.Thread(target=self.run, name="dicomweb-pull", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
