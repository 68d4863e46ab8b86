"""Established C-STORE associations kept per destination and reused across results.

Opening an association costs two round trips and a few ms of CPU on each side; the report worker sends every
result to the same few destinations. An association is used by one sender at a time (DIMSE messages of two threads
must not interleave): ``get`` hands out an idle one or opens a new one, ``put`` gives it back; one the peer closed
meanwhile is dropped on the next ``get``.

An idle association is not free: pynetdicom keeps two threads polling every millisecond (~23 ms CPU per second
here; ~13 ms with the transport loop slowed to 50 ms while idle, as done below), while opening and releasing one
costs ~6 ms CPU and ~30 ms. So an association is kept ``IDLE_S`` = 0.5 s: reused back to back under load (where it
counts), released between results that arrive seconds apart (where keeping it would cost more than it saves).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger(__name__)

IDLE_S = 0.5
MAX_IDLE = 4


class AssociationPool:
    """Idle established associations by key (destination + presentation contexts)."""

    def __init__(self, idle_s: float = IDLE_S, max_idle: int = MAX_IDLE) -> None:
        self.idle_s, self.max_idle = idle_s, max_idle
        self._lock = threading.Lock()
        self._idle: dict[Hashable, list[tuple[Any, float]]] = {}
        self._reaper: threading.Thread | None = None

    def get(self, key: Hashable, connect: Callable[[], Any]) -> tuple[Any, bool]:
        """An idle association for ``key`` (and True: reused), else ``connect()`` (and False)."""
        stale: list[Any] = []
        found = None
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(key, [])
            while idle and found is None:
                assoc, since = idle.pop()
                if assoc.is_established and now - since < self.idle_s:
                    found = assoc
                else:
                    stale.append(assoc)
        for assoc in stale:
            _close(assoc)
        if found is not None:
            _set_poll(found, _BUSY_POLL_S)
            return found, True
        return connect(), False

    def put(self, key: Hashable, assoc: Any) -> None:
        """Give back an association that is still usable (one that is not is dropped)."""
        if not assoc.is_established:
            return
        surplus = None
        _set_poll(assoc, _IDLE_POLL_S)
        with self._lock:
            idle = self._idle.setdefault(key, [])
            idle.append((assoc, time.monotonic()))
            if len(idle) > self.max_idle:
                surplus = idle.pop(0)[0]
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="assoc-pool-reaper", daemon=True)
                self._reaper.start()
        if surplus is not None:
            _close(surplus)

    def discard(self, assoc: Any) -> None:
        """Drop an association after a failure on it (aborted, never reused)."""
        try:
            if assoc.is_established:
                assoc.abort()
        except Exception as exc:
            log.debug("abort failed: %s", type(exc).__name__)

    def close_all(self) -> None:
        with self._lock:
            everything = [a for idle in self._idle.values() for a, _ in idle]
            self._idle.clear()
        for assoc in everything:
            _close(assoc)

    def _reap(self) -> None:
        """Release associations idle for ``idle_s``; ends when nothing is idle any more."""
        while True:
            time.sleep(min(1.0, self.idle_s / 2))
            expired: list[Any] = []
            now = time.monotonic()
            with self._lock:
                for key in list(self._idle):
                    keep = []
                    for assoc, since in self._idle[key]:
                        if assoc.is_established and now - since < self.idle_s:
                            keep.append((assoc, since))
                        else:
                            expired.append(assoc)
                    if keep:
                        self._idle[key] = keep
                    else:
                        del self._idle[key]
                done = not self._idle
                if done:
                    self._reaper = None
            for assoc in expired:
                _close(assoc)
            if done:
                return


_BUSY_POLL_S = 0.001  # pynetdicom's default
_IDLE_POLL_S = 0.05


def _set_poll(assoc: Any, delay: float) -> None:
    """How often the association's transport thread polls when it has nothing to do (pynetdicom's documented knob
    ``DULServiceProvider._run_loop_delay``: higher = less CPU while idle, slower to notice incoming data)."""
    dul = getattr(assoc, "dul", None)
    if dul is not None and hasattr(dul, "_run_loop_delay"):
        dul._run_loop_delay = delay


def _close(assoc: Any) -> None:
    try:
        if assoc.is_established:
            assoc.release()
    except Exception as exc:
        log.debug("release failed: %s", type(exc).__name__)


#: The process's pool (the report worker's threads share it).
POOL = AssociationPool()
atexit.register(POOL.close_all)
