"""AUC and proportion statistics of a scored film set: the AUC's bootstrap CI, paired AUC differences (overall and
the mean per fold), Wilson intervals, sensitivity / specificity at a threshold. Shared by ``evaluate``,
``cv-report``, the shortcut probe and the stratified report (``training.strata``); the worker loads none of it."""

from __future__ import annotations

import numpy as np

from triage_node.inference.gate import roc_auc

# the torch-free definitions, shared with `validate` and the drift monitor (which never load torch)
from triage_node.monitoring.stats import bootstrap_auc, mw_auc, wilson


def paired_auc_difference(y: np.ndarray, p_new: np.ndarray, p_old: np.ndarray, n: int = 2000,
                          seed: int = 0) -> dict[str, float | int]:
    """AUC(new) - AUC(old) on the same films, with a 95 % CI from a paired stratified bootstrap: each resample
    draws the same positives and negatives for both models, so film-to-film difficulty cancels out (two separate
    CIs that overlap say little about whether one model is better)."""
    y, a, b = np.asarray(y).astype(bool), np.asarray(p_new, np.float64), np.asarray(p_old, np.float64)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    diff = mw_auc(a[pos], a[neg]) - mw_auc(b[pos], b[neg])
    if len(pos) < 2 or len(neg) < 2:
        return {"n": int(len(y)), "difference": diff, "ci95_low": float("nan"), "ci95_high": float("nan")}
    rng = np.random.default_rng(seed)
    ds = []
    for _ in range(n):
        ip, ineg = rng.choice(pos, len(pos)), rng.choice(neg, len(neg))
        ds.append(mw_auc(a[ip], a[ineg]) - mw_auc(b[ip], b[ineg]))
    lo, hi = np.percentile(ds, (2.5, 97.5))
    return {"n": int(len(y)), "difference": diff, "ci95_low": float(lo), "ci95_high": float(hi),
            "share_of_resamples_new_better": float(np.mean(np.array(ds) > 0))}


def classification(y: np.ndarray, p: np.ndarray, t: float | np.ndarray, seed: int = 0) -> dict:
    """AUC with its CI, and sensitivity / specificity / accuracy at threshold ``t``: one for every film, or one
    per film (the operating point of each film's age); ``threshold`` is then the list of distinct ones."""
    y = np.asarray(y).astype(bool)
    ts = np.broadcast_to(np.asarray(t, np.float64), y.shape)
    tp, tn = int((p[y] >= ts[y]).sum()), int((p[~y] < ts[~y]).sum())
    distinct = sorted({float(v) for v in ts})
    return {"n": int(len(y)), "positives": int(y.sum()), "auc": roc_auc(y, p),
            "auc_ci95": bootstrap_auc(y, p, seed=seed),
            "threshold": distinct[0] if len(distinct) == 1 else distinct,
            "sensitivity": tp / max(int(y.sum()), 1), "sensitivity_ci95": wilson(tp, int(y.sum())),
            "specificity": tn / max(int((~y).sum()), 1), "specificity_ci95": wilson(tn, int((~y).sum())),
            "accuracy": (tp + tn) / max(len(y), 1)}


def paired_mean_fold_auc_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, fold: np.ndarray,
                                    n: int = 2000, seed: int = 0) -> dict[str, float | int]:
    """Mean per-fold AUC of scores ``a`` minus that of ``b`` on the same films, with a 95 % CI from a paired
    bootstrap stratified by fold and class: each resample draws, within every fold, the same positives and negatives
    for both. Each fold's AUC compares scores of one model only, so the folds' calibrations cannot distort it (the
    pooled AUC mixes K models' scores)."""
    y, a, b, fold = np.asarray(y).astype(bool), np.asarray(a, np.float64), np.asarray(b, np.float64), np.asarray(fold)
    cells = [(np.flatnonzero(y & (fold == f)), np.flatnonzero(~y & (fold == f))) for f in sorted(set(fold.tolist()))]
    if any(len(pos) < 1 or len(neg) < 1 for pos, neg in cells):
        raise SystemExit("--compare: a fold validates films of one class only: its AUC is undefined")

    def diff(draws: list[tuple[np.ndarray, np.ndarray]]) -> float:
        return float(np.mean([mw_auc(a[p], a[q]) - mw_auc(b[p], b[q]) for p, q in draws]))

    d = diff(cells)
    rng = np.random.default_rng(seed)
    ds = np.array([diff([(rng.choice(p, len(p)), rng.choice(q, len(q))) for p, q in cells]) for _ in range(n)])
    lo, hi = np.percentile(ds, (2.5, 97.5))
    return {"n": int(len(y)), "folds": len(cells), "difference": d, "ci95_low": float(lo), "ci95_high": float(hi),
            "share_of_resamples_new_better": float(np.mean(ds > 0))}
