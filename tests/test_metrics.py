"""The eval report's numbers on arrays small enough to compute by hand: temperature scaling,
the 15-bin ECE, risk-coverage and macro-F1."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modal_jobs.ml.calibration import (
    ECE_BINS,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    brier,
    fit_temperature,
    reliability,
    risk_coverage,
    softmax,
)
from modal_jobs.ml.metrics import classification_report


def test_fit_temperature_finds_the_two_class_closed_form() -> None:
    # Two classes, logit gap 2: p = p(class 0) = sigmoid(2 / T). With 3 of 4 samples right, the
    # Brier score (3 · 2(1 - p)² + 2p²) / 4 is minimal where p = 3/4, i.e. T = 2 / ln 3.
    logits = np.array([[2.0, 0.0], [2.0, 0.0], [2.0, 0.0], [2.0, 0.0]])
    truth = np.array([0, 0, 0, 1])
    fitted = fit_temperature(logits, truth)
    assert fitted == pytest.approx(2 / math.log(3), rel=1e-4)
    for other in (fitted * 0.9, fitted * 1.1):
        assert brier(logits, truth, other) > brier(logits, truth, fitted)


def _nll(logits: np.ndarray, truth: np.ndarray, temperature: float) -> float:
    probabilities = softmax(logits, temperature)[np.arange(len(truth)), truth]
    return float(-np.log(np.clip(probabilities, 1e-300, None)).mean())


def test_a_confidently_wrong_row_does_not_hold_the_temperature_up() -> None:
    # 20 rows right at logit gap 4, one wrong at gap 6 (p(true) ≈ 0 at any useful T). The NLL
    # of that row is unbounded, so minimising the NLL makes every right row under-confident;
    # the Brier score, bounded per row, does not. Both optima found by a dense grid here.
    logits = np.vstack([np.tile([4.0, 0.0, 0.0], (20, 1)), [[6.0, 0.0, 0.0]]])
    truth = np.array([0] * 20 + [1])
    grid = np.exp(np.linspace(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE), 4001))
    by_brier = grid[np.argmin([brier(logits, truth, t) for t in grid])]
    by_nll = grid[np.argmin([_nll(logits, truth, t) for t in grid])]
    fitted = fit_temperature(logits, truth)
    assert fitted == pytest.approx(by_brier, rel=2e-3)
    assert fitted < by_nll / 1.5
    ece = {t: reliability(softmax(logits, t), truth).ece for t in (fitted, by_nll)}
    assert ece[fitted] < 0.05 < 0.1 < ece[by_nll]


def test_fit_temperature_edge_cases() -> None:
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int)) == 1.0
    # Half right at any confidence: the Brier score falls towards T → ∞ (uniform): clamped.
    logits = np.array([[1.0, 0.0], [1.0, 0.0]])
    assert fit_temperature(logits, np.array([0, 1])) == pytest.approx(MAX_TEMPERATURE, rel=1e-3)


def test_ece_over_fifteen_equal_bins_by_hand() -> None:
    # Top-label confidences 0.95, 0.95, 0.60, 0.60, 0.35; bin i (1-based) is ((i-1)/15, i/15],
    # so they fall in bins 15, 15, 9, 9 and 6. Right: yes, no, yes, yes, no (a tie routes to
    # the first class).
    probabilities = np.array(
        [
            [0.95, 0.05, 0.00],
            [0.05, 0.95, 0.00],
            [0.60, 0.40, 0.00],
            [0.10, 0.60, 0.30],
            [0.30, 0.35, 0.35],
        ]
    )
    truth = np.array([0, 0, 0, 1, 0])
    table = reliability(probabilities, truth)
    assert len(table.count) == ECE_BINS == 15
    # bin 15: conf 0.95, acc 1/2; bin 9: conf 0.60, acc 1; bin 6: conf 0.35, acc 0.
    expected = (2 * abs(0.95 - 0.5) + 2 * abs(0.60 - 1.0) + 1 * abs(0.35 - 0.0)) / 5
    assert table.ece == pytest.approx(expected)
    assert table.count[14] == 2 and table.count[8] == 2 and table.count[5] == 1
    assert sum(table.count) == 5
    assert table.accuracy[14] == 0.5 and table.confidence[8] == pytest.approx(0.6)


def test_ece_bin_edges_belong_to_the_lower_bin() -> None:
    # A confidence of exactly 2/3 = 10/15 is the top of bin 10, not the bottom of bin 11.
    probabilities = np.array([[2 / 3, 1 / 3]])
    table = reliability(probabilities, np.array([1]))
    assert table.count[9] == 1 and table.ece == pytest.approx(2 / 3)


def test_risk_coverage_by_hand() -> None:
    # Confidences 0.9 (right), 0.8 (wrong), 0.7 (right), 0.6 (wrong); given out of order.
    probabilities = np.array([[0.3, 0.7], [0.9, 0.1], [0.4, 0.6], [0.2, 0.8]])
    truth = np.array([1, 0, 0, 0])
    curve = risk_coverage(probabilities, truth)
    assert curve["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert curve["risk"] == pytest.approx([0 / 1, 1 / 2, 1 / 3, 2 / 4])
    assert curve["threshold"] == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert risk_coverage(np.zeros((0, 2)), np.zeros(0, dtype=int))["risk"] == []


def test_macro_f1_by_hand() -> None:
    # Confusion (rows true, columns routed): a: 2 a, 1 b; b: 2 b; c: 1 a, 0 c.
    truth = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 1, 0])
    report = classification_report(truth, predicted, ["a", "b", "c"])
    # a: P = 2/3, R = 2/3, F1 = 2/3; b: P = 2/3, R = 1, F1 = 0.8; c: no hit, F1 = 0.
    f1 = {"a": 2 / 3, "b": 2 * (2 / 3) * 1 / (2 / 3 + 1), "c": 0.0}
    for label, value in f1.items():
        assert report["per_class"][label]["f1"] == pytest.approx(value)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 0.0) / 3)
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert report["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert report["per_class"]["c"]["support"] == 1
