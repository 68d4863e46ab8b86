"""DICOMweb ingest: a STOW-RS endpoint on the node and a QIDO-RS/WADO-RS pull mode (:mod:`.pull`). Both feed the
same ``Ingest`` gate as the C-STORE receiver (same checks, spool, queue and audit)."""

from __future__ import annotations

import base64
import hmac
import io
import ipaddress
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pydicom

from ..config import DicomwebIngestConfig
from ..ingest import Ingest
from .pull import Puller, PullState

__all__ = ["Puller", "PullState", "split_multipart", "start_stow", "stow_handler"]

log = logging.getLogger(__name__)
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.I)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of a multipart/related payload (exact bytes; binary-safe)."""
    m = _BOUNDARY.search(content_type)
    if not m or not content_type.lower().startswith("multipart/related"):
        raise ValueError("expected multipart/related with a boundary")
    delim = b"--" + m.group(1).encode()
    parts = []
    for chunk in body.split(delim)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, data = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("malformed part (no header/body separator)")
        parts.append(data[:-2] if data.endswith(b"\r\n") else data)
    return parts


def _stow_item(sop_class: str, sop_uid: str, reason: int | None = None) -> dict:
    item: dict[str, Any] = {"00081150": {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"},
            "00081155": {"vr": "UI", "Value": [sop_uid]} if sop_uid else {"vr": "UI"}}
    if reason is not None:
        item["00081197"] = {"vr": "US", "Value": [reason]}
    return item


def _authorised(headers, cfg: DicomwebIngestConfig) -> bool:
    if not (cfg.username or cfg.token):
        return True
    got = headers.get("Authorization", "")
    if cfg.token and hmac.compare_digest(got, f"Bearer {cfg.token}"):
        return True
    if cfg.username:
        want = "Basic " + base64.b64encode(f"{cfg.username}:{cfg.password}".encode()).decode()
        return hmac.compare_digest(got, want)
    return False


def stow_handler(ingest: Ingest, cfg: DicomwebIngestConfig):
    class StowHandler(BaseHTTPRequestHandler):
        server_version = "triage-node-stow"

        def log_message(self, fmt, *args):  # requests are audited per instance; no access log with paths
            pass

        def _reply(self, status: int, body: dict | None = None) -> None:
            import json

            data = json.dumps(body or {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            """Content-Length or chunked transfer encoding (Orthanc's STOW client streams chunks)."""
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    if len(out) + size > cfg.max_request_bytes:
                        raise ValueError("request too large")
                    out += self.rfile.read(size)
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length", 0) or 0)
            if length > cfg.max_request_bytes:
                raise ValueError("request too large")
            return self.rfile.read(length) if length > 0 else b""

        def do_POST(self):
            if not re.fullmatch(r"/studies(/[0-9.]+)?/?", self.path.split("?")[0]):
                return self._reply(404, {"error": "STOW-RS is POST /studies"})
            if not _authorised(self.headers, cfg):
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="triage-node"')
                self.end_headers()
                return
            try:
                body = self._body()
            except ValueError as exc:
                return self._reply(413, {"error": str(exc)})
            if not body:
                return self._reply(411, {"error": "empty body"})
            try:
                parts = split_multipart(body, self.headers.get("Content-Type", ""))
            except ValueError as exc:
                return self._reply(415, {"error": str(exc)})
            ok, failed = [], []
            origin = {"channel": "stow-rs", "peer": self.client_address[0]}
            for data in parts:
                try:
                    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=False)
                    sop_class, sop_uid = str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
                    ts = str(ds.file_meta.TransferSyntaxUID)
                except Exception:
                    ds, sop_class, sop_uid, ts = None, "", "", ""
                out = ingest.accept(ds, lambda d=data: d, sop_class, sop_uid, origin, ts)
                (ok if out.event != "refused" else failed).append(
                    _stow_item(sop_class, sop_uid, None if out.event != "refused" else out.status))
            body_out = {"00081199": {"vr": "SQ", "Value": ok}} if ok else {}
            if failed:
                body_out["00081198"] = {"vr": "SQ", "Value": failed}
            self._reply(200 if not failed else 202 if ok else 409, body_out)

    return StowHandler


def start_stow(cfg: DicomwebIngestConfig, ingest: Ingest) -> ThreadingHTTPServer:
    """Serve STOW-RS in a daemon thread. Refuses to listen beyond loopback without authentication."""
    if not is_loopback(cfg.bind) and not ((cfg.username and cfg.password) or cfg.token):
        raise ValueError("dicomweb: authentication (username/password or token) is required off loopback")
    server = ThreadingHTTPServer((cfg.bind, cfg.port), stow_handler(ingest, cfg))
    threading.Thread(target=server.serve_forever, name="stow-rs", daemon=True).start()
    log.info("STOW-RS ingest on %s:%d/studies", cfg.bind, server.server_port)
    return server
