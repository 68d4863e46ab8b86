"""DICOMweb ingest: a STOW-RS endpoint on the node and a QIDO-RS/WADO-RS pull mode. Both feed the same
``Ingest`` gate as the C-STORE receiver (same checks, spool, queue and audit)."""

from __future__ import annotations

import base64
import hmac
import io
import ipaddress
import logging
import re
import sqlite3
import threading
import time
from datetime import date, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pydicom

from ..config import DicomwebIngestConfig, PullConfig
from ..ingest import Ingest

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
    item = {"00081150": {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"},
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

        def do_POST(self):  # noqa: N802
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


class PullState:
    """Which instances the pull has already handed to the ingest gate (sqlite: survives restarts)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (sop TEXT PRIMARY KEY, ts REAL)")
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT)")
        self.db.commit()

    def seen(self, sop: str) -> bool:
        return self.db.execute("SELECT 1 FROM seen WHERE sop=?", (sop,)).fetchone() is not None

    def mark(self, sop: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (sop, time.time()))
        self.db.commit()

    def get(self, key: str, default: str = "") -> str:
        row = self.db.execute("SELECT v FROM meta WHERE k=?", (key,)).fetchone()
        return row[0] if row else default

    def put(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        self.db.commit()

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]


class Puller:
    """Polls QIDO-RS for CR/DX instances of studies since the checkpoint date and ingests the new ones."""

    def __init__(self, cfg: PullConfig, ingest: Ingest, state_path: Path) -> None:
        self.cfg, self.ingest, self.state = cfg, ingest, PullState(state_path)
        self._stop = threading.Event()

    def _client(self):
        from .senders import dicomweb_client

        return dicomweb_client(self.cfg.url, self.cfg.username, self.cfg.password, self.cfg.token)

    def _since(self) -> str:
        start = self.cfg.since or (date.today() - timedelta(days=self.cfg.lookback_days)).strftime("%Y%m%d")
        return self.state.get("since", start)

    def poll_once(self) -> int:
        """One poll; returns how many instances were handed to the ingest gate."""
        client, since, n = self._client(), self._since(), 0
        today = date.today().strftime("%Y%m%d")
        for modality in self.cfg.modalities:
            offset = 0
            while n < self.cfg.max_per_poll:
                hits = client.search_for_instances(
                    search_filters={"Modality": modality, "StudyDate": f"{since}-"}, offset=offset, limit=100,
                    fields=["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
                if not hits:
                    break
                offset += len(hits)
                for hit in hits:
                    study, series, sop = (hit.get(t, {}).get("Value", [""])[0]
                                          for t in ("0020000D", "0020000E", "00080018"))
                    if not sop or self.state.seen(sop):
                        continue
                    if self._ingest_one(client, study, series, sop):
                        n += 1
                    if n >= self.cfg.max_per_poll or self._stop.is_set():
                        return n
        if n < self.cfg.max_per_poll:
            # everything up to yesterday is done; keep re-reading today's (late arrivals)
            self.state.put("since", min(today, max(since, (date.today() - timedelta(days=1)).strftime("%Y%m%d"))))
        return n

    def _ingest_one(self, client, study: str, series: str, sop: str) -> bool:
        ds = client.retrieve_instance(study, series, sop)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out = self.ingest.accept(ds, buf.getvalue, str(ds.SOPClassUID), sop, {"channel": "wado-rs-pull"},
                                 str(ds.file_meta.TransferSyntaxUID))
        if out.status == 0xA700:
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

    def start(self) -> "Puller":
        threading.Thread(target=self.run, name="dicomweb-pull", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
