"""The C-STORE receiver: a pynetdicom Storage SCP with C-ECHO.

The store handler spools the encoded bytes atomically, enqueues a task, and only then answers 0x0000. It reads the
header (never the pixels) to refuse instances that cannot be valid and to record non-CXRs as skipped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from ..audit import Audit
from ..config import Config
from ..dicom_io import ACCEPTED_SOP_CLASSES, check_eligible
from ..errors import BadDataset, NotEligible, SpoolError
from ..spool import Spool, valid_uid
from .tls import server_context

log = logging.getLogger(__name__)

ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]

# DIMSE C-STORE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122
Submit = Callable[[str, str, float], str]


@dataclass
class ReceiverStats:
    received: int = 0
    skipped: int = 0
    refused: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def _refuse(status: int, reason: str) -> Dataset:
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = reason[:64]
    return rsp


def handle_store(event: evt.Event, cfg: Config, spool: Spool, submit: Submit, audit: Audit,
                 stats: ReceiverStats) -> int | Dataset:
    """Spool + enqueue one instance; every outcome is a DIMSE status plus an audit line with its reason."""
    t0 = time.time()
    req = event.request
    sop_uid = str(req.AffectedSOPInstanceUID or "")
    calling = event.assoc.requestor.ae_title
    base = {"sop_instance_uid": sop_uid if valid_uid(sop_uid) else "(invalid)", "calling_ae": calling}

    def refuse(status: int, reason: str) -> Dataset:
        stats.refused += 1
        stats.reasons[reason] = stats.reasons.get(reason, 0) + 1
        audit.record("refused", status=f"0x{status:04X}", reason=reason, **base)
        log.warning("refused %s from %s: %s", base["sop_instance_uid"], calling, reason)
        return _refuse(status, reason)

    if str(req.AffectedSOPClassUID) not in ACCEPTED_SOP_CLASSES:
        return refuse(SOP_CLASS_NOT_SUPPORTED, "SOP class not supported")
    if not valid_uid(sop_uid):
        return refuse(CANNOT_UNDERSTAND, "invalid SOP Instance UID")
    try:
        ds = event.dataset  # parses the header; pixel data stays encoded bytes
    except Exception as exc:
        return refuse(CANNOT_UNDERSTAND, f"dataset cannot be parsed: {type(exc).__name__}")
    if str(ds.get("SOPInstanceUID", "")) != sop_uid:
        return refuse(DATASET_MISMATCH, "SOPInstanceUID differs from the request")
    if str(ds.get("SOPClassUID", "")) != str(req.AffectedSOPClassUID):
        return refuse(DATASET_MISMATCH, "SOPClassUID differs from the request")
    for key in ("StudyInstanceUID", "SeriesInstanceUID"):
        if not valid_uid(str(ds.get(key, ""))):
            return refuse(CANNOT_UNDERSTAND, f"invalid {key}")
    try:
        check_eligible(ds, cfg.eligibility)
    except BadDataset as exc:
        return refuse(DATASET_MISMATCH, str(exc))
    except NotEligible as exc:
        stats.skipped += 1
        reason = str(exc)
        stats.reasons[reason] = stats.reasons.get(reason, 0) + 1
        audit.record("skipped", reason=reason, study_instance_uid=str(ds.StudyInstanceUID), **base)
        log.info("skipped %s: %s", sop_uid, reason)
        return SUCCESS
    try:
        path, pending = spool.store(sop_uid, event.encoded_dataset())
    except SpoolError as exc:
        return refuse(OUT_OF_RESOURCES, str(exc))
    if pending:
        # Already spooled and queued: the bytes were replaced; the queued task picks up the newest copy.
        audit.record("received", duplicate=True, study_instance_uid=str(ds.StudyInstanceUID),
                     ms=round((time.time() - t0) * 1000, 1), **base)
        stats.received += 1
        return SUCCESS
    try:
        task_id = submit(str(path), sop_uid, t0)
    except SpoolError as exc:
        try:
            path.unlink()  # not acknowledged, so the PACS keeps (and retries) it: do not strand a copy
        except FileNotFoundError:
            pass
        return refuse(OUT_OF_RESOURCES, str(exc))
    stats.received += 1
    audit.record("received", task_id=task_id, study_instance_uid=str(ds.StudyInstanceUID),
                 accession=str(ds.get("AccessionNumber", "")), transfer_syntax=str(event.context.transfer_syntax),
                 ms=round((time.time() - t0) * 1000, 1), **base)
    return SUCCESS


def handle_echo(event: evt.Event) -> int:
    return SUCCESS


def handle_assoc(event: evt.Event, audit: Audit) -> None:
    req = event.assoc.requestor
    audit.record(event.event.name.lower(), calling_ae=req.ae_title, peer=f"{req.address}:{req.port}")


def make_ae(cfg: Config) -> AE:
    rc = cfg.receiver
    ae = AE(ae_title=rc.ae_title)
    ae.maximum_associations = rc.max_associations
    ae.maximum_pdu_size = rc.max_pdu
    ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = rc.acse_timeout, rc.dimse_timeout, rc.network_timeout
    ae.require_called_aet = rc.require_called_aet
    ae.require_calling_aet = list(rc.allowed_calling_aets)
    ae.add_supported_context(Verification)
    for sop in ACCEPTED_SOP_CLASSES:
        ae.add_supported_context(sop, ACCEPTED_TRANSFER_SYNTAXES)
    return ae


def start(cfg: Config, spool: Spool, submit: Submit, audit: Audit, block: bool = False):
    """Start the SCP on ``cfg.receiver.bind:port``. Returns the server (``block=False``) or blocks."""
    stats = ReceiverStats()
    handlers = [
        (evt.EVT_C_STORE, handle_store, [cfg, spool, submit, audit, stats]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_ACCEPTED, handle_assoc, [audit]),
        (evt.EVT_REJECTED, handle_assoc, [audit]),
    ]
    ae = make_ae(cfg)
    ssl_context = server_context(cfg.receiver)
    log.info("receiver %s listening on %s:%d%s", cfg.receiver.ae_title, cfg.receiver.bind, cfg.receiver.port,
             " (DICOM TLS)" if ssl_context else "")
    server = ae.start_server((cfg.receiver.bind, cfg.receiver.port), block=block, evt_handlers=handlers,
                             ssl_context=ssl_context)
    if server is not None:
        server.stats = stats
    return server
