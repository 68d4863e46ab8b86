"""One ``Sender`` protocol, several backends (C-STORE SCU, DICOMweb STOW-RS, local folder).

Each ``send`` takes DICOM files and either returns the SOP Instance UIDs delivered or raises ``SendFailed``
(``retryable`` False when retrying cannot help: the peer refused the data itself).
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config as _pynetdicom_config

from ..audit import Audit
from ..config import Destination, load
from ..errors import SendFailed
from .flags import FhirSender, HL7Sender, ResultContext, WebhookSender
from .scu import guard_of, guard_responses

log = logging.getLogger(__name__)
# send_c_store(path) streams the file's dataset as stored instead of decoding it and encoding it again (only used
# when the file's own transfer syntax was accepted; the uncompressed fallback sends a decoded dataset)
_pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True


class Sender(Protocol):
    name: str

    def send(self, files: list[Path], context: ResultContext | None = None) -> list[str]: ...


def _read(files: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(f) for f in files]


class _NoResponse(Exception):
    """The association ended (or timed out) before the peer answered; ``sent`` were confirmed before that.

    ``stalled``: the DIMSE timeout expired on an association still up (the peer neither answered nor closed it);
    ``what`` names the unanswered instance (SOP Class and Instance UIDs only) when one was being sent."""

    def __init__(self, sent: list[str], stalled: bool = False, what: tuple[str, str] | None = None) -> None:
        super().__init__("no C-STORE response")
        self.sent, self.stalled, self.what = sent, stalled, what


#: Where a resend after a stall is recorded (audit event ``send_resent``, counted by /metrics as
#: ``triage_send_resent``). None: the trail of the process's configuration (``config.load()``, as the workers load
#: it), opened at the first stall. ``set_audit`` names another (the report worker's own, a test's).
_audit: Audit | None = None
_audit_lock = threading.Lock()


def set_audit(audit: Audit | None) -> None:
    global _audit
    with _audit_lock:
        _audit = audit


def _record_resent(**fields: object) -> None:
    global _audit
    try:
        with _audit_lock:
            if _audit is None:
                _audit = Audit.from_config(load())
            audit = _audit
        audit.record("send_resent", **fields)
    except Exception as exc:  # counting must never fail a delivery
        log.warning("could not record the resend in the audit trail: %s", type(exc).__name__)


class CStoreSender:
    """C-STORE SCU. Proposes only the SOP classes (and the transfer syntaxes) of the files being sent.

    Files go out as they are on disk (pynetdicom streams the dataset from the file: no decode, no re-encode), over
    an association kept in :data:`pool.POOL` and reused by the next result for the same destination. A reused
    association the peer closed meanwhile is replaced once by a fresh one (a resend replaces: output UIDs are
    deterministic).

    Each association gets :func:`scu.guard_responses` (pynetdicom's requestor could lose a response to its own
    reactor loop and wait out its DIMSE timeout: see ``scu``). A C-STORE still unanswered after the destination's
    ``dimse_timeout`` (a peer that never answers) aborts that association; the rest is resent once at once on a
    new association, logged (UIDs only) and recorded (audit ``send_resent``); a second miss raises a retryable
    ``SendFailed`` into the report task's backoff.
    """

    def __init__(self, dest: Destination) -> None:
        self.name, self.dest = dest.name, dest

    def send(self, files: list[Path], context: ResultContext | None = None) -> list[str]:
        from .pool import POOL

        metas = [(Path(f), read_file_meta_info(f)) for f in files]
        wanted = tuple(sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for _, m in metas}))
        key = (self.dest, wanted)
        sent: list[str] = []
        resent = False
        fresh = False
        pending: dict | None = None  # the stall to record once the resend's association is open
        while True:
            if fresh:
                assoc, reused = self._associate(wanted), False
                if pending is not None:
                    _record_resent(**pending)
                    pending = None
            else:
                assoc, reused = POOL.get(key, lambda: self._associate(wanted))
            try:
                sent += self._store(assoc, metas[len(sent):])
            except _NoResponse as lost:
                sent += lost.sent
                POOL.discard(assoc)
                if lost.stalled and not resent:
                    resent = fresh = True
                    pending = self._stalled(lost, reused, context, metas)
                    continue
                if reused and not lost.stalled:
                    log.info("%s: pooled association lost, sending again on a new one", self.name)
                    continue
                if lost.stalled:
                    raise SendFailed(f"{self.name}: no C-STORE response within {self.dest.dimse_timeout:g} s, "
                                     f"twice (resent once on a new association); {_size_hint(lost, metas)}",
                                     retryable=True) from None
                raise SendFailed(f"{self.name}: no C-STORE response (association aborted or closed)",
                                 retryable=True) from None
            except SendFailed:
                POOL.put(key, assoc)  # the peer refused one instance; the association itself is fine
                raise
            except BaseException:
                POOL.discard(assoc)
                raise
            POOL.put(key, assoc)
            return sent

    def _stalled(self, lost: _NoResponse, reused: bool, context: ResultContext | None,
                 metas: Sequence[tuple[Path, Dataset]]) -> dict[str, object]:
        """Log the stall now (UIDs only); return the audit fields, recorded once the resend's association is open
        (a refused reconnect is no resend: it fails into the task's retry, audited there). The fields name the
        source image (``sop_instance_uid``, as every other per-image audit event does) besides the result that
        went unanswered (``sent_uid``), and the result's size: the wait includes its transfer."""
        sop_class, sop_instance = lost.what or ("", "")
        size = _size_of(lost, metas)
        log.warning("%s: no C-STORE response within %g s (SOP Instance %s, SOP Class %s, %s bytes, %s association); "
                    "aborted it, resending on a new association", self.name, self.dest.dimse_timeout, sop_instance,
                    sop_class, size if size is not None else "?", "pooled" if reused else "new")
        fields: dict[str, object] = {}
        if context is not None:
            fields.update(sop_instance_uid=context.source_sop_instance_uid,
                          study_instance_uid=context.study_instance_uid)
        fields.update(destination=self.name, sent_uid=sop_instance, sop_class_uid=sop_class, bytes=size,
                      dimse_timeout_s=self.dest.dimse_timeout, reused_association=reused)
        return fields

    def _associate(self, wanted: tuple[tuple[str, str], ...]):
        from pynetdicom import AE
        from pynetdicom.presentation import build_context

        from .tls import client_context

        ae = AE(ae_title=self.dest.calling_ae_title)
        ae.acse_timeout = ae.network_timeout = self.dest.timeout
        ae.dimse_timeout = self.dest.dimse_timeout
        for sop, ts in wanted:
            ae.requested_contexts.append(build_context(sop, [ts]))
        for sop in sorted({sop for sop, ts in wanted if UID(ts).is_compressed}):
            # Fallback for a peer without the codec: the same SOP class uncompressed (we decompress for it).
            ae.requested_contexts.append(build_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        ctx = client_context(self.dest)
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title,
                             tls_args=(ctx, self.dest.host) if ctx else None)
        if not assoc.is_established:
            why = "rejected by the peer" if assoc.is_rejected else "not established (peer unreachable or aborted)"
            raise SendFailed(f"{self.name}: association {why} ({self.dest.host}:{self.dest.port})", retryable=True)
        guard_responses(assoc)
        return assoc

    def _store(self, assoc, metas: Sequence[tuple[Path, Dataset]]) -> list[str]:
        accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
        sent: list[str] = []
        for path, meta in metas:
            sop, ts = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
            what: Path | Dataset = path if (sop, ts) in accepted else _for_peer(pydicom.dcmread(path), accepted)
            guard = guard_of(assoc)
            try:
                status = assoc.send_c_store(what)
            except RuntimeError:  # "must be established": the peer closed it
                raise _NoResponse(sent) from None
            code = int(status.Status) if status and "Status" in status else None
            if code is None:  # no response: the DIMSE timeout expired (pynetdicom aborted it) or the peer ended it
                raise _NoResponse(sent, stalled=guard is not None and guard.timed_out,
                                  what=(sop, str(meta.MediaStorageSOPInstanceUID)))
            if code in (0x0000, 0xB000, 0xB007, 0xB006):
                sent.append(str(meta.MediaStorageSOPInstanceUID))
                continue
            # 0xA7xx out of resources is transient; 0xA9xx / 0xCxxx mean the peer refuses the data itself
            retryable = (code & 0xFF00) == 0xA700
            raise SendFailed(f"{self.name}: C-STORE status 0x{code:04X}", retryable=retryable)
        return sent


def _size_of(lost: _NoResponse, metas: Sequence[tuple[Path, Dataset]]) -> int | None:
    """Bytes on disk of the result that went unanswered (None if unknown)."""
    uid = lost.what[1] if lost.what else None
    for path, meta in metas:
        if str(meta.MediaStorageSOPInstanceUID) == uid:
            try:
                return path.stat().st_size
            except OSError:
                return None
    return None


def _size_hint(lost: _NoResponse, metas: Sequence[tuple[Path, Dataset]]) -> str:
    """The reason's second half: the DIMSE timeout covers sending the object too, so a slow link or a large object
    needs a longer one (the default is 10 s)."""
    size = _size_of(lost, metas)
    what = f"the object is {size / 1e6:.1f} MB" if size is not None else "the object's size is unknown"
    return (f"{what} and dimse_timeout includes its transfer: on a slow link raise dimse_timeout of this "
            "destination, else the peer is not answering")


def _for_peer(ds: Dataset, accepted: set[tuple[str, str]]) -> Dataset:
    """``ds`` as is when the peer accepted its transfer syntax, else decompressed (when the peer accepted the SOP
    class uncompressed); pynetdicom then reports the missing context itself if neither was accepted."""
    sop, ts = str(ds.SOPClassUID), UID(str(ds.file_meta.TransferSyntaxUID))
    if not ts.is_compressed or (sop, str(ts)) in accepted:
        return ds
    if not any(a == sop and not UID(t).is_compressed for a, t in accepted):
        return ds
    # in place: each send reads its files afresh. JPEG YBR_FULL_422 comes back as RGB. Same instance, other
    # encoding: the SOP Instance UID stays (pydicom would make a new one, and a resend would then duplicate)
    ds.decompress(generate_instance_uid=False)
    return ds


def dicomweb_client(url: str, username: str = "", password: str = "", token: str = ""):
    """A dicomweb-client with basic or bearer auth and no hidden retries: callers own retry policy (the report
    task's backoff and dead letter, the puller's next poll)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if username:
        session.auth = (username, password)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    client = DICOMwebClient(url=url, session=session)
    client.set_http_retry_params(retry=False)
    return client


class StowSender:
    """DICOMweb STOW-RS via dicomweb-client: retry on 5xx and connection errors, never on 4xx."""

    def __init__(self, dest: Destination) -> None:
        self.name, self.dest = dest.name, dest

    def _client(self):
        return dicomweb_client(self.dest.url, self.dest.username, self.dest.password, self.dest.token)

    def send(self, files: list[Path], context: ResultContext | None = None) -> list[str]:
        import requests

        datasets = _read(files)
        try:
            self._client().store_instances(datasets)
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            body = (exc.response.text[:200] if exc.response is not None else "").replace("\n", " ")
            transient = code >= 500 or code in (0, 408, 429)
            raise SendFailed(f"{self.name}: STOW-RS HTTP {code}: {body}", retryable=transient) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise SendFailed(f"{self.name}: STOW-RS connection failed: {type(exc).__name__}") from exc
        return [str(d.SOPInstanceUID) for d in datasets]


class FolderSender:
    """Copies results into a folder (the no-broker path, and an archive for previews)."""

    def __init__(self, dest: Destination) -> None:
        self.name, self.root = dest.name, Path(dest.path)

    def send(self, files: list[Path], context: ResultContext | None = None) -> list[str]:
        self.root.mkdir(parents=True, exist_ok=True)
        uids = []
        for f in files:
            meta = read_file_meta_info(f)  # the file meta names the instance: the dataset is not parsed
            shutil.copy2(f, self.root / f.name)
            uids.append(str(meta.MediaStorageSOPInstanceUID))
        return uids


def make_sender(dest: Destination) -> Sender:
    kinds: dict[str, Callable[[Destination], Sender]] = {
        "dicom": CStoreSender, "stow": StowSender, "folder": FolderSender, "hl7": HL7Sender,
        "fhir": FhirSender, "webhook": WebhookSender}
    if dest.kind not in kinds:
        raise ValueError(f"destination {dest.name}: unknown kind {dest.kind!r} ({', '.join(kinds)})")
    return kinds[dest.kind](dest)
