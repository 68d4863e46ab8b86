"""Live or shadow: whether results leave the node.

``[outputs] mode`` is the default. ``triage-node mode shadow|live`` switches a running node without a restart:
the choice is kept in the broker (Redis key ``triage:outputs_mode``, so report workers on other hosts see it too)
and audited (``mode_changed`` with who and when). Report workers read it per task (cached ``CACHE_S`` seconds); a
film whose report task starts after the switch follows the new mode. ``triage-node mode default`` removes the
override (the configured mode applies again).
"""

from __future__ import annotations

import getpass
import logging
import threading
import time
from pathlib import Path

from ..config import Config

log = logging.getLogger(__name__)
KEY = "triage:outputs_mode"
MODES = ("live", "shadow")
CACHE_S = 2.0
_cache: dict[str, tuple[float, str, str]] = {}
_lock = threading.Lock()
_clients: dict[str, object] = {}


def broker_url(cfg: Config) -> str:
    """The broker of this node: ``broker.url``, or the private one ``triage-node up`` started (it leaves the URL in
    ``<spool>/../redis/url``); "" when neither is known."""
    if cfg.broker.url:
        return cfg.broker.url
    f = Path(cfg.spool.directory).parent / "redis" / "url"
    try:
        return f.read_text().strip()
    except OSError:
        return ""


def _client(url: str):
    import redis

    with _lock:
        if url not in _clients:
            _clients[url] = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        return _clients[url]


def current(cfg: Config, strict: bool = True) -> tuple[str, str]:
    """(mode, where it comes from: ``config`` or ``runtime``). ``strict``: a broker that cannot be read raises
    (a report worker retries rather than sending while the operator may have chosen shadow); else the
    configured mode is returned with source ``config (broker unreachable)``."""
    url = broker_url(cfg)
    if not url:
        return cfg.outputs.mode, "config"
    now = time.monotonic()
    hit = _cache.get(url)
    if hit and now - hit[0] < CACHE_S:
        return hit[1], hit[2]
    try:
        raw = _client(url).get(KEY)
    except Exception as exc:  # redis.ConnectionError, TimeoutError, ...
        if strict:
            raise
        log.warning("outputs mode: broker unreachable (%s); showing the configured mode", type(exc).__name__)
        return cfg.outputs.mode, "config (broker unreachable)"
    value = raw.decode() if isinstance(raw, bytes) else raw
    mode, source = (value, "runtime") if value in MODES else (cfg.outputs.mode, "config")
    _cache[url] = (now, mode, source)
    return mode, source


def set_mode(cfg: Config, mode: str, audit=None, who: str | None = None) -> str:
    """Switch the running node to ``mode`` (``live``, ``shadow``; ``default`` removes the override). Returns the
    mode now in force. Audited as ``mode_changed`` (from, to, who)."""
    url = broker_url(cfg)
    if not url:
        raise RuntimeError("no broker known (broker.url empty and no private broker of `triage-node up` found): "
                           "set [outputs] mode in the configuration and restart the workers")
    before, _ = current(cfg)
    client = _client(url)
    if mode == "default":
        client.delete(KEY)
        now = cfg.outputs.mode
    elif mode in MODES:
        client.set(KEY, mode)
        now = mode
    else:
        raise ValueError(f"mode {mode!r}: expected live, shadow or default")
    _cache.pop(url, None)
    who = who or getpass.getuser()
    if audit is not None:
        audit.record("mode_changed", mode_from=before, mode_to=now, by=who, override=mode != "default")
    log.info("outputs mode %s -> %s (by %s)", before, now, who)
    return now
