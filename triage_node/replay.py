"""Resend one dead-lettered result (used by ``triage-node replay`` and the dashboard's replay button)."""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .audit import Audit
from .config import Config
from .errors import SendFailed

#: One replay of a given dead letter at a time within this process (a double click must not send twice).
_lock = threading.Lock()


@dataclass(frozen=True)
class ReplayResult:
    sop_instance_uid: str
    outcome: str  # "resent" | "failed" | "nothing" | "missing"
    message: str

    @property
    def ok(self) -> bool:
        return self.outcome == "resent"


def replay_one(cfg: Config, audit: Audit, info: dict[str, Any]) -> ReplayResult:
    """Deliver the result files of one dead letter (``Spool.dead_letters()`` entry) to the destinations not yet
    reached; on success the dead-letter folder is removed and a ``replayed`` audit line written."""
    from . import pipeline
    from .transport import senders

    senders.set_audit(audit)  # a stalled C-STORE's resend is recorded in the same trail as the replay
    sop = info["sop_instance_uid"]
    d = Path(info["path"])
    with _lock:
        if not (d / "reason.json").exists():
            return ReplayResult(sop, "missing", "no such dead letter (already replayed?)")
        files = [f for f in pipeline.result_files(d) if f.name != "source.dcm"]
        if not files:
            return ReplayResult(sop, "nothing", f"nothing to resend ({info.get('reason', '')})")
        done = set(info.get("sent_to", []))
        try:
            pipeline.deliver(files, cfg.destinations, done, context=pipeline.result_context(d))
        except SendFailed as exc:
            audit.record("replay_failed", sop_instance_uid=sop, reason=str(exc))
            return ReplayResult(sop, "failed", f"still failing: {exc}")
        shutil.rmtree(d)
        audit.record("replayed", sop_instance_uid=sop, destinations=sorted(done))
        return ReplayResult(sop, "resent", "resent")
