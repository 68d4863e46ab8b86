"""Ops HTTP server started by ``triage-node up``: dashboard, JSON API, Prometheus /metrics, /healthz, /readyz.

    GET  /                      dashboard (static HTML + JS; refreshes itself from /api/overview)
    GET  /api/overview          queues, workers, last hour, recent studies (flagged first), dead letters
    POST /api/replay/<UID>      resend one dead letter (as ``triage-node replay UID``)
    GET  /thumb/<UID>.png       downscaled overlay preview from ``outputs.archive_dir/<UID>/preview.png``
    GET  /metrics               Prometheus text format
    GET  /healthz               liveness: 200 while the process serves HTTP
    GET  /readyz                readiness: 200 only when every check passes, else 503; the body is ``{"ready": b}``
                                alone without login, plus each check and its detail with it

HTTP basic authentication guards everything but /healthz and /readyz whenever a password is configured; binding
beyond loopback without one is refused. /readyz answers everyone, but shows its checks (worker host names, model
version) only to a logged-in user. Pages carry UIDs and accession numbers only, never patient demographics.
"""

from __future__ import annotations

import base64
import hmac
import io
import ipaddress
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..audit import Audit
from ..config import Config
from ..errors import TriageError
from ..spool import Spool, valid_uid
from . import monitoring
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .metrics import make_registry, render
from .probes import Probes
from .state import AuditState

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}
THUMB_PX = 256


class WebConfigError(TriageError):
    """The [web] section is unsafe or unusable (e.g. bound beyond loopback without a password)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_config(cfg: Config) -> None:
    w = cfg.web
    if not is_loopback(w.bind) and not (w.username and w.password):
        raise WebConfigError(f"[web] bind = {w.bind!r} is beyond loopback: set web.username and web.password "
                             "(or TRIAGE_WEB_PASSWORD), or bind to 127.0.0.1, or set web.enabled = false")


class WebApp:
    """Shared state of the handlers: configuration, audit reader, probes, metrics registry, thumbnail cache."""

    def __init__(self, cfg: Config, spool: Spool, audit: Audit) -> None:
        self.cfg, self.spool, self.audit = cfg, spool, audit
        self.state = AuditState(cfg.audit_log)
        self.probes = Probes(cfg, spool, self.state)
        self.registry = make_registry(self.state, self.probes)
        self.auth = None
        if cfg.web.password:
            self.auth = base64.b64encode(f"{cfg.web.username}:{cfg.web.password}".encode()).decode()
        self._thumbs: dict[tuple[str, float], bytes] = {}
        self._tlock = threading.Lock()

    def overview(self) -> dict[str, Any]:
        self.state.refresh()
        depths = self.probes.queue_depths()
        known = {r["sop_instance_uid"]: r for r in self.state.recent_studies(limit=10**6)}
        dead = []
        for info in self.spool.dead_letters():
            sop = info["sop_instance_uid"]
            row = known.get(sop, {})
            dead.append({"sop_instance_uid": sop, "reason": info.get("reason", ""), "ts": info.get("ts"),
                         "stage": info.get("stage", ""), "attempts": info.get("attempts"),
                         "study_instance_uid": row.get("study_instance_uid", ""), "accession": row.get("accession", ""),
                         "replayable": any(f.name != "source.dcm" for f in Path(info["path"]).glob("*.dcm"))})
        studies = list(known.values())[:100]
        for r in studies:
            has_result = r["status"].startswith("sent") or r["status"] in ("dead-lettered", "shadow")
            # no preview without an overlay (outputs.sc off, or sc_for = "flagged" and a negative film)
            r["thumbnail"] = (f"thumb/{r['sop_instance_uid']}.png" if has_result and self.cfg.outputs.archive_dir
                              and valid_uid(r["sop_instance_uid"])
                              and (Path(self.cfg.outputs.archive_dir) / r["sop_instance_uid"] / "preview.png").exists()
                              else "")
        return {"now": time.time(), "node": {"ae_title": self.cfg.receiver.ae_title, "port": self.cfg.receiver.port},
                "queues": {k: v for k, v in (depths or {}).items() if not k.startswith("_")},
                "unacked": (depths or {}).get("_unacked"), "broker_ok": depths is not None,
                "workers": self.probes.workers(), "model": self.state.model,
                "last_hour": self.state.last_hour(), "studies": studies, "dead_letters": dead,
                "failures_by_stage": self.state.failures_by_stage(),
                "spool": {"pending": len(self.spool.pending()), "disk_usage": round(self.spool.disk_usage(), 4),
                          "free_bytes": self.spool.free_bytes(), "refusing": self.spool.refusal()},
                **monitoring.overview(self.cfg)}  # mode (SHADOW), drift window against the reference

    def replay(self, sop: str) -> tuple[int, dict[str, Any]]:
        from ..replay import replay_one

        for info in self.spool.dead_letters():
            if info["sop_instance_uid"] == sop:
                res = replay_one(self.cfg, self.audit, info)
                code = 200 if res.ok else (502 if res.outcome == "failed" else 409)
                return code, {"sop_instance_uid": sop, "outcome": res.outcome, "message": res.message}
        return 404, {"sop_instance_uid": sop, "outcome": "missing", "message": "no such dead letter"}

    def thumbnail(self, sop: str) -> bytes | None:
        if not self.cfg.outputs.archive_dir or not valid_uid(sop):
            return None
        p = Path(self.cfg.outputs.archive_dir) / sop / "preview.png"
        try:
            key = (sop, p.stat().st_mtime)
        except OSError:
            return None
        with self._tlock:
            if key in self._thumbs:
                return self._thumbs[key]
        from PIL import Image

        with Image.open(p) as im:
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG", optimize=True)
        with self._tlock:
            if len(self._thumbs) > 500:
                self._thumbs.clear()
            self._thumbs[key] = buf.getvalue()
        return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    server_version = "triage-node"
    app: WebApp  # set on the per-server subclass

    def log_message(self, fmt: str, *args: Any) -> None:  # request line only; never headers (credentials)
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, code: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "private, max-age=300" if ctype == "image/png" else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("X-Frame-Options", "DENY")  # no clickjacking of the replay button
        if ctype.startswith("text/html"):
            self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self'; frame-ancestors 'none'")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj, default=str).encode(), "application/json")

    def _logged_in(self) -> bool:
        """Valid credentials, or no login configured (then the server is bound to loopback only)."""
        if self.app.auth is None:
            return True
        got = self.headers.get("Authorization", "")
        return got.startswith("Basic ") and hmac.compare_digest(got[6:].strip().encode(), self.app.auth.encode())

    def _authorised(self) -> bool:
        if self._logged_in():
            return True
        self._send(401, b"login required\n", "text/plain", {"WWW-Authenticate": 'Basic realm="triage-node"'})
        return False

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        try:
            if path == "/healthz":
                return self._json(200, {"status": "ok"})
            if path == "/readyz":
                r = self.app.probes.readiness()
                # probes (load balancers, kubelets) send no credentials: they get the verdict only; the checks
                # name worker hosts and the model version, so they are for logged-in users
                return self._json(200 if r["ready"] else 503, r if self._logged_in() else {"ready": r["ready"]})
            if not self._authorised():
                return
            if path == "/metrics":
                return self._send(200, render(self.app.registry), METRICS_TYPE)
            if path == "/api/overview":
                return self._json(200, self.app.overview())
            if path.startswith("/thumb/") and path.endswith(".png"):
                data = self.app.thumbnail(path[len("/thumb/"):-len(".png")])
                return self._send(200, data, "image/png") if data else self._send(404, b"no preview\n", "text/plain")
            name = "dashboard.html" if path in ("/", "/index.html") else path[len("/static/"):] \
                if path.startswith("/static/") else ""
            f = STATIC / name if name and "/" not in name and not name.startswith(".") else None
            if f and f.is_file() and f.suffix in _TYPES:
                return self._send(200, f.read_bytes(), _TYPES[f.suffix])
            self._send(404, b"not found\n", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception:
            log.exception("web: GET %s failed", path)
            self._send(500, b"internal error\n", "text/plain")

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        if not self._authorised():
            return
        # Cross-site forms cannot set custom headers: a page elsewhere cannot make the browser replay for you.
        origin = self.headers.get("Origin")
        cross_site = bool(origin) and urlsplit(origin).netloc != self.headers.get("Host")
        if self.headers.get("X-Triage-Request") != "1" or cross_site:
            return self._json(403, {"message": "cross-site request refused"})
        if path.startswith("/api/replay/"):
            sop = path[len("/api/replay/"):]
            if not valid_uid(sop):
                return self._json(400, {"message": "invalid UID"})
            try:
                code, body = self.app.replay(sop)
            except Exception as exc:
                log.exception("web: replay %s failed", sop)
                code, body = 500, {"sop_instance_uid": sop, "outcome": "error", "message": type(exc).__name__}
            return self._json(code, body)
        self._json(404, {"message": "not found"})


class WebServer:
    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self.httpd, self.thread = httpd, thread

    @property
    def url(self) -> str:
        host, port = str(self.httpd.server_address[0]), self.httpd.server_address[1]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def start(cfg: Config, spool: Spool, audit: Audit) -> WebServer | None:
    """Serve on ``cfg.web.bind:port`` in a daemon thread. Raises WebConfigError on an unsafe configuration; a port
    that cannot be bound is logged as an error and returns None (the receiver keeps serving the PACS)."""
    check_config(cfg)
    app = WebApp(cfg, spool, audit)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server_cls = type("Server", (ThreadingHTTPServer,), {
        "daemon_threads": True, "address_family": socket.AF_INET6 if ":" in cfg.web.bind else socket.AF_INET})
    try:
        httpd = server_cls((cfg.web.bind, cfg.web.port), handler)
    except OSError as exc:
        log.error("web dashboard NOT started: cannot listen on %s:%d: %s", cfg.web.bind, cfg.web.port,
                  exc.strerror or exc)
        return None
    thread = threading.Thread(target=httpd.serve_forever, name="web", daemon=True)
    thread.start()
    srv = WebServer(httpd, thread)
    log.info("web dashboard on %s (login %s)", srv.url, "required" if app.auth else "off: loopback only")
    return srv
