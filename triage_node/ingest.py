"""Accepting one instance, whatever carried it (C-STORE, STOW-RS, the QIDO/WADO pull): header checks, spool,
enqueue, audit. Outcomes are DICOM status codes, which C-STORE and STOW-RS (PS3.18 failure reasons) share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from .audit import Audit
from .config import Config
from .dicom_io import ACCEPTED_SOP_CLASSES, check_eligible
from .errors import BadDataset, NotEligible, SpoolError
from .spool import Spool, valid_uid

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
Submit = Callable[[str, str, float], str]


@dataclass(frozen=True)
class Outcome:
    status: int
    reason: str = ""
    event: str = "received"  # received | skipped | refused

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


@dataclass
class IngestStats:
    received: int = 0
    skipped: int = 0
    refused: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class Ingest:
    """The one gate every instance passes. ``accept`` never raises for bad input: it returns the outcome."""

    def __init__(self, cfg: Config, spool: Spool, submit: Submit, audit: Audit) -> None:
        self.cfg, self.spool, self.submit, self.audit = cfg, spool, submit, audit
        self.stats = IngestStats()

    def _count(self, outcome: Outcome) -> Outcome:
        if outcome.event == "refused":
            self.stats.refused += 1
        elif outcome.event == "skipped":
            self.stats.skipped += 1
        else:
            self.stats.received += 1
        if outcome.reason:
            self.stats.reasons[outcome.reason] = self.stats.reasons.get(outcome.reason, 0) + 1
        return outcome

    def accept(self, ds: Dataset | None, encoded: Callable[[], bytes], sop_class_uid: str, sop_instance_uid: str,
               origin: dict[str, str], transfer_syntax: str = "") -> Outcome:
        """Check, spool and enqueue one instance. ``ds`` None means the dataset could not be parsed."""
        t0 = time.time()
        base = {"sop_instance_uid": sop_instance_uid if valid_uid(sop_instance_uid) else "(invalid)", **origin}

        def refuse(status: int, reason: str) -> Outcome:
            self.audit.record("refused", status=f"0x{status:04X}", reason=reason, **base)
            log.warning("refused %s (%s): %s", base["sop_instance_uid"], origin, reason)
            return self._count(Outcome(status, reason, "refused"))

        if sop_class_uid not in ACCEPTED_SOP_CLASSES:
            return refuse(SOP_CLASS_NOT_SUPPORTED, "SOP class not supported")
        if not valid_uid(sop_instance_uid):
            return refuse(CANNOT_UNDERSTAND, "invalid SOP Instance UID")
        if ds is None:
            return refuse(CANNOT_UNDERSTAND, "dataset cannot be parsed")
        if str(ds.get("SOPInstanceUID", "")) != sop_instance_uid:
            return refuse(DATASET_MISMATCH, "SOPInstanceUID differs from the request")
        if str(ds.get("SOPClassUID", "")) != sop_class_uid:
            return refuse(DATASET_MISMATCH, "SOPClassUID differs from the request")
        for key in ("StudyInstanceUID", "SeriesInstanceUID"):
            if not valid_uid(str(ds.get(key, ""))):
                return refuse(CANNOT_UNDERSTAND, f"invalid {key}")
        study = str(ds.StudyInstanceUID)
        try:
            check_eligible(ds, self.cfg.eligibility)
        except BadDataset as exc:
            return refuse(DATASET_MISMATCH, str(exc))
        except NotEligible as exc:
            self.audit.record("skipped", reason=str(exc), study_instance_uid=study, **base)
            log.info("skipped %s: %s", sop_instance_uid, exc)
            return self._count(Outcome(SUCCESS, str(exc), "skipped"))
        try:
            path, pending = self.spool.store(sop_instance_uid, encoded())
        except SpoolError as exc:
            return refuse(OUT_OF_RESOURCES, str(exc))
        except Exception as exc:  # encoding the received dataset failed
            return refuse(CANNOT_UNDERSTAND, f"dataset cannot be encoded: {type(exc).__name__}")
        extra = {"study_instance_uid": study, "accession": str(ds.get("AccessionNumber", "") or ""),
                 "transfer_syntax": transfer_syntax}
        is_queued = getattr(self.submit, "is_queued", None)
        if pending and is_queued is not None:
            try:
                pending = is_queued(sop_instance_uid)  # else: spooled by a receiver that died before enqueueing
            except SpoolError as exc:
                return refuse(OUT_OF_RESOURCES, str(exc))
        if pending:
            # Already spooled and queued: the bytes were replaced; the queued task picks up the newest copy.
            self.audit.record("received", duplicate=True, ms=round((time.time() - t0) * 1000, 1), **extra, **base)
            return self._count(Outcome(SUCCESS))
        try:
            task_id = self.submit(str(path), sop_instance_uid, t0)
        except Exception as exc:  # SpoolError (broker down or paused), or anything unforeseen: never acknowledge
            try:
                path.unlink()  # not acknowledged, so the sender keeps (and retries) it: strand nothing
            except FileNotFoundError:
                pass
            reason = str(exc) if isinstance(exc, SpoolError) else f"enqueue failed: {type(exc).__name__}"
            return refuse(OUT_OF_RESOURCES, reason)
        self.audit.record("received", task_id=task_id, ms=round((time.time() - t0) * 1000, 1), **extra, **base)
        return self._count(Outcome(SUCCESS))
