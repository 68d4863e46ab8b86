"""RSNA Pneumonia Detection Challenge metric (Kaggle's definition), mAP@0.5 and image-level rates.

Boxes are (x, y, width, height) in pixels, continuous coordinates (IoU without the +1 convention).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

THRESHOLDS = tuple(round(0.40 + 0.05 * i, 2) for i in range(8))  # 0.40, 0.45, ..., 0.75
_EPS = 1e-9


def iou_matrix(a: npt.ArrayLike, b: npt.ArrayLike) -> np.ndarray:
    """Pairwise IoU of xywh boxes: (len(a), len(b))."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    ax1, ay1, bx1, by1 = a[:, 0:1] + a[:, 2:3], a[:, 1:2] + a[:, 3:4], b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(a[:, 0:1], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(a[:, 1:2], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def image_score(gt: npt.ArrayLike, pred: npt.ArrayLike, scores: npt.ArrayLike | None = None,
                thresholds: Sequence[float] = THRESHOLDS) -> float | None:
    """Kaggle RSNA score of one image, or None when it has neither ground truth nor predictions (skipped).

    For each IoU threshold t: predictions in descending score order each take the unmatched ground-truth box with
    the highest IoU, if that IoU >= t (TP), else they are FP; unmatched ground truth are FN; the image scores
    TP / (TP + FP + FN), averaged over the thresholds. Any prediction on an image without ground truth scores 0.
    """
    g = np.asarray(gt, np.float64).reshape(-1, 4)
    pr = np.asarray(pred, np.float64).reshape(-1, 4)
    if len(g) == 0 and len(pr) == 0:
        return None
    if len(g) == 0 or len(pr) == 0:
        return 0.0
    if scores is not None:
        pr = pr[np.argsort(-np.asarray(scores, np.float64), kind="stable")]
    ious = iou_matrix(pr, g)
    total = 0.0
    for t in thresholds:
        used = np.zeros(len(g), bool)
        tp = 0
        for i in range(len(pr)):
            cand = np.where(used, -1.0, ious[i])
            j = int(np.argmax(cand))
            if cand[j] >= t - _EPS:
                used[j] = True
                tp += 1
        fp, fn = len(pr) - tp, len(g) - tp
        total += tp / (tp + fp + fn)
    return total / len(thresholds)


def rsna_score(gts: Iterable[npt.ArrayLike], preds: Iterable[npt.ArrayLike],
               scores: Iterable[npt.ArrayLike] | None = None) -> float:
    """Mean of :func:`image_score` over images that are not skipped (1.0 if all are skipped: nothing to find)."""
    per_image: Iterable[npt.ArrayLike | None] = scores if scores is not None else itertools.repeat(None)
    vals = [s for g, p, sc in zip(gts, preds, per_image) if (s := image_score(g, p, sc)) is not None]
    return float(np.mean(vals)) if vals else 1.0


def average_precision(gts: Sequence[npt.ArrayLike], preds: Sequence[npt.ArrayLike], scores: Sequence[npt.ArrayLike],
                      iou: float = 0.5) -> tuple[float, np.ndarray, np.ndarray]:
    """Dataset-level AP at one IoU (all-point interpolation, VOC style). Returns (AP, precision, recall)."""
    n_gt = sum(len(np.asarray(g).reshape(-1, 4)) for g in gts)
    recs = []  # (score, image, pred index)
    for k, s in enumerate(scores):
        recs += [(float(sc), k, i) for i, sc in enumerate(np.asarray(s).reshape(-1))]
    recs.sort(key=lambda r: -r[0])
    used = [np.zeros(len(np.asarray(g).reshape(-1, 4)), bool) for g in gts]
    tp = np.zeros(len(recs))
    for r, (_, k, i) in enumerate(recs):
        g = np.asarray(gts[k]).reshape(-1, 4)
        if len(g) == 0:
            continue
        ov = iou_matrix(np.asarray(preds[k]).reshape(-1, 4)[i:i + 1], g)[0]
        ov = np.where(used[k], -1, ov)
        j = int(np.argmax(ov))
        if ov[j] >= iou - _EPS:
            used[k][j] = True
            tp[r] = 1
    if n_gt == 0:
        return float("nan"), np.zeros(0), np.zeros(0)
    ctp = np.cumsum(tp)
    rec = ctp / n_gt
    prec = ctp / np.arange(1, len(recs) + 1)
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[1.0], prec, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1])), prec, rec


def sens_spec(y: npt.ArrayLike, positive: npt.ArrayLike) -> tuple[float, float]:
    yb, p = np.asarray(y, bool), np.asarray(positive, bool)
    sens = float(p[yb].mean()) if yb.any() else float("nan")
    spec = float((~p[~yb]).mean()) if (~yb).any() else float("nan")
    return sens, spec
