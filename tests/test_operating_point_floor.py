"""The operating point: sensitivity first, raised to a specificity floor where it falls below (hand-made scores)."""

from __future__ import annotations

import numpy as np

from triage_node.training.classifier_train import choose_operating_point, threshold_for_specificity

Y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
P = np.array([0.9, 0.8, 0.7, 0.6, 0.2, 0.65, 0.5, 0.4, 0.3, 0.1])


def test_sensitivity_rule_alone() -> None:
    pt = choose_operating_point(Y, P, 1.0, source="v")
    assert pt["sensitivity"] == 1.0 and pt["threshold"] == (0.2 + 0.1) / 2
    assert pt["specificity"] == 0.2 and "raised" not in pt["rule"]


def test_specificity_floor_raises_the_threshold() -> None:
    pt = choose_operating_point(Y, P, 1.0, min_specificity=0.8, source="v")
    assert pt["specificity"] == 0.8 and pt["threshold"] == (0.5 + 0.6) / 2  # clears 4 of 5 negatives
    assert pt["sensitivity"] == 0.8  # what the floor costs: the positive at 0.2
    assert "raised here" in pt["rule"]


def test_floor_already_met_changes_nothing() -> None:
    pt = choose_operating_point(Y, P, 0.6, min_specificity=0.6, source="v")
    assert pt["threshold"] == (0.7 + 0.65) / 2 and pt["specificity"] == 1.0
    assert "raised here" not in pt["rule"]


def test_threshold_for_specificity_all_negatives() -> None:
    t = threshold_for_specificity(Y, P, 1.0)
    assert (P[Y == 0] < t).all() and t < 0.7
