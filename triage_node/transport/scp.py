"""The C-STORE receiver: a pynetdicom Storage SCP with C-ECHO.

The store handler spools the encoded bytes atomically, enqueues a task, and only then answers 0x0000. It reads the
header (never the pixels) to refuse instances that cannot be valid and to record non-CXRs as skipped.
"""

from __future__ import annotations

import logging

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
from ..dicom_io import ACCEPTED_SOP_CLASSES
from ..ingest import (CANNOT_UNDERSTAND, DATASET_MISMATCH, OUT_OF_RESOURCES, SOP_CLASS_NOT_SUPPORTED, SUCCESS,
                      Ingest, Submit)
from ..spool import Spool
from .tls import server_context

log = logging.getLogger(__name__)
__all__ = ["ACCEPTED_TRANSFER_SYNTAXES", "CANNOT_UNDERSTAND", "DATASET_MISMATCH", "OUT_OF_RESOURCES",
           "SOP_CLASS_NOT_SUPPORTED", "SUCCESS", "Submit", "handle_store", "make_ae", "start"]

ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]

def handle_store(event: evt.Event, ingest: Ingest) -> int | Dataset:
    """Spool + enqueue one instance; every outcome is a DIMSE status plus an audit line with its reason."""
    req = event.request
    try:
        ds = event.dataset  # parses the header; pixel data stays encoded bytes
    except Exception:
        ds = None
    origin = {"calling_ae": event.assoc.requestor.ae_title, "channel": "dimse"}
    outcome = ingest.accept(ds, event.encoded_dataset, str(req.AffectedSOPClassUID),
                            str(req.AffectedSOPInstanceUID or ""), origin, str(event.context.transfer_syntax))
    if outcome.event != "refused":
        return SUCCESS
    rsp = Dataset()
    rsp.Status = outcome.status
    rsp.ErrorComment = outcome.reason[:64]
    return rsp


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
    ingest = Ingest(cfg, spool, submit, audit)
    handlers = [
        (evt.EVT_C_STORE, handle_store, [ingest]),
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
        server.ingest = ingest
    return server
