"""The official SQuAD v2.0 metric, reimplemented.

`evaluate.load` of the SQuAD v2 metric downloads its script from the hub, so it cannot run offline; this follows the
official `evaluate-v2.0.py` line for line in behaviour: normalization, max over gold answers, gold answers
that normalize to empty dropped (an empty list becomes [""]), the no-answer threshold and the best
threshold search with its tie rule.
"""

from __future__ import annotations

import collections
import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop articles, collapse whitespace (in the official order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split() if text else []


def exact_match(gold: str, pred: str) -> int:
    return int(normalize_answer(gold) == normalize_answer(pred))


def token_f1(gold: str, pred: str) -> float:
    gold_tokens, pred_tokens = _tokens(gold), _tokens(pred)
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)  # both empty: 1, one empty: 0
    common = collections.Counter(gold_tokens) & collections.Counter(pred_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def scoring_golds(answers: list[str]) -> list[str]:
    """Gold answers as the official script scores them: empty-normalizing ones dropped, [] → [""]."""
    golds = [a for a in answers if normalize_answer(a)]
    return golds or [""]


def raw_scores(golds: dict[str, list[str]], preds: dict[str, str]) -> tuple[dict, dict]:
    exact, f1 = {}, {}
    for qid, answers in golds.items():
        candidates = scoring_golds(answers)
        exact[qid] = max(exact_match(g, preds[qid]) for g in candidates)
        f1[qid] = max(token_f1(g, preds[qid]) for g in candidates)
    return exact, f1


def has_answer_map(golds: dict[str, list[str]]) -> dict[str, bool]:
    """The official rule (`make_qid_to_has_ans`): a question is answerable when it has any gold answer, even
    one that normalizes to empty ("The", "a."); scoring then compares against [""] for such a question."""
    return {qid: bool(answers) for qid, answers in golds.items()}


def squad_intervals(golds: dict[str, list[str]], preds: dict[str, str], weights) -> dict:
    """95% bootstrap intervals (percent) of EM, F1, HasAns F1 and NoAns F1; `weights` from
    `intervals.bootstrap_weights(len(golds))`, in the order of `golds`."""
    from tasktune.metrics.intervals import mean_interval

    exact, f1 = raw_scores(golds, preds)
    ids = list(golds)
    has = [has_answer_map(golds)[q] for q in ids]
    em_values, f1_values = [100.0 * exact[q] for q in ids], [100.0 * f1[q] for q in ids]
    out = {"exact": mean_interval(em_values, weights), "f1": mean_interval(f1_values, weights)}
    if any(has):
        out["HasAns_f1"] = mean_interval(f1_values, weights, has)
    if not all(has):
        out["NoAns_f1"] = mean_interval(f1_values, weights, [not h for h in has])
    return out


def apply_threshold(scores: dict, na_probs: dict, has_answer: dict, threshold: float) -> dict:
    """Where P(no answer) > threshold the prediction counts as an abstention."""
    return {qid: float(not has_answer[qid]) if na_probs[qid] > threshold else s for qid, s in scores.items()}


def best_threshold(preds: dict, scores: dict, na_probs: dict, has_answer: dict,
                   abstain_all: float = 0.0) -> tuple[float, float]:
    """The official search: walk questions by increasing na_prob, keep the first threshold that is best.
    `abstain_all` is the threshold returned when abstaining on every question is best (the official 0.0 for
    probabilities; below every score for another abstention score, such as a logit margin)."""
    score = best = sum(not v for v in has_answer.values())
    threshold = abstain_all
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            diff = scores[qid]
        else:
            diff = -1 if preds[qid] else 0
        score += diff
        if score > best:
            best, threshold = score, na_probs[qid]
    return 100.0 * best / len(scores), threshold


def squad_v2_metrics(golds: dict[str, list[str]], preds: dict[str, str],
                     na_probs: dict[str, float] | None = None, threshold: float = 1.0) -> dict:
    """`golds` maps question id → gold answer texts ([] for unanswerable); `preds` id → text ("" abstains)."""
    if na_probs is None:
        na_probs = {qid: 0.0 for qid in golds}
    has_answer = has_answer_map(golds)
    exact_raw, f1_raw = raw_scores(golds, preds)
    exact = apply_threshold(exact_raw, na_probs, has_answer, threshold)
    f1 = apply_threshold(f1_raw, na_probs, has_answer, threshold)

    def mean(scores, ids):
        return 100.0 * sum(scores[q] for q in ids) / len(ids) if ids else 0.0

    has, no = [q for q in golds if has_answer[q]], [q for q in golds if not has_answer[q]]
    out = {"exact": mean(exact, list(golds)), "f1": mean(f1, list(golds)), "total": len(golds)}
    if has:
        out.update(HasAns_exact=mean(exact, has), HasAns_f1=mean(f1, has), HasAns_total=len(has))
    if no:
        out.update(NoAns_exact=mean(exact, no), NoAns_f1=mean(f1, no), NoAns_total=len(no))
    out["best_exact"], out["best_exact_thresh"] = best_threshold(preds, exact_raw, na_probs, has_answer)
    out["best_f1"], out["best_f1_thresh"] = best_threshold(preds, f1_raw, na_probs, has_answer)
    return out
