"""Append-only JSON-lines audit trail: one line per hop, UIDs and reasons only (never patient demographics)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_lock = threading.Lock()
#: Keys that may never appear in an audit line, whatever a caller passes.
_FORBIDDEN = {"PatientName", "PatientID", "PatientBirthDate", "patient_name", "patient_id", "birth_date"}


class Audit:
    """Writes ``{"ts", "event", ...}`` lines; safe across threads and (with O_APPEND) across processes."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, event: str, **fields: Any) -> None:
        entry = {"ts": round(time.time(), 3), "event": event, "pid": os.getpid()}
        entry.update({k: v for k, v in fields.items() if k not in _FORBIDDEN})
        if not self.path:
            return
        line = (json.dumps(entry, default=str) + "\n").encode()
        try:
            with _lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
        except OSError as exc:  # the audit trail must never take the node down
            log.error("audit write failed (%s): %s", self.path, exc)


def read(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All audit entries (skipping a torn last line)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
