"""Per-row scores of a free-form answer against its reference, for the `generation` task type.

Every metric is computed per row, so the bootstrap intervals and paired tests of `metrics.intervals` apply to all
of them: `exact`, `contains`, `regex` and `json_fields` are 0/1 (or a share of fields) per row; `chrf` and `bleu`
are sacrebleu's sentence-level scores (0-100; BLEU with exponential smoothing and effective order, since a
sentence rarely has a matching 4-gram), `rouge_l` is rouge-score's ROUGE-L F-measure with the Porter stemmer
(0-1). Text is normalised the SQuAD way (lower case, no punctuation, articles or extra spaces) before the exact,
contains and field comparisons.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import lru_cache

from tasktune.metrics.squad_v2 import normalize_answer

# spec `metrics:` name -> the columns it reports (the first is its figure)
METRIC_COLUMNS = {
    "exact": ("exact",),
    "contains": ("contains",),
    "regex": ("regex_exact", "regex_found"),
    "json_fields": ("json_fields", "json_valid", "json_field_f1"),
    "chrf": ("chrf",),
    "rouge_l": ("rouge_l",),
    "bleu": ("bleu",),
}
BINARY = {"exact", "contains", "regex_exact", "regex_found", "json_valid"}


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def json_object(text: str) -> dict | None:
    """The JSON object a text is, or the one it holds between its first `{` and its last `}` (a model may
    wrap it in words or a code fence); None when there is none."""
    for candidate in (text.strip(), text[text.find("{"): text.rfind("}") + 1] if "{" in text else ""):
        try:
            value = json.loads(candidate)
        except (json.JSONDecodeError, ValueError):
            continue
        if isinstance(value, dict):
            return value
    return None


def _value_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def field_scores(predicted: dict | None, reference: dict) -> tuple[float, float]:
    """(share of the reference's fields the prediction has equal, mean token F1 over them); a string is equal
    after normalisation, any other value when it is the same JSON value."""
    if predicted is None or not reference:
        return 0.0, 0.0
    exact, f1 = [], []
    for key, gold in reference.items():
        if key not in predicted:
            exact.append(0.0)
            f1.append(0.0)
            continue
        value = predicted[key]
        if isinstance(gold, str) and isinstance(value, str):
            exact.append(float(normalize_answer(value) == normalize_answer(gold)))
        else:
            exact.append(float(value == gold and type(value) is type(gold)))
        f1.append(token_f1(_value_text(value), _value_text(gold)))
    return sum(exact) / len(exact), sum(f1) / len(f1)


def regex_extract(pattern: re.Pattern, text: str) -> str | None:
    """The first match's first group (or the whole match), None when the pattern does not match."""
    match = pattern.search(text)
    if match is None:
        return None
    return match.group(1) if pattern.groups else match.group(0)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def row_scores(prediction: str, reference: str, metrics: list[str], pattern: re.Pattern | None = None) -> dict:
    """{column: value} of one answer for the spec's metrics."""
    import sacrebleu

    out: dict[str, float] = {}
    pred_norm, ref_norm = normalize_answer(prediction), normalize_answer(reference)
    for metric in metrics:
        if metric == "exact":
            out["exact"] = float(pred_norm == ref_norm)
        elif metric == "contains":
            out["contains"] = float(bool(ref_norm) and f" {ref_norm} " in f" {pred_norm} ")
        elif metric == "regex":
            found, gold = regex_extract(pattern, prediction), regex_extract(pattern, reference)
            out["regex_found"] = float(found is not None)
            gold = reference if gold is None else gold
            out["regex_exact"] = float(found is not None and normalize_answer(found) == normalize_answer(gold))
        elif metric == "json_fields":
            predicted = json_object(prediction)
            out["json_valid"] = float(predicted is not None)
            out["json_fields"], out["json_field_f1"] = field_scores(predicted, json.loads(reference))
        elif metric == "chrf":
            out["chrf"] = sacrebleu.sentence_chrf(prediction, [reference]).score
        elif metric == "rouge_l":
            out["rouge_l"] = _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure
        elif metric == "bleu":
            out["bleu"] = sacrebleu.sentence_bleu(prediction, [reference]).score
    return out
