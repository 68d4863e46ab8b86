"""Input and output drift of the recent films against the model package's reference profile.

The window: the last ``monitoring.window_films`` films analysed (``analysed`` audit lines, one per SOP Instance
UID, the latest) within ``monitoring.window_hours``. Per statistic, the population stability index (PSI) of the
window against the reference bins (``profile.psi``); bands: below ``psi_watch`` (0.1) stable, up to ``psi_drift``
(0.25) watch, above drift. Why PSI rather than a two-sample test: one measure for numeric and categorical
statistics; a size of the shift, not a p-value (which, over hundreds of films, turns significant for shifts too
small to matter and, over few, misses large ones); and the package ships bin shares only, never per-film values.
Before ``min_films`` films the state is ``insufficient`` and no alert changes.

Small windows: with no drift at all, the PSI of n films against N reference films is about a chi-square with
(bins - 1) degrees of freedom times (1/n + 1/N) (mean ~0.12 for 11 bins, n = 100, N = 500; ~0.04 at n = 500). So
a statistic is in the drift band only when its PSI is over ``psi_drift`` *and* over that null distribution's
99.9th percentile at the window's size (watch: ``psi_watch`` and the 99th): a 60-film window needs ~0.6, a 500-film
window the plain 0.25. The band thus means "a shift this large, and not the noise of a small window".

Output drift: the window's flagged rate against the package's validation flagged rate: out of band when the
reference rate lies outside the Wilson interval (``z``) of the window's rate at its size; and the PSI of the
window's scores against the validation score bins when the package has them. A shift in prevalence moves the
flagged rate too: output drift says "look", not "the model is wrong".
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import Any

import numpy as np

from .. import audit as audit_mod
from ..config import Config
from .profile import (
    CATEGORICAL,
    NUMERIC,
    OTHER,
    categorical_counts,
    load_reference_profile,
    numeric_shares,
    psi,
    reference_shares,
    validation_rates,
)
from .site import model_dir
from .stats import wilson

STATES = ("ok", "watch", "drift", "insufficient", "no reference")


_NEEDLE = b'"event": "analysed"'


def analysed_lines(audit_log: str, since: float) -> list[dict[str, Any]]:
    """The trail's ``analysed`` lines written since ``since`` (rotated files included), oldest first. Only the
    lines holding the event's bytes are parsed: the window is read every evaluation, most lines are other hops."""
    out: list[dict[str, Any]] = []
    segs = audit_mod.open_segments(audit_log)
    try:
        for seg in segs:
            if not seg.active and os.fstat(seg.file.fileno()).st_mtime < since:
                continue  # a rotated file last written before the window holds none of it
            for line in seg.file.read().splitlines():
                if _NEEDLE not in line:
                    continue
                try:
                    e = json.loads(line)
                except ValueError:
                    continue  # a torn line
                if isinstance(e, dict) and e.get("event") == "analysed" and e.get("ts", 0) >= since:
                    out.append(e)
    finally:
        for seg in segs:
            seg.file.close()
    return out


def window(cfg: Config, now: float | None = None) -> list[dict[str, Any]]:
    """The window's ``analysed`` audit lines, oldest first, one per SOP Instance UID (the latest)."""
    now = time.time() if now is None else now
    since = now - cfg.monitoring.window_hours * 3600
    latest: dict[str, dict[str, Any]] = {}
    for e in analysed_lines(cfg.audit_log, since):
        if "probability" in e:
            latest.pop(e.get("sop_instance_uid", ""), None)  # re-insert: dict order = last analysis
            latest[e.get("sop_instance_uid", "")] = e
    return list(latest.values())[-cfg.monitoring.window_films:]


def null_psi(q_z: float, bins: int, n: int, ref_n: int) -> float:
    """The ``q_z`` (a standard normal quantile) upper quantile of the PSI without drift: chi-square with
    ``bins - 1`` degrees of freedom (Wilson-Hilferty) times (1/n + 1/ref_n)."""
    k = max(bins - 1, 1)
    chi2 = k * (1 - 2 / (9 * k) + q_z * math.sqrt(2 / (9 * k))) ** 3
    return chi2 * (1 / max(n, 1) + 1 / max(ref_n, 1))


def limit(cfg: Config, n: int, ref_n: int, bins: int) -> float:
    """The PSI from which a statistic is in the drift band at this window's size."""
    return max(cfg.monitoring.psi_drift, null_psi(3.09, bins, n, ref_n))


def band(value: float, cfg: Config, n: int = 10**9, ref_n: int = 10**9, bins: int = 2) -> str:
    """``ok`` / ``watch`` / ``drift`` of a PSI over ``bins`` bins between ``n`` window and ``ref_n`` reference films."""
    if not np.isfinite(value):
        return "ok"
    if value >= limit(cfg, n, ref_n, bins):  # 99.9 % of the null
        return "drift"
    return "watch" if value >= max(cfg.monitoring.psi_watch, null_psi(2.326, bins, n, ref_n)) else "ok"  # 99 %


def _worst(states: list[str]) -> str:
    return "drift" if "drift" in states else "watch" if "watch" in states else "ok"


def input_drift(cfg: Config, films: list[dict[str, Any]], profile: dict | None) -> dict[str, Any]:
    """Per statistic: PSI, band, and the reference and window shares per bin (for the dashboard's plots)."""
    with_stats = [f["stats"] for f in films if isinstance(f.get("stats"), dict)]
    n = len(with_stats)
    out: dict[str, Any] = {"films": n, "statistics": {}}
    if profile is None:
        out["state"] = "no reference"
        return out
    ref_n = int(profile.get("films", 0))
    for k in NUMERIC:
        entry = profile["numeric"].get(k)
        if not entry:
            continue
        counts, m = numeric_shares(entry, [_num(s.get(k)) for s in with_stats])
        ref = reference_shares(entry)
        value = psi(ref, ref_n, counts) if m else float("nan")
        b = _bins(ref, counts)
        out["statistics"][k] = {"kind": "numeric", "psi": value, "band": band(value, cfg, m, ref_n, b),
                                "limit": limit(cfg, m, ref_n, b), "edges": entry["edges"],
                                "reference": ref, "window": _shares(counts)}
    for k in CATEGORICAL:
        entry = profile.get("categorical", {}).get(k)
        if not entry:
            continue
        keys = list(entry) + ([OTHER] if OTHER not in entry else [])
        counts = categorical_counts((s.get(k, "") for s in with_stats), keys)
        ref = [float(entry.get(x, 0.0)) for x in keys]
        value = psi(ref, ref_n, counts) if n else float("nan")
        b = _bins(ref, counts)
        out["statistics"][k] = {"kind": "categorical", "psi": value, "band": band(value, cfg, n, ref_n, b),
                                "limit": limit(cfg, n, ref_n, b), "labels": keys,
                                "reference": ref, "window": _shares(counts)}
    if n < cfg.monitoring.min_films:
        out["state"] = "insufficient"
    else:
        out["state"] = _worst([v["band"] for v in out["statistics"].values()])
    out["drifted"] = sorted(k for k, v in out["statistics"].items() if v["band"] == "drift")
    return out


def output_drift(cfg: Config, films: list[dict[str, Any]], reference: dict | None) -> dict[str, Any]:
    """The window's flagged rate (with its Wilson interval) and score PSI against the validation reference."""
    n = len(films)
    k = sum(1 for f in films if f.get("positive"))
    lo, hi = wilson(k, n, cfg.monitoring.z)
    out: dict[str, Any] = {"films": n, "flagged": k, "flagged_rate": k / n if n else float("nan"),
                           "flagged_ci": [lo, hi]}
    if reference is None:
        out["state"] = "no reference"
        return out
    p0 = float(reference["flagged_rate"])
    out["reference_flagged_rate"] = p0
    out["reference_films"] = int(reference.get("films", 0))
    out["flagged_band"] = "drift" if n and not lo <= p0 <= hi else "ok"
    states = [out["flagged_band"]]
    score = reference.get("score")
    if isinstance(score, dict) and score.get("edges"):
        counts, m = numeric_shares(score, [float(f["probability"]) for f in films])
        ref = reference_shares(score)
        rn = int(reference.get("films", 0))
        value = psi(ref, rn, counts) if m else float("nan")
        out["score"] = {"psi": value, "band": band(value, cfg, m, rn, _bins(ref, counts)), "edges": score["edges"],
                        "reference": ref,
                        "window": _shares(counts)}
        states.append(out["score"]["band"])
    out["state"] = "insufficient" if n < cfg.monitoring.min_films else _worst(states)
    return out


def evaluate(cfg: Config, now: float | None = None) -> dict[str, Any]:
    """The drift report: window size and span, input and output drift, where the reference came from."""
    pkg = model_dir(cfg)
    profile, source = load_reference_profile(pkg, cfg.monitoring.reference_profile)
    films = window(cfg, now)
    ref_out = validation_rates(pkg, profile)
    return {"computed_at": time.time() if now is None else now, "window_films": cfg.monitoring.window_films,
            "window_hours": cfg.monitoring.window_hours, "min_films": cfg.monitoring.min_films,
            "films": len(films), "first_ts": films[0].get("ts") if films else None,
            "reference": source, "profile_films": int(profile.get("films", 0)) if profile else 0,
            "input": input_drift(cfg, films, profile), "output": output_drift(cfg, films, ref_out)}


_cached: dict[str, tuple[float, dict[str, Any]]] = {}
_lock = threading.Lock()


def current(cfg: Config, max_age_s: float = 10.0) -> dict[str, Any]:
    """:func:`evaluate`, computed at most every ``max_age_s`` per audit trail in this process (the dashboard,
    /metrics and the monitor share it)."""
    with _lock:
        hit = _cached.get(cfg.audit_log)
        if hit and time.time() - hit[0] < max_age_s:
            return hit[1]
    report = evaluate(cfg)
    with _lock:
        _cached[cfg.audit_log] = (time.time(), report)
    return report


def _bins(ref: list[float], counts: np.ndarray) -> int:
    """Bins that either side uses (the degrees of freedom of the null distribution, plus one)."""
    return int(np.sum((np.asarray(ref) > 0) | (np.asarray(counts) > 0)))


def _shares(counts: np.ndarray) -> list[float]:
    total = float(np.sum(counts))
    return [float(c / total) if total else 0.0 for c in counts]


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def jsonable(obj: Any) -> Any:
    """The report with NaN and infinities as None (browsers' JSON.parse refuses NaN)."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
