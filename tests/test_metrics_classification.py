import pytest

from tasktune.metrics.classification import classification_metrics

NAMES = ["negative", "positive"]


def test_hand_computed():
    golds = [1, 1, 1, 0, 0, 0, 1, 0]
    preds = [1, 1, 0, 0, 0, 1, None, 0]
    m = classification_metrics(golds, preds, NAMES)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["none_rate"] == pytest.approx(1 / 8)
    assert m["confusion_matrix"] == [[3, 1, 0], [1, 2, 1]]
    # class 1: precision 2/3, recall 2/4; class 0: precision 3/4, recall 3/4; support 4 each.
    p1, r1, p0, r0 = 2 / 3, 2 / 4, 3 / 4, 3 / 4
    f1_1, f1_0 = 2 * p1 * r1 / (p1 + r1), 2 * p0 * r0 / (p0 + r0)
    assert m["precision"] == pytest.approx((p1 + p0) / 2)
    assert m["recall"] == pytest.approx((r1 + r0) / 2)
    assert m["f1"] == pytest.approx((f1_1 + f1_0) / 2)
    assert m["f1_macro"] == pytest.approx((f1_1 + f1_0) / 2)
    assert m["n"] == 8


def test_weighted_differs_from_macro_on_imbalance():
    m = classification_metrics([1, 1, 1, 0], [1, 1, 1, 1], NAMES)
    assert m["f1_macro"] == pytest.approx((2 * 0.75 / 1.75 + 0) / 2)
    assert m["f1"] == pytest.approx(0.75 * (2 * 0.75 / 1.75))


def test_all_none():
    m = classification_metrics([0, 1], [None, None], NAMES)
    assert m["accuracy"] == 0 and m["none_rate"] == 1 and m["f1"] == 0
