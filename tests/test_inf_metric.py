"""The RSNA challenge metric pinned on hand-worked cases."""

import numpy as np
import pytest

from triage_node.training.metric import THRESHOLDS, average_precision, image_score, iou_matrix, rsna_score


def box_with_iou(iou: float, w: float = 100.0) -> list[float]:
    """A box of the same height as [0,0,w,100] shifted right so that the IoU is exactly ``iou``."""
    # overlap (w - d) * 100, union (w + d) * 100  ->  d = w (1 - iou) / (1 + iou)
    return [w * (1 - iou) / (1 + iou), 0.0, w, 100.0]


def test_thresholds_are_kaggles():
    assert THRESHOLDS == (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)


def test_empty_gt_and_no_prediction_is_skipped():
    assert image_score(np.zeros((0, 4)), np.zeros((0, 4))) is None
    # skipped images do not dilute the mean
    assert rsna_score([np.zeros((0, 4)), np.array([[0, 0, 100, 100]])],
                      [np.zeros((0, 4)), np.array([[0, 0, 100, 100]])], [[], [0.9]]) == pytest.approx(1.0)


def test_any_box_on_negative_scores_zero():
    assert image_score(np.zeros((0, 4)), np.array([[10, 10, 50, 50]]), [0.99]) == 0.0
    assert rsna_score([np.zeros((0, 4)), np.array([[0, 0, 100, 100]])],
                      [np.array([[1, 1, 5, 5]]), np.array([[0, 0, 100, 100]])], [[0.1], [0.9]]) == pytest.approx(0.5)


def test_missed_positive_scores_zero():
    assert image_score(np.array([[0, 0, 10, 10]]), np.zeros((0, 4))) == 0.0


def test_iou_sweep_06_gives_5_of_8():
    gt = np.array([[0, 0, 100, 100]])
    pred = np.array([box_with_iou(0.6)])
    assert iou_matrix(pred, gt)[0, 0] == pytest.approx(0.6)
    assert image_score(gt, pred, [0.5]) == pytest.approx(5 / 8)  # TP at 0.40..0.60, then FP+FN (0/2)


def test_perfect_and_partial_counts():
    gt = np.array([[0, 0, 100, 100], [500, 500, 100, 100]])
    assert image_score(gt, gt.copy(), [0.9, 0.8]) == pytest.approx(1.0)
    # one exact match, one GT missed, one far FP: TP=1, FP=1, FN=1 -> 1/3 at every threshold
    pred = np.array([[0, 0, 100, 100], [900, 0, 50, 50]])
    assert image_score(gt, pred, [0.9, 0.8]) == pytest.approx(1 / 3)


def test_greedy_matching_by_descending_score():
    gt = np.array([[0, 0, 100, 100]])
    exact, iou05 = [0, 0, 100, 100], box_with_iou(0.5)
    # the high-score prediction is matched first: exact box TP at all thresholds, other one FP -> 1/2
    assert image_score(gt, np.array([iou05, exact]), [0.1, 0.9]) == pytest.approx(0.5)
    # if the IoU-0.5 box scores higher it takes the GT at 0.40..0.50 (3 thresholds): TP=1, FP=1 -> 1/2;
    # at 0.55..0.75 it is FP and the exact box (second) takes the GT: TP=1, FP=1 -> 1/2. Same 0.5 overall.
    assert image_score(gt, np.array([iou05, exact]), [0.9, 0.1]) == pytest.approx(0.5)
    # a duplicate of the same box counts as FP
    assert image_score(gt, np.array([exact, exact]), [0.9, 0.8]) == pytest.approx(0.5)


def test_map50_perfect_and_empty():
    gts = [np.array([[0, 0, 10, 10]]), np.zeros((0, 4))]
    ap, _, _ = average_precision(gts, [np.array([[0, 0, 10, 10]]), np.zeros((0, 4))], [[0.9], []])
    assert ap == pytest.approx(1.0)
    ap, _, _ = average_precision(gts, [np.zeros((0, 4)), np.array([[0, 0, 10, 10]])], [[], [0.9]])
    assert ap == pytest.approx(0.0)
