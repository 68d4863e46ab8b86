"""The periodic drift evaluation of ``triage-node up`` / ``serve``: state changes audited and sent, once each.

Every ``monitoring.interval_s`` the monitor evaluates the window (``drift.current``). The input and output drift
states (``ok``, ``watch``, ``drift``) are kept in ``<spool>/../monitor/state.json``; when one changes (a window
still ``insufficient``, or without a reference, changes nothing), the change is audited (``drift_state``); one
into or out of ``drift`` is also told to the flag channels named in ``monitoring.alert_to`` (kinds ``webhook``:
JSON; ``fhir``: a transaction Bundle with one DetectedIssue; ``hl7``: an ORU^R01 without a patient), once per
change, never per film. Alerts are about the node, not a patient: they go in shadow mode too.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..config import Config, Destination
from ..spool import atomic_write
from . import drift

log = logging.getLogger(__name__)
KINDS = ("input", "output")
CHANGEABLE = ("ok", "watch", "drift")
ALERT_KINDS = ("webhook", "fhir", "hl7")


def state_path(cfg: Config) -> Path:
    return Path(cfg.spool.directory).parent / "monitor" / "state.json"


def load_state(cfg: Config) -> dict[str, str]:
    try:
        data = json.loads(state_path(cfg).read_text())
        return {k: str(data.get(k, "ok")) for k in KINDS}
    except (OSError, ValueError, AttributeError):
        return dict.fromkeys(KINDS, "ok")


def alert_body(kind: str, before: str, after: str, report: dict[str, Any]) -> dict[str, Any]:
    part = report[kind]
    detail = (f"statistics out of band: {', '.join(part.get('drifted', [])) or 'none'}" if kind == "input" else
              f"flagged rate {part.get('flagged_rate', 0):.3f} over {part.get('films')} films against "
              f"{part.get('reference_flagged_rate', float('nan')):.3f} on validation")
    return {"event": "cxr-triage-drift", "kind": kind, "state_from": before, "state": after, "detail": detail,
            "films": part.get("films"), "reference": report.get("reference"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def send_alert(dest: Destination, body: dict[str, Any]) -> None:
    """Tell one flag channel (raises SendFailed / OSError; the caller logs and audits)."""
    from ..transport.flags import _esc, _mllp_exchange, _post_json

    if dest.kind == "webhook":
        _post_json(dest.name, dest.url, body, dest, "application/json")
    elif dest.kind == "fhir":
        issue = {"resourceType": "DetectedIssue", "status": "preliminary",
                 "severity": "high" if body["state"] == "drift" else "low",
                 "code": {"text": f"AI triage {body['kind']} drift"},
                 "detail": f"{body['kind']} drift {body['state_from']} -> {body['state']}: {body['detail']}",
                 "identifiedDateTime": body["time"]}
        _post_json(dest.name, dest.url, {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": issue,
             "request": {"method": "POST", "url": "DetectedIssue"}}]}, dest, "application/fhir+json")
    elif dest.kind == "hl7":
        ts = time.strftime("%Y%m%d%H%M%S")
        msg = "\r".join([
            f"MSH|^~\\&|CXR-TRIAGE|{_esc(dest.calling_ae_title)}|{_esc(dest.receiving_application)}|"
            f"{_esc(dest.receiving_facility)}|{ts}||ORU^R01^ORU_R01|{uuid.uuid4().hex[:20]}|P|2.5.1",
            f"OBR|1|||DRIFT^AI triage {body['kind']} drift^L|||{ts}",
            f"OBX|1|ST|DRIFT^Drift state^L||{_esc(body['state'])}||||||P",
            f"OBX|2|ST|DETAIL^Detail^L||{_esc(body['detail'])}||||||P"]) + "\r"
        _mllp_exchange(dest.host, dest.port, msg, dest.timeout)
    else:
        raise ValueError(f"destination {dest.name!r} of kind {dest.kind!r} cannot take drift alerts")


class Monitor:
    """Evaluates every ``interval_s`` in a daemon thread; ``check()`` does one evaluation (tests, ``status``)."""

    def __init__(self, cfg: Config, audit) -> None:
        self.cfg, self.audit = cfg, audit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        kinds = {d.name: d.kind for d in cfg.destinations}
        for name in cfg.monitoring.alert_to:
            if kinds.get(name) not in ALERT_KINDS:
                log.error("monitoring.alert_to names %r, which is not a destination of kind %s: its alerts will fail",
                          name, ", ".join(ALERT_KINDS))

    def start(self) -> Monitor:
        self._thread = threading.Thread(target=self._run, name="drift-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.monitoring.interval_s):
            try:
                self.check()
            except Exception:  # the monitor must never take the receiver down
                log.exception("drift monitor: evaluation failed")

    def check(self) -> dict[str, str]:
        report = drift.current(self.cfg, max_age_s=min(10.0, self.cfg.monitoring.interval_s / 2))
        before = load_state(self.cfg)
        after = dict(before)
        for kind in KINDS:
            state = report[kind]["state"]
            if state in CHANGEABLE and state != before[kind]:
                after[kind] = state
                self._changed(kind, before[kind], state, report)
        if after != before or not state_path(self.cfg).exists():
            state_path(self.cfg).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(state_path(self.cfg), json.dumps(after).encode(), durable=False)
        return after

    def _changed(self, kind: str, before: str, after: str, report: dict[str, Any]) -> None:
        body = alert_body(kind, before, after, report)
        log.warning("%s drift state %s -> %s: %s", kind, before, after, body["detail"])
        told, failed = [], []
        by_name = {d.name: d for d in self.cfg.destinations}
        # ok <-> watch is audited only: a statistic near its watch band must not page anyone at every evaluation
        for name in self.cfg.monitoring.alert_to if "drift" in (before, after) else ():
            dest = by_name.get(name)
            try:
                if dest is None:
                    raise ValueError(f"no destination named {name!r}")
                send_alert(dest, body)
                told.append(name)
            except Exception as exc:
                log.warning("drift alert to %s failed: %s", name, exc)
                failed.append(f"{name}: {type(exc).__name__}: {exc}"[:200])
        self.audit.record("drift_state", kind=kind, state_from=before, state=after, detail=body["detail"],
                          films=body["films"], alerted=told, alert_failures=failed)
