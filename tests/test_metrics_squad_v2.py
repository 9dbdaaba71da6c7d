"""The SQuAD v2 metric on hand-computed cases covering each quirk of the official script."""

import pytest

from tasktune.metrics.squad_v2 import (best_threshold, exact_match, normalize_answer, squad_v2_metrics,
                                       token_f1)


def test_normalization():
    assert normalize_answer("The  Quick, brown-fox!") == "quick brownfox"
    assert normalize_answer("An answer") == "answer"  # articles only as whole words
    assert normalize_answer("Theatre of a city") == "theatre of city"
    assert normalize_answer("The.") == ""


def test_token_f1_and_exact():
    assert exact_match("the Seine", "Seine.") == 1
    assert token_f1("Seine", "the Seine river") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("x y y", "y y z") == pytest.approx(2 / 3)  # multiset overlap: 2 of 3 each side
    assert token_f1("a b b", "b b c") == pytest.approx(0.8)  # "a" is an article: gold is "b b"
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("x", "") == 0.0


def test_max_over_golds():
    m = squad_v2_metrics({"q": ["Paris", "the city of Paris"]}, {"q": "city of paris"})
    assert m["exact"] == 100.0 and m["f1"] == 100.0


def test_has_ans_follows_the_official_rule():
    # evaluate-v2.0.py: has_ans = bool(qa["answers"]). Golds that all normalize to "" still make the question
    # answerable; it is then scored against [""], so an abstention is exactly right.
    m = squad_v2_metrics({"q": ["the", "a."]}, {"q": ""})
    assert m["HasAns_total"] == 1 and "NoAns_total" not in m
    assert m["exact"] == 100.0 and m["HasAns_exact"] == 100.0 and m["HasAns_f1"] == 100.0
    m = squad_v2_metrics({"q": ["The"]}, {"q": "Paris"})
    assert m["HasAns_total"] == 1 and m["exact"] == 0.0 and m["f1"] == 0.0
    # A real gold next to an empty-normalizing one: only the real one is compared.
    m = squad_v2_metrics({"q": ["the", "Paris"]}, {"q": ""})
    assert m["exact"] == 0.0 and m["HasAns_total"] == 1


def test_best_threshold_counts_a_nonempty_abstention_text_as_answering():
    # The official best-threshold walk charges -1 for any non-empty prediction on an unanswerable question,
    # even "The." (which scores as an exact abstention): best_exact can fall below exact.
    golds, preds, na = {"q1": [], "q2": ["Paris"]}, {"q1": "The.", "q2": "Paris"}, {"q1": 0.1, "q2": 0.2}
    m = squad_v2_metrics(golds, preds, na)
    assert m["exact"] == 100.0
    assert m["best_exact"] == 50.0 and m["best_exact_thresh"] == 0.0


def test_the_dot_counts_as_abstention():
    m = squad_v2_metrics({"no": [], "has": ["Paris"]}, {"no": "The.", "has": "The."})
    assert m["NoAns_exact"] == 100.0 and m["NoAns_f1"] == 100.0
    assert m["HasAns_exact"] == 0.0 and m["HasAns_f1"] == 0.0


GOLDS = {"q1": ["Paris"], "q2": [], "q3": ["Seine"], "q4": []}
PREDS = {"q1": "Paris", "q2": "London", "q3": "the Seine river", "q4": ""}
NA = {"q1": 0.1, "q2": 0.9, "q3": 0.5, "q4": 0.3}


def test_hand_computed_totals():
    m = squad_v2_metrics(GOLDS, PREDS, NA)
    assert m["total"] == 4 and m["HasAns_total"] == 2 and m["NoAns_total"] == 2
    assert m["exact"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(100 * (1 + 0 + 2 / 3 + 1) / 4)
    assert m["HasAns_exact"] == pytest.approx(50.0) and m["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert m["NoAns_exact"] == pytest.approx(50.0)


def test_threshold_applies_abstention():
    m = squad_v2_metrics(GOLDS, PREDS, NA, threshold=0.4)
    # q2 (0.9) and q3 (0.5) now abstain: q2 becomes right, q3 scores 0 on both EM and F1.
    assert m["exact"] == pytest.approx(75.0)
    assert m["f1"] == pytest.approx(75.0)


def test_best_thresholds_and_ties():
    m = squad_v2_metrics(GOLDS, PREDS, NA)
    # EM walk: start 2 (all abstain) → q1 +1 = 3 @0.1 → q4 +0 (tie, keeps 0.1) → q3 +0 → q2 −1.
    assert m["best_exact"] == pytest.approx(75.0) and m["best_exact_thresh"] == pytest.approx(0.1)
    # F1 walk: 2 → 3 @0.1 → 3 (q4) → 3 + 2/3 @0.5 → 2 + 2/3.
    assert m["best_f1"] == pytest.approx(100 * (3 + 2 / 3) / 4) and m["best_f1_thresh"] == pytest.approx(0.5)


def test_best_threshold_when_abstaining_everywhere_is_best():
    score, thresh = best_threshold({"a": "x"}, {"a": 0.0}, {"a": 0.7}, {"a": False})
    assert score == 100.0 and thresh == 0.0
