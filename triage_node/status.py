"""Terminal summary of the audit trail, the spool and the dead letters (``triage-node status``)."""

from __future__ import annotations

import time
from collections import Counter

from . import audit as audit_mod
from .config import Config
from .spool import Spool
from .web.state import percentile


def summarise(cfg: Config, spool: Spool, last_s: float = 3600.0) -> str:
    since = time.time() - last_s
    # rotated files last written before ``since`` are not even opened; the window may span a rotation
    entries = [e for e in audit_mod.read(cfg.audit_log, since=since) if e.get("ts", 0) >= since]
    counts = Counter(e["event"] for e in entries)
    reasons = Counter((e["event"], e.get("reason", "")) for e in entries
                      if e["event"] in ("skipped", "refused", "failed", "dead_lettered"))
    lat = [float(e["latency_s"]) for e in entries if e["event"] == "sent" and "latency_s" in e]
    flagged = [e for e in entries if e["event"] == "sent" and e.get("positive")]
    activity = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no activity"
    lines = [mode_line(cfg), f"last {last_s / 60:.0f} min: {activity}"]
    if lat:
        lines.append(f"receive -> result sent: p50 {percentile(lat, 50):.2f} s, p95 {percentile(lat, 95):.2f} s, "
                     f"max {max(lat):.2f} s over {len(lat)} result(s)")
    for (ev, why), n in reasons.most_common(10):
        lines.append(f"  {ev}: {why} x{n}")
    for e in flagged[-10:]:
        lines.append(f"  FLAGGED {e['sop_instance_uid']} p={e.get('probability')} boxes={e.get('boxes')}")
    why = spool.refusal()
    lines.append(f"spool pending: {len(spool.pending())}, disk used {spool.disk_usage():.0%}, "
                 f"{spool.free_bytes() / 2**30:.1f} GiB free" + (f"; REFUSING NEW INSTANCES: {why}" if why else ""))
    dl = spool.dead_letters()
    lines.append(f"dead letters: {len(dl)}")
    for info in dl[-10:]:
        lines.append(f"  {info['sop_instance_uid']}: {info['reason']}")
    lines += drift_lines(cfg)
    return "\n".join(lines)


def mode_line(cfg: Config) -> str:
    from .monitoring import mode

    current, source = mode.current(cfg, strict=False)
    if current == "shadow":
        return f"MODE: SHADOW ({source}) -- films are analysed and archived, NOTHING is sent to PACS or flag channels"
    return f"mode: live ({source})"


def drift_lines(cfg: Config) -> list[str]:
    """The drift monitor's view: window, reference, input and output state, the statistics out of band."""
    from .monitoring import drift

    r = drift.evaluate(cfg)
    inp, out = r["input"], r["output"]
    lines = [f"drift window: {r['films']} film(s) (last {r['window_films']} within {r['window_hours']:g} h, state "
             f"changes from {r['min_films']}); reference: {r['reference']}",
             f"  INPUT DRIFT: {inp['state'].upper()}" + (f" ({', '.join(inp.get('drifted', []))})"
                                                         if inp.get("drifted") else "")]
    for name, st in sorted(inp.get("statistics", {}).items(), key=lambda kv: -(kv[1]["psi"] or 0)):
        if st["band"] != "ok":
            lines.append(f"    {name}: PSI {st['psi']:.2f} ({st['band']})")
    rate = out.get("flagged_rate")
    lines.append(f"  OUTPUT DRIFT: {out['state'].upper()}: flagged {out['flagged']}/{out['films']}"
                 + (f" = {rate:.3f} [{out['flagged_ci'][0]:.3f}, {out['flagged_ci'][1]:.3f}]" if out['films'] else "")
                 + (f" vs {out['reference_flagged_rate']:.3f} on validation" if "reference_flagged_rate" in out
                    else " (no validation rate in the model package)"))
    return lines
