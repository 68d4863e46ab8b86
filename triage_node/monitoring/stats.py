"""Small statistics without torch (the validate and monitoring paths never load the model's libraries).

Mann-Whitney AUC with ties counted half, a bootstrap stratified by label, Wilson score intervals: the one
definition of each, here so that ``triage-node validate`` and the web process stay torch-free; ``training.auc``
(evaluate, cv-report, the shortcut probe) imports them from here.
"""

from __future__ import annotations

import math

import numpy as np


def mw_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC of positive scores over negative scores: Mann-Whitney, ties counted half (rank-based, O(n log n))."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    if not len(pos) or not len(neg):
        return float("nan")
    allv = np.concatenate([pos, neg])
    order = np.argsort(allv, kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def auc(y: np.ndarray, p: np.ndarray) -> float:
    y, p = np.asarray(y).astype(bool), np.asarray(p, np.float64)
    return mw_auc(p[y], p[~y])


def bootstrap_auc(y: np.ndarray, p: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile CI of the AUC, resampling positives and negatives separately (stratified); NaN with fewer
    than two of either."""
    y, p = np.asarray(y).astype(bool), np.asarray(p, np.float64)
    pos, neg = p[y], p[~y]
    if len(pos) < 2 or len(neg) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    aucs = [mw_auc(rng.choice(pos, len(pos)), rng.choice(neg, len(neg))) for _ in range(n)]
    lo, hi = np.percentile(aucs, (2.5, 97.5))
    return float(lo), float(hi)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (NaN, NaN for n = 0)."""
    if n <= 0:
        return float("nan"), float("nan")
    ph = k / n
    den = 1 + z * z / n
    centre = (ph + z * z / (2 * n)) / den
    half = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)
