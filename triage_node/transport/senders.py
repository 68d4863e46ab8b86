"""One ``Sender`` protocol, several backends (C-STORE SCU, DICOMweb STOW-RS, local folder).

Each ``send`` takes DICOM files and either returns the SOP Instance UIDs delivered or raises ``SendFailed``
(``retryable`` False when retrying cannot help: the peer refused the data itself).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..config import Destination
from ..errors import SendFailed
from .flags import FhirSender, HL7Sender, ResultContext, WebhookSender

log = logging.getLogger(__name__)


class Sender(Protocol):
    name: str

    def send(self, files: list[Path], context: "ResultContext | None" = None) -> list[str]: ...


def _read(files: list[Path]) -> list[Dataset]:
    return [pydicom.dcmread(f) for f in files]


class CStoreSender:
    """C-STORE SCU. Proposes only the SOP classes (and the transfer syntaxes) of the files being sent."""

    def __init__(self, dest: Destination) -> None:
        self.name, self.dest = dest.name, dest

    def send(self, files: list[Path], context: "ResultContext | None" = None) -> list[str]:
        from pynetdicom import AE
        from pynetdicom.presentation import build_context

        datasets = _read(files)
        ae = AE(ae_title=self.dest.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.dest.timeout
        wanted = sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in datasets})
        for sop, ts in wanted:
            ae.requested_contexts.append(build_context(sop, [ts]))
        for sop in sorted({sop for sop, ts in wanted if UID(ts).is_compressed}):
            # Fallback for a peer without the codec: the same SOP class uncompressed (we decompress for it).
            ae.requested_contexts.append(build_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        from .tls import client_context

        ctx = client_context(self.dest)
        assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title,
                             tls_args=(ctx, self.dest.host) if ctx else None)
        if not assoc.is_established:
            why = "rejected by the peer" if assoc.is_rejected else "not established (peer unreachable or aborted)"
            raise SendFailed(f"{self.name}: association {why} ({self.dest.host}:{self.dest.port})", retryable=True)
        sent: list[str] = []
        try:
            accepted = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in assoc.accepted_contexts}
            for ds in datasets:
                ds = _for_peer(ds, accepted)
                status = assoc.send_c_store(ds)
                code = int(status.Status) if status and "Status" in status else None
                if code is None:
                    raise SendFailed(f"{self.name}: no C-STORE response (timeout or abort)", retryable=True)
                if code in (0x0000, 0xB000, 0xB007, 0xB006):
                    sent.append(str(ds.SOPInstanceUID))
                    continue
                # 0xA7xx out of resources is transient; 0xA9xx / 0xCxxx mean the peer refuses the data itself
                retryable = (code & 0xFF00) == 0xA700
                raise SendFailed(f"{self.name}: C-STORE status 0x{code:04X}", retryable=retryable)
        finally:
            assoc.release()
        return sent


def _for_peer(ds: Dataset, accepted: set[tuple[str, str]]) -> Dataset:
    """``ds`` as is when the peer accepted its transfer syntax, else decompressed (when the peer accepted the SOP
    class uncompressed); pynetdicom then reports the missing context itself if neither was accepted."""
    sop, ts = str(ds.SOPClassUID), UID(str(ds.file_meta.TransferSyntaxUID))
    if not ts.is_compressed or (sop, str(ts)) in accepted:
        return ds
    if not any(a == sop and not UID(t).is_compressed for a, t in accepted):
        return ds
    ds.decompress()  # in place: each send reads its files afresh. JPEG YBR_FULL_422 comes back as RGB
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

    def send(self, files: list[Path], context: "ResultContext | None" = None) -> list[str]:
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

    def send(self, files: list[Path], context: "ResultContext | None" = None) -> list[str]:
        self.root.mkdir(parents=True, exist_ok=True)
        uids = []
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            shutil.copy2(f, self.root / f.name)
            uids.append(str(ds.SOPInstanceUID))
        return uids


def make_sender(dest: Destination) -> Sender:
    kinds = {"dicom": CStoreSender, "stow": StowSender, "folder": FolderSender, "hl7": HL7Sender,
             "fhir": FhirSender, "webhook": WebhookSender}
    if dest.kind not in kinds:
        raise ValueError(f"destination {dest.name}: unknown kind {dest.kind!r} ({', '.join(kinds)})")
    return kinds[dest.kind](dest)
