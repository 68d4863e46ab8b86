"""Live probes for the dashboard, /metrics and /readyz: broker queues, Celery workers, receiver port, spool."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from typing import Any

from ..config import Config
from ..spool import Spool
from .state import AuditState

log = logging.getLogger(__name__)
#: kombu's Redis transport keeps priority sub-queues as ``<queue>\x06\x16<priority>`` (0 is the plain name).
_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
WORKER_TTL_S = 5.0


def _loopback(host: str) -> str:
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _proc_listening(port: int) -> bool | None:
    """True/False when /proc/net/tcp{,6} tell whether a socket listens on ``port``; None where there is no /proc."""
    seen = False
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        seen = True
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False if seen else None


class Probes:
    def __init__(self, cfg: Config, spool: Spool, state: AuditState) -> None:
        self.cfg, self.spool, self.state = cfg, spool, state
        self._redis = None
        self._app: Any = None
        self._workers: tuple[float, dict[str, Any]] = (0.0, {})
        self._wlock = threading.Lock()

    # -- broker --------------------------------------------------------------------------------------------------
    def redis(self):
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.cfg.broker.url, socket_connect_timeout=1.0, socket_timeout=2.0)
        return self._redis

    def broker_ping(self) -> tuple[bool, str]:
        if not self.cfg.broker.url:
            return False, "no broker configured"
        try:
            self.redis().ping()
            return True, "PING ok"
        except Exception as exc:  # redis ConnectionError / TimeoutError
            return False, f"{type(exc).__name__}"

    def queue_depths(self) -> dict[str, int] | None:
        """Messages waiting per Celery queue (LLEN), ``None`` when the broker is unreachable."""
        try:
            pipe = self.redis().pipeline()
            names = (self.cfg.broker.infer_queue, self.cfg.broker.report_queue)
            for q in names:
                for sfx in _PRIORITY_SUFFIXES:
                    pipe.llen(q + sfx)
            pipe.hlen("unacked")
            res = pipe.execute()
        except Exception:
            return None
        n = len(_PRIORITY_SUFFIXES)
        out = {q: int(sum(res[i * n:(i + 1) * n])) for i, q in enumerate(names)}
        out["_unacked"] = int(res[-1])
        return out

    # -- workers -------------------------------------------------------------------------------------------------
    def workers(self, max_age_s: float = WORKER_TTL_S) -> dict[str, Any]:
        """Workers answering a Celery ping (cached a few seconds: a broadcast waits ``timeout`` for replies)."""
        with self._wlock:
            ts, cached = self._workers
            if time.time() - ts < max_age_s:
                return cached
            result = self._inspect()
            self._workers = (time.time(), result)
            return result

    def _inspect(self) -> dict[str, Any]:
        ok, why = self.broker_ping()
        if not ok:
            return {"ok": False, "error": f"broker unreachable ({why})", "workers": []}
        try:
            if self._app is None:
                from ..queue import make_app

                self._app = make_app(self.cfg, name="web")
            pings = self._app.control.inspect(timeout=1.0).ping() or {}
            stats: dict[str, Any] = {}
            if pings:
                stats = self._app.control.inspect(timeout=1.0, destination=list(pings), limit=len(pings)).stats() or {}
        except Exception as exc:
            return {"ok": False, "error": f"inspect failed: {type(exc).__name__}", "workers": []}
        self.state.refresh()
        out = []
        for name in sorted(pings):
            st = stats.get(name, {})
            role = name.split("@", 1)[0] if name.split("@", 1)[0] in ("infer", "report") else "other"
            total = st.get("total", {}) if isinstance(st, dict) else {}
            out.append({"name": name, "role": role,
                        "concurrency": (st.get("pool") or {}).get("max-concurrency") if isinstance(st, dict) else None,
                        "tasks_done": int(sum(total.values())) if isinstance(total, dict) else None,
                        "model": self.state.model_by_host.get(name, "") if role == "infer" else ""})
        return {"ok": True, "error": "", "workers": out}

    # -- readiness -----------------------------------------------------------------------------------------------
    def receiver_listening(self) -> tuple[bool, str]:
        """The receiver port is in LISTEN state (Linux: /proc/net/tcp*, no connection is made); with
        ``[web] receiver_address`` (the receiver on another host or container), it answers a C-ECHO there.

        A TCP connect is the fallback only: pynetdicom holds an association slot for each connection until its
        ACSE timeout, so frequent connect probes would make the PACS see "local limit exceeded" rejections."""
        if self.cfg.web.receiver_address:
            return self.receiver_echo(self.cfg.web.receiver_address)
        host, port = _loopback(self.cfg.receiver.bind), self.cfg.receiver.port
        found = _proc_listening(port)
        if found is not None:
            return (True, f"port {port} listening") if found else (False, f"nothing listens on port {port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True, f"{host}:{port} accepts connections"
        except OSError as exc:
            return False, f"{host}:{port}: {exc.strerror or type(exc).__name__}"

    def receiver_echo(self, address: str, timeout: float = 3.0) -> tuple[bool, str]:
        """A DICOM C-ECHO to the receiver at ``host:port`` (a whole association, released: no slot left held)."""
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        host, _, port_s = address.rpartition(":")
        try:
            port = int(port_s)
        except ValueError:
            return False, f"[web] receiver_address {address!r}: expected host:port"
        from ..transport.scu import guard_responses

        ae = AE(ae_title=self.cfg.web.probe_ae_title)
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        called = self.cfg.receiver.ae_title
        assoc = ae.associate(host.strip("[]"), port, ae_title=called)
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "aborted or unreachable"
            return False, f"{host}:{port} ({called}): association {why}"
        guard_responses(assoc)  # pynetdicom's requestor can lose a response to its own loop (transport/scu.py)
        try:
            status = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        code = int(status.get("Status", -1)) if status else -1
        if code != 0:
            return False, f"{host}:{port} ({called}): C-ECHO " + ("no response" if code < 0 else f"status 0x{code:04X}")
        return True, f"{host}:{port} ({called}) answers C-ECHO"

    def spool_writable(self) -> tuple[bool, str]:
        try:
            fd, tmp = tempfile.mkstemp(dir=self.spool.root, prefix=".readyz-")
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(tmp)
        except OSError as exc:
            return False, f"write failed: {exc.strerror or type(exc).__name__}"
        why = self.spool.refusal()
        if why is not None:
            return False, why
        free_gib = self.spool.free_bytes() / 2**30
        return True, f"write+delete ok, disk {self.spool.disk_usage():.0%} used, {free_gib:.1f} GiB free"

    def model_loaded(self) -> tuple[bool, str]:
        """An inference worker answers a Celery ping and the last analysis did not fail with a model error.

        The model loads lazily inside the inference worker, so a fresh node is ready before its first image; the
        model version seen last (``analysed`` audit line) is given as detail."""
        self.state.refresh()
        w = self.workers()
        infer = [x["name"] for x in w["workers"] if x["role"] == "infer"]
        seen = self.state.model.get("model") or "no analysis yet"
        if not infer:
            return False, w["error"] or "no inference worker answers ping"
        if self.state.last_model_error > self.state.last_analysed:
            return False, "last analysis failed with a model error (see audit 'failed' lines)"
        return True, f"{', '.join(infer)} online; model: {seen}"

    def readiness(self) -> dict[str, Any]:
        checks = {}
        for name, fn in (("receiver_listening", self.receiver_listening), ("broker_reachable", self.broker_ping),
                         ("spool_writable", self.spool_writable), ("model_loaded", self.model_loaded)):
            try:
                ok, detail = fn()
            except Exception as exc:  # a probe must never take the endpoint down
                ok, detail = False, f"probe error: {type(exc).__name__}"
            checks[name] = {"ok": ok, "detail": detail}
        return {"ready": all(c["ok"] for c in checks.values()), "checks": checks}

    def spool_bytes(self) -> dict[str, int]:
        out = {}
        for name, root in (("instances", self.spool.instances), ("outbox", self.spool.outbox),
                           ("dead_letter", self.spool.dead)):
            total = 0
            for dirpath, _, files in os.walk(root):
                for f in files:
                    try:
                        total += os.lstat(os.path.join(dirpath, f)).st_size
                    except OSError:
                        pass
            out[name] = total
        return out
