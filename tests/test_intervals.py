import numpy as np
import pytest

from tasktune.metrics.classification import classification_metrics
from tasktune.metrics.intervals import (bootstrap_weights, classification_intervals, mcnemar_exact, mean_interval,
                                        paired_difference)


def test_weights_are_seeded_resamples():
    w = bootstrap_weights(50, resamples=200, seed=3)
    assert w.shape == (200, 50) and np.all(w.sum(axis=1) == 50)
    assert np.array_equal(w, bootstrap_weights(50, resamples=200, seed=3))
    assert not np.array_equal(w, bootstrap_weights(50, resamples=200, seed=4))


def test_accuracy_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(0)
    n = 2000
    golds = rng.integers(0, 2, n).tolist()
    preds = [g if rng.random() < 0.9 else 1 - g for g in golds]
    point = classification_metrics(golds, preds, ["negative", "positive"])
    ci = classification_intervals(golds, preds, 2, bootstrap_weights(n))
    low, high = ci["accuracy"]
    assert low < point["accuracy"] < high
    half = 1.96 * np.sqrt(0.9 * 0.1 / n)  # about 0.013
    assert (high - low) / 2 == pytest.approx(half, rel=0.15)
    assert ci["f1"][0] < point["f1"] < ci["f1"][1]
    assert ci["f1_macro"][0] < point["f1_macro"] < ci["f1_macro"][1]


def test_none_predictions_count_as_wrong_in_the_interval():
    golds = [0, 1] * 50
    preds = [None] * 100
    ci = classification_intervals(golds, preds, 2, bootstrap_weights(100))
    assert ci["accuracy"] == [0.0, 0.0] and ci["f1"] == [0.0, 0.0]


def test_mcnemar_exact_values():
    # 10 fixed, 0 broken: p = 2 * 0.5**10
    result = mcnemar_exact([False] * 10 + [True] * 5, [True] * 15)
    assert result["wrong_to_right"] == 10 and result["right_to_wrong"] == 0
    assert result["p_value"] == pytest.approx(2 * 0.5 ** 10)
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    assert mcnemar_exact([True] * 6 + [False] * 6, [False] * 6 + [True] * 6)["p_value"] == pytest.approx(1.0)


def test_paired_difference_and_subset_means():
    before = [0.0] * 100
    after = [1.0] * 30 + [0.0] * 70
    result = paired_difference(before, after, bootstrap_weights(100))
    assert result["difference"] == pytest.approx(0.3)
    assert result["interval"][0] > 0.15 and result["p_value"] < 0.01
    assert paired_difference(after, after, bootstrap_weights(100))["p_value"] == 1.0
    mask = [True] * 30 + [False] * 70
    assert mean_interval(after, bootstrap_weights(100), mask) == [1.0, 1.0]
