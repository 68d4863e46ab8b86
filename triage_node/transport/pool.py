"""Established C-STORE associations kept per destination and reused across results.

Opening an association costs two round trips and a few ms of CPU on each side; the report worker sends every
result to the same few destinations. An association is used by one sender at a time (DIMSE messages of two threads
must not interleave): ``get`` hands out an idle one or opens a new one, ``put`` gives it back. Idle ones are released
after ``IDLE_S`` (before a PACS's own idle timeout closes them, typically 30 s or more; each also keeps two pynetdicom
threads polling), and one the peer closed meanwhile is dropped on the next ``get``.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

log = logging.getLogger(__name__)

IDLE_S = 10.0
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
            return found, True
        return connect(), False

    def put(self, key: Hashable, assoc: Any) -> None:
        """Give back an association that is still usable (one that is not is dropped)."""
        if not assoc.is_established:
            return
        surplus = None
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
        except Exception as exc:  # noqa: BLE001 - a broken association may fail in any way; it is gone either way
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
            time.sleep(min(1.0, self.idle_s / 4))
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


def _close(assoc: Any) -> None:
    try:
        if assoc.is_established:
            assoc.release()
    except Exception as exc:  # noqa: BLE001 - releasing a dead association: nothing left to do
        log.debug("release failed: %s", type(exc).__name__)


#: The process's pool (the report worker's threads share it).
POOL = AssociationPool()
atexit.register(POOL.close_all)
