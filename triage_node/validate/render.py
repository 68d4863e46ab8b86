"""The validation report as files: ``report.json``, ``roc.png``, ``scores.png`` and ``report.html``."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ci(pair: list[float]) -> str:
    return f"[{_fmt(pair[0])}, {_fmt(pair[1])}]" if pair else ""


def plots(report: dict[str, Any], out: Path) -> None:
    """ROC curve (with the operating point) and the score histograms of positive and negative films."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    films = report["films"]
    y = np.array([f["label"] for f in films], bool)
    p = np.array([f["probability"] for f in films], np.float64)
    o = report["overall"]
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    if y.any() and (~y).any():
        ts = np.unique(np.concatenate([p, [np.inf]]))[::-1]
        tpr = [float((p[y] >= t).mean()) for t in ts]
        fpr = [float((p[~y] >= t).mean()) for t in ts]
        ax.plot(fpr, tpr, lw=2, label=f"AUC {_fmt(o['auc'])} {_ci(o['auc_ci95'])}")
        ax.plot([1 - o["specificity"]], [o["sensitivity"]], "o", color="crimson", label="operating point")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, {o['n']} films", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "roc.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5.5, 3.2), dpi=100)
    bins = [i / 20 for i in range(21)]
    ax.hist([p[~y], p[y]], bins=bins, label=["label 0", "label 1"], color=["#4a7ab5", "#d9534f"])
    for t in {f.get("threshold") for f in report["discordant"]} - {None}:
        ax.axvline(t, color="black", ls="--", lw=1)
    ax.set(xlabel="score", ylabel="films", title="Scores by ground truth")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scores.png")
    plt.close(fig)


def _table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _metrics_row(name: str, c: dict[str, Any]) -> list[Any]:
    return [name, c["n"], c["positives"], f"{_fmt(c['auc'])} {_ci(c['auc_ci95'])}",
            f"{_fmt(c['sensitivity'])} {_ci(c['sensitivity_ci95'])}",
            f"{_fmt(c['specificity'])} {_ci(c['specificity_ci95'])}"]


def write_html(report: dict[str, Any], out: Path) -> Path:
    o = report["overall"]
    heads = ["group", "films", "positives", "AUC [95 % CI]", "sensitivity [95 % CI]", "specificity [95 % CI]"]
    sub = "".join(f"<h3>By {html.escape(g.replace('_', ' '))}</h3>"
                  + _table(heads, [_metrics_row(k, v) for k, v in groups.items()])
                  for g, groups in report["subgroups"].items())
    cal = _table(["score bin", "films", "mean score", "observed positive share [95 % CI]"],
                 [[r["bin"], r["n"], _fmt(r["mean_score"]), f"{_fmt(r['observed'])} {_ci(r['observed_ci95'])}"]
                  for r in report["calibration"]])
    disc = _table(["SOP Instance UID", "accession", "kind", "score", "threshold", "operating point", "truth from"],
                  [[d["sop_instance_uid"], d["accession"], d["kind"], _fmt(d["probability"]), _fmt(d["threshold"]),
                    d["operating_point"] or "(package)", d["truth_from"]
                    + (" (uncertain wording)" if d["uncertain_report"] else "")] for d in report["discordant"]],
                  "discordant")
    rejected = ("<ul class='rejected'>" + "".join(f"<li>{html.escape(e)}</li>" for e in report["rejected_input"])
                + "</ul>") if report["rejected_input"] else "<p>None.</p>"
    doc = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Local validation: {
        html.escape(report['model'])}</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}} h1{{font-size:1.5em}}
table{{border-collapse:collapse;margin:.5em 0 1.5em}} td,th{{border:1px solid #ccc;padding:.25em .6em;font-size:.9em}}
th{{background:#f2f2f2}} .headline{{font-size:1.15em;background:#eef4fb;padding:.8em;border-radius:6px}}
.warn{{color:#a94442}} img{{margin-right:1em;border:1px solid #ddd}} td:first-child{{font-family:monospace}}
</style></head><body>
<h1>Local validation of {html.escape(report['model'])}</h1>
<p class="headline" id="headline">{o['n']} films with ground truth ({o['positives']} positive):
AUC <b>{_fmt(o['auc'])}</b> {_ci(o['auc_ci95'])}; at the operating point sensitivity <b>{_fmt(o['sensitivity'])}</b>
{_ci(o['sensitivity_ci95'])}, specificity <b>{_fmt(o['specificity'])}</b> {_ci(o['specificity_ci95'])};
{o['tp']} true positives, {o['fn']} false negatives, {o['tn']} true negatives, {o['fp']} false positives.</p>
<p>Operating point(s): {html.escape(', '.join(report['operating_points']))}. Ground truth: {
        html.escape(', '.join(report.get('truth_sources', [])))}. {report['uncertain_reports']} film(s) labelled
positive from a report that only says the finding is possible. Confidence intervals: AUC by a bootstrap stratified by
label (2,000 resamples), proportions by Wilson's score interval.</p>
<p class="warn">{html.escape(report.get('warning', ''))}</p>
<img src="roc.png" alt="ROC curve"><img src="scores.png" alt="score histogram">
<h2>Within subgroups</h2>{sub}
<h2>Calibration</h2>{cal}
<h2>Discordant films ({len(report['discordant'])})</h2>{disc}
<h2>Rejected input ({len(report['rejected_input'])})</h2>{rejected}
</body></html>
"""
    path = out / "report.html"
    path.write_text(doc)
    return path


def write_all(report: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(_finite(report), indent=1) + "\n")
    plots(report, out)
    return write_html(report, out)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
