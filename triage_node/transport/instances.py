"""Instances reach workers on other hosts: the receiver serves its spool over HTTP, workers fetch and release.

The receiver host keeps each instance in its durable spool until a worker says it is finished, so a worker host that
dies loses nothing (its task is redelivered, ``acks_late``, and the next worker fetches the same bytes again)::

    GET    /instances/<SOPInstanceUID>.dcm           the spooled file (404 once finished)
    DELETE /instances/<SOPInstanceUID>               finished (sent or skipped): the spool copy goes
    POST   /instances/<SOPInstanceUID>/dead-letter   {"reason", "stage", "worker", "path"}: dead-lettered on the
                                                     worker; the receiver moves its copy to its dead-letter folder

Every request carries ``Authorization: Bearer <token>`` (compared in constant time): none is 401, a wrong one 403.
Only valid DICOM UIDs are accepted (400 otherwise), so no request names a path of its own. A 404 carries the header
``X-Triage-Instances: unknown``: a worker treats only that answer as "finished", never a 404 from something else at
a misconfigured URL. Logs carry UIDs, never the token.
"""

from __future__ import annotations

import hmac
import http.client
import json
import logging
import os
import re
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ..audit import Audit
from ..config import InstancesConfig
from ..errors import InstanceUnavailable
from ..spool import Spool, valid_uid

log = logging.getLogger(__name__)

MARKER = "X-Triage-Instances"
_PATH = re.compile(r"^/instances/([^/]+?)(\.dcm|/dead-letter)?$")
_MAX_BODY = 64 << 10
_CHUNK = 1 << 20


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    timeout = 60  # a silent client does not hold a thread for ever

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("instances %s: " + format, self.client_address[0], *args)

    def _answer(self, code: int, text: str = "", headers: dict[str, str] | None = None) -> None:
        body = (json.dumps({"error": text}) + "\n").encode() if text else b""
        if code >= 400:  # an unread request body must not be taken for the next request
            self.close_connection = True
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        if body:
            self.send_header("Content-Type", "application/json")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _route(self, method: str) -> tuple[str, str] | None:
        """(SOP Instance UID, kind) of an authorised request with a valid UID; answers and returns None otherwise."""
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            self._answer(401, "bearer token required", {"WWW-Authenticate": 'Bearer realm="instances"'})
            return None
        if not hmac.compare_digest(auth[7:].strip().encode(), self.server.token):
            self._answer(403, "token refused")
            return None
        m = _PATH.match(self.path.split("?", 1)[0])
        if not m:
            self._answer(404, "no such endpoint")
            return None
        sop, kind = m.group(1), m.group(2) or ""
        if not valid_uid(sop):
            self._answer(400, "invalid SOP Instance UID")
            return None
        if (method, kind) not in (("GET", ".dcm"), ("DELETE", ""), ("POST", "/dead-letter")):
            self._answer(405, "method not allowed")
            return None
        return sop, kind

    def _unknown(self) -> None:
        self._answer(404, "instance not held (finished, or never received)", {MARKER: "unknown"})

    def do_GET(self) -> None:
        route = self._route("GET")
        if route is None:
            return
        sop = route[0]
        try:
            f = open(self.server.spool.instance_path(sop), "rb")
        except FileNotFoundError:
            self._unknown()
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom")
            self.send_header("Content-Length", str(size))
            self.send_header(MARKER, "instance")
            self.end_headers()
            self.wfile.flush()
            self.connection.sendfile(f)  # the kernel copies file -> socket; an atomic rename never truncates it

    def do_DELETE(self) -> None:
        route = self._route("DELETE")
        if route is None:
            return
        sop = route[0]
        held = self.server.spool.instance_path(sop).exists()
        self.server.spool.discard(sop)
        if held:
            self.server.audit.record("released", sop_instance_uid=sop, outcome="done",
                                     worker=self.headers.get("X-Worker", "")[:128])
        self._answer(204)  # idempotent: a duplicate task's release is not an error

    def do_POST(self) -> None:
        route = self._route("POST")
        if route is None:
            return
        sop = route[0]
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= _MAX_BODY:
                raise ValueError("size")
            info = json.loads(self.rfile.read(length))
            if not isinstance(info, dict):
                raise ValueError("not an object")
        except ValueError:
            self._answer(400, "expected a JSON object (at most 64 KiB)")
            return
        if not self.server.spool.instance_path(sop).exists():
            self._unknown()
            return
        reason = str(info.get("reason", ""))[:2000] or "dead-lettered by a worker"
        extra = {"stage": str(info.get("stage", ""))[:64], "worker": str(info.get("worker", ""))[:128],
                 "worker_path": str(info.get("path", ""))[:1024]}
        target = self.server.spool.dead_letter(sop, reason, extra=extra)
        self.server.audit.record("released", sop_instance_uid=sop, outcome="dead_lettered", reason=reason,
                                 path=str(target), **extra)
        self._answer(204)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    spool: Spool
    audit: Audit
    token: bytes


class InstanceServer:
    """The receiver host's spool over HTTP; ``start()`` runs it in a daemon thread, ``stop()`` ends it."""

    def __init__(self, cfg: InstancesConfig, spool: Spool, audit: Audit) -> None:
        if not cfg.token:
            raise ValueError("[instances] url is set but no token: set instances.token (TRIAGE_INSTANCES_TOKEN)")
        self.httpd = _Server((cfg.bind, cfg.port), _Handler)
        self.httpd.spool, self.httpd.audit, self.httpd.token = spool, audit, cfg.token.encode()
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="instances-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> InstanceServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- worker side -----------------------------------------------------------------------------------------------------
class _ShortRead(OSError):
    """The connection ended before Content-Length bytes arrived."""


def _request(method: str, url: str, token: str, timeout: float, data: bytes | None = None,
             headers: dict[str, str] | None = None):
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", **(headers or {})})
    return urllib.request.urlopen(req, timeout=timeout)


def _base(source_url: str) -> str:
    if not source_url.startswith(("http://", "https://")):
        raise InstanceUnavailable("source_url is not an http(s) URL")
    return source_url.rstrip("/")


def _why(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc.reason).__name__}" + (f" ({exc.reason.strerror})" if isinstance(exc.reason, OSError)
                                                 and exc.reason.strerror else "")
    return type(exc).__name__


def fetch(source_url: str, sop: str, dest: Path, cfg: InstancesConfig) -> int | None:
    """Copy the instance from the receiver into ``dest`` (atomically: a reader sees all of it or nothing).

    Returns the bytes fetched, or None when the receiver answers that it no longer holds the instance (finished by
    an earlier delivery of the task). Raises :class:`InstanceUnavailable` after ``cfg.attempts`` failed tries."""
    url = f"{_base(source_url)}/instances/{sop}.dcm"
    dest.parent.mkdir(parents=True, exist_ok=True)
    last = ""
    for attempt in range(cfg.attempts):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out, _request("GET", url, cfg.token, cfg.timeout_s) as resp:
                expected = int(resp.headers.get("Content-Length", "-1"))
                n = 0
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    n += len(chunk)
            if expected >= 0 and n != expected:
                raise _ShortRead(f"short read: {n} of {expected} bytes")
            os.replace(tmp, dest)
            return n
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and exc.headers.get(MARKER) == "unknown":
                return None
            last = _why(exc)
        except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, timeouts, resets, short reads
            last = str(exc) if isinstance(exc, _ShortRead) else _why(exc)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        log.warning("fetch of %s from the instance server failed (try %d of %d): %s", sop, attempt + 1,
                    cfg.attempts, last)
    raise InstanceUnavailable(f"instance server unavailable: {last}")


def release(source_url: str, sop: str, cfg: InstancesConfig, worker: str = "",
            dead_letter: dict[str, Any] | None = None) -> bool:
    """Tell the receiver the instance is finished (``dead_letter``: dead-lettered, with reason/stage/path), so it
    drops its spool copy. True when done or already gone; False when the receiver could not be told (its periodic
    reconcile then re-enqueues the instance: at least once, outputs are deterministic)."""
    try:
        base = _base(source_url)
    except InstanceUnavailable:
        return False
    headers = {"X-Worker": worker} if worker else {}
    last = ""
    for attempt in range(cfg.attempts):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
        try:
            if dead_letter is None:
                resp = _request("DELETE", f"{base}/instances/{sop}", cfg.token, cfg.timeout_s, headers=headers)
            else:
                body = json.dumps({**dead_letter, "worker": worker}, default=str).encode()
                resp = _request("POST", f"{base}/instances/{sop}/dead-letter", cfg.token, cfg.timeout_s, data=body,
                                headers={**headers, "Content-Type": "application/json"})
            resp.close()
            return True
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and exc.headers.get(MARKER) == "unknown":
                return True
            last = _why(exc)
        except (OSError, http.client.HTTPException) as exc:
            last = _why(exc)
        log.warning("release of %s at the instance server failed (try %d of %d): %s", sop, attempt + 1,
                    cfg.attempts, last)
    return False
