"""One ``Sender`` protocol, several backends (C-STORE SCU, DICOMweb STOW-RS, local folder).

Each ``send`` takes DICOM files and either returns the SOP Instance UIDs delivered or raises ``SendFailed``
(``retryable`` False when retrying cannot help: the peer refused the data itself).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import _config as _pynetdicom_config

from ..config import Destination
from ..errors import SendFailed
from .flags import FhirSender, HL7Sender, ResultContext, WebhookSender

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
    """The association ended (or timed out) before the peer answered; ``sent`` were confirmed before that."""

    def __init__(self, sent: list[str]) -> None:
        super().__init__("no C-STORE response")
        self.sent = sent


class CStoreSender:
    """C-STORE SCU. Proposes only the SOP classes (and the transfer syntaxes) of the files being sent.

    Files go out as they are on disk (pynetdicom streams the dataset from the file: no decode, no re-encode), over
    an association kept in :data:`pool.POOL` and reused by the next result for the same destination. A reused
    association the peer closed meanwhile is replaced once by a fresh one (a resend replaces: output UIDs are
    deterministic).
    """

    def __init__(self, dest: Destination) -> None:
        self.name, self.dest = dest.name, dest

    def send(self, files: list[Path], context: ResultContext | None = None) -> list[str]:
        from .pool import POOL

        metas = [(Path(f), read_file_meta_info(f)) for f in files]
        wanted = tuple(sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for _, m in metas}))
        key = (self.dest, wanted)
        sent: list[str] = []
        while True:
            assoc, reused = POOL.get(key, lambda: self._associate(wanted))
            try:
                sent += self._store(assoc, metas[len(sent):])
            except _NoResponse as lost:
                sent += lost.sent
                POOL.discard(assoc)
                if reused:
                    log.info("%s: pooled association lost, sending again on a new one", self.name)
                    continue
                raise SendFailed(f"{self.name}: no C-STORE response (timeout or abort)", retryable=True) from None
            except SendFailed:
                POOL.put(key, assoc)  # the peer refused one instance; the association itself is fine
                raise
            except BaseException:
                POOL.discard(assoc)
                raise
            POOL.put(key, assoc)
            return sent

    def _associate(self, wanted: tuple[tuple[str, str], ...]):
        from pynetdicom import AE
        from pynetdicom.presentation import build_context

        from .tls import client_context

        ae = AE(ae_title=self.dest.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.dest.timeout
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
        return assoc

    def _store(self, assoc, metas: Sequence[tuple[Path, Dataset]]) -> list[str]:
        accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
        sent: list[str] = []
        for path, meta in metas:
            sop, ts = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
            what: Path | Dataset = path if (sop, ts) in accepted else _for_peer(pydicom.dcmread(path), accepted)
            try:
                status = assoc.send_c_store(what)
            except RuntimeError:  # "must be established": the peer closed it
                raise _NoResponse(sent) from None
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                raise _NoResponse(sent)
            if code in (0x0000, 0xB000, 0xB007, 0xB006):
                sent.append(str(meta.MediaStorageSOPInstanceUID))
                continue
            # 0xA7xx out of resources is transient; 0xA9xx / 0xCxxx mean the peer refuses the data itself
            retryable = (code & 0xFF00) == 0xA700
            raise SendFailed(f"{self.name}: C-STORE status 0x{code:04X}", retryable=retryable)
        return sent


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
