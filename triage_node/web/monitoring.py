"""What the dashboard and /metrics show of monitoring: the outputs mode (SHADOW) and the drift report."""

from __future__ import annotations

from typing import Any

from prometheus_client.core import GaugeMetricFamily

from ..config import Config
from ..monitoring import drift, mode

STATE_VALUE = {"ok": 0, "watch": 1, "drift": 2, "insufficient": -1, "no reference": -2}


def overview(cfg: Config) -> dict[str, Any]:
    """``mode`` and ``drift`` for /api/overview (NaN as null)."""
    current, source = mode.current(cfg, strict=False)
    return {"mode": {"mode": current, "source": source},
            "drift": drift.jsonable(drift.current(cfg, max_age_s=min(10.0, cfg.monitoring.interval_s)))}


def collect(cfg: Config):
    """Prometheus families: ``triage_mode``, ``triage_input_drift{statistic}``, the drift state gauges and the
    output window's flagged rate beside the reference."""
    current, _ = mode.current(cfg, strict=False)
    g = GaugeMetricFamily("triage_mode", "Outputs mode: 1 for the mode in force (shadow: nothing is sent)",
                          labels=["mode"])
    for m in mode.MODES:
        g.add_metric([m], 1 if m == current else 0)
    yield g
    r = drift.current(cfg, max_age_s=min(10.0, cfg.monitoring.interval_s))
    inp, out = r["input"], r["output"]
    g = GaugeMetricFamily("triage_input_drift", "Population stability index of each input statistic over the "
                          "window against the model package's reference profile", labels=["statistic"])
    for name, st in sorted(inp.get("statistics", {}).items()):
        if st["psi"] == st["psi"]:  # not NaN
            g.add_metric([name], st["psi"])
    yield g
    g = GaugeMetricFamily("triage_input_drift_statistic_state", "Band of each input statistic: 0 ok, 1 watch, "
                          "2 drift", labels=["statistic"])
    for name, st in sorted(inp.get("statistics", {}).items()):
        g.add_metric([name], STATE_VALUE[st["band"]])
    yield g
    for kind, part in (("input", inp), ("output", out)):
        g = GaugeMetricFamily(f"triage_{kind}_drift_state", f"{kind.capitalize()} drift state: 0 ok, 1 watch, "
                              "2 drift, -1 too few films in the window, -2 no reference in the model package")
        g.add_metric([], STATE_VALUE[part["state"]])
        yield g
    yield GaugeMetricFamily("triage_drift_window_films", "Films in the drift window", value=r["films"])
    if out["films"]:
        yield GaugeMetricFamily("triage_window_flagged_ratio", "Share of the window's films flagged",
                                value=out["flagged_rate"])
    if "reference_flagged_rate" in out:
        yield GaugeMetricFamily("triage_reference_flagged_ratio", "Flagged share on the model's validation films",
                                value=out["reference_flagged_rate"])
    if "score" in out and out["score"]["psi"] == out["score"]["psi"]:
        yield GaugeMetricFamily("triage_output_score_drift", "PSI of the window's scores against validation",
                                value=out["score"]["psi"])
