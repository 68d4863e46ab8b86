"""Join the site's ground truth with what the node recorded, and measure.

What the node recorded is its audit trail (every rotated file): per film the ``analysed`` line (score, whether it
was flagged at its operating point, the threshold and the point's name, the model, the input statistics: view,
age band, manufacturer) and the ``received`` line (Study Instance UID, Accession Number). A film analysed twice
counts once per model, by that model's latest analysis. Only the films of one model (default: the one that
analysed the most recent film) are measured: scores of two models do not mix.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import audit as audit_mod
from ..monitoring.stats import auc, bootstrap_auc, wilson
from .truth import Truth

SUBGROUPS = ("view", "age_band", "manufacturer")


@dataclass
class Film:
    sop_instance_uid: str
    study_instance_uid: str
    accession: str
    probability: float
    flagged: bool
    threshold: float | None
    operating_point: str
    model: str
    stats: dict[str, Any] = field(default_factory=dict)
    label: int = -1
    truth_from: str = ""
    uncertain: bool = False


def recorded_films(audit_path: str, model: str | None = None) -> tuple[list[Film], str, dict[str, int]]:
    """(films of ``model``, the model label, how many films each model analysed) from the audit trail."""
    received: dict[str, dict[str, Any]] = {}
    analysed: dict[tuple[str, str], dict[str, Any]] = {}  # (SOP, model) -> the latest analysis by that model
    for e in audit_mod.read(audit_path):
        ev, sop = e.get("event"), e.get("sop_instance_uid", "")
        if ev == "received" and sop:
            received[sop] = e
        elif ev == "analysed" and sop and "probability" in e:
            key = (sop, str(e.get("model", "")))
            analysed.pop(key, None)
            analysed[key] = e
    models: dict[str, int] = defaultdict(int)
    for _, m in analysed:
        models[m] += 1
    if model is None:
        model = list(analysed)[-1][1] if analysed else ""
    films = []
    for (sop, m), e in analysed.items():
        if m != model:
            continue
        r = received.get(sop, {})
        films.append(Film(sop, str(r.get("study_instance_uid", "")), str(r.get("accession", "")),
                          float(e["probability"]), bool(e.get("positive")),
                          float(e["threshold"]) if "threshold" in e else None, str(e.get("operating_point", "")),
                          model, dict(e["stats"]) if isinstance(e.get("stats"), dict) else {}))
    return films, model, dict(models)


def join(films: list[Film], truth: Truth) -> list[Film]:
    """Label the films the truth names (by SOP Instance UID, else Accession Number, else Study Instance UID); each
    key of the truth that names no recorded film becomes an error of ``truth``."""
    used: set[str] = set()
    labelled = []
    for f in films:
        for key, table in ((f.sop_instance_uid, truth.by_sop), (f.accession, truth.by_accession),
                           (f.study_instance_uid, truth.by_study)):
            if key and key in table:
                f.label, f.truth_from, f.uncertain = table[key], truth.origin.get(key, ""), key in truth.uncertain
                used.add(key)
                labelled.append(f)
                break
    for what, table in (("SOP Instance UID", truth.by_sop), ("Accession Number", truth.by_accession),
                        ("Study Instance UID", truth.by_study)):
        for key in table:
            if key not in used and not _same_report(key, truth, used):
                truth.errors.append(f"{truth.origin.get(key, '?')}: {what} {key} was not analysed by this node "
                                    f"(or by another model)")
    return labelled


def _same_report(key: str, truth: Truth, used: set[str]) -> bool:
    """An ORU message gives both an accession and a Study UID: one of them matching is enough."""
    where = truth.origin.get(key)
    return any(truth.origin.get(k) == where for k in used) if where and " message " in where else False


def classification(films: list[Film], seed: int = 0) -> dict[str, Any]:
    """AUC (bootstrap CI), sensitivity and specificity at each film's own operating point (Wilson CIs)."""
    y = np.array([f.label for f in films], bool)
    p = np.array([f.probability for f in films], np.float64)
    flagged = np.array([f.flagged for f in films], bool)
    tp, fn = int((flagged & y).sum()), int((~flagged & y).sum())
    tn, fp = int((~flagged & ~y).sum()), int((flagged & ~y).sum())
    return {"n": int(len(y)), "positives": int(y.sum()), "negatives": int((~y).sum()),
            "auc": auc(y, p) if y.any() and (~y).any() else float("nan"),
            "auc_ci95": list(bootstrap_auc(y, p, seed=seed)),
            "tp": tp, "fn": fn, "tn": tn, "fp": fp,
            "sensitivity": tp / (tp + fn) if tp + fn else float("nan"), "sensitivity_ci95": list(wilson(tp, tp + fn)),
            "specificity": tn / (tn + fp) if tn + fp else float("nan"), "specificity_ci95": list(wilson(tn, tn + fp)),
            "flagged_rate": float(flagged.mean()) if len(y) else float("nan")}


def calibration_table(films: list[Film], bins: int = 10) -> list[dict[str, Any]]:
    """Per score bin of width 1 / ``bins``: films, mean score, observed positive share (Wilson CI)."""
    rows = []
    for i in range(bins):
        lo, hi = i / bins, (i + 1) / bins
        sel = [f for f in films if lo <= f.probability < hi or (i == bins - 1 and f.probability == 1.0)]
        k = sum(f.label for f in sel)
        rows.append({"bin": f"{lo:.1f}-{hi:.1f}", "n": len(sel),
                     "mean_score": float(np.mean([f.probability for f in sel])) if sel else float("nan"),
                     "observed": k / len(sel) if sel else float("nan"), "observed_ci95": list(wilson(k, len(sel)))})
    return rows


def discordant(films: list[Film]) -> list[dict[str, Any]]:
    """Films the node judged otherwise than the truth, the most confident first."""
    out = [{"sop_instance_uid": f.sop_instance_uid, "accession": f.accession, "label": f.label,
            "probability": f.probability, "threshold": f.threshold, "operating_point": f.operating_point,
            "kind": "false negative" if f.label else "false positive", "truth_from": f.truth_from,
            "uncertain_report": f.uncertain}
           for f in films if f.flagged != bool(f.label)]
    return sorted(out, key=lambda d: -abs(d["probability"] - (d["threshold"] if d["threshold"] is not None else 0.5)))


def measure(films: list[Film], model: str, truth: Truth, seed: int = 0) -> dict[str, Any]:
    """The whole report as a JSON-able dict."""
    report: dict[str, Any] = {"model": model, "overall": classification(films, seed), "subgroups": {},
                              "calibration": calibration_table(films), "discordant": discordant(films),
                              "uncertain_reports": sum(f.uncertain for f in films),
                              "operating_points": sorted({f.operating_point or "(package)" for f in films}),
                              "rejected_input": list(truth.errors)}
    for g in SUBGROUPS:
        groups: dict[str, list[Film]] = defaultdict(list)
        for f in films:
            groups[str(f.stats.get(g, "") or "unknown")].append(f)
        report["subgroups"][g] = {k: classification(v, seed) for k, v in sorted(groups.items())}
    report["films"] = [{"sop_instance_uid": f.sop_instance_uid, "label": f.label, "probability": f.probability,
                        "flagged": f.flagged, **{g: f.stats.get(g, "") for g in SUBGROUPS}} for f in films]
    return report
