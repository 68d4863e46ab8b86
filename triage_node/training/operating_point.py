"""Operating points chosen on validation scores: a sensitivity target, a specificity floor, and what they give."""

from __future__ import annotations

import math

import numpy as np


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, sensitivity: float) -> float:
    """The highest threshold whose sensitivity on (y, p) is still >= ``sensitivity`` (midpoint to the next lower
    score, so the operating point does not sit exactly on a validation score)."""
    y, p = np.asarray(y).astype(bool), np.asarray(p, np.float64)
    pos = np.sort(p[y])[::-1]
    k = max(int(math.ceil(sensitivity * len(pos))), 1)
    t = pos[k - 1]
    lower = p[p < t]
    return float((t + lower.max()) / 2) if len(lower) else float(t)


def threshold_for_specificity(y: np.ndarray, p: np.ndarray, specificity: float) -> float:
    """The lowest threshold whose specificity on (y, p) is >= ``specificity``: midway between the highest negative
    score it must clear and the next higher score."""
    y, p = np.asarray(y).astype(bool), np.asarray(p, np.float64)
    neg = np.sort(p[~y])
    k = min(max(int(math.ceil(specificity * len(neg))), 1), len(neg))
    t = neg[k - 1]
    higher = p[p > t]
    return float((t + higher.min()) / 2) if len(higher) else float(np.nextafter(t, np.inf))


def choose_operating_point(y: np.ndarray, p: np.ndarray, sensitivity: float, min_specificity: float = 0.0,
                           source: str = "") -> dict:
    """The highest threshold with sensitivity >= ``sensitivity``, raised where needed so that specificity is
    >= ``min_specificity`` (a floor: a point chosen for sensitivity on one collection of films loses specificity
    on the next one; Kermany's test folder lost half of it)."""
    t = threshold_for_sensitivity(y, p, sensitivity)
    rule = f"highest threshold with sensitivity >= {sensitivity} on the {source} validation split"
    if min_specificity > 0:
        floor = threshold_for_specificity(y, p, min_specificity)
        rule += f", raised to specificity >= {min_specificity} where it fell below"
        if floor > t:
            t = floor
            rule += " (raised here)"
    return operating_point(y, p, t) | {"rule": rule}


def operating_point(y: np.ndarray, p: np.ndarray, t: float) -> dict:
    y = np.asarray(y).astype(bool)
    return {"threshold": t, "sensitivity": float((p[y] >= t).mean()), "specificity": float((p[~y] < t).mean()),
            "accuracy": float(((p >= t) == y).mean()), "n": int(len(y)), "positives": int(y.sum())}
