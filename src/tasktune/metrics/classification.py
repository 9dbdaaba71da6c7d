"""Classification metrics as the seed project reports them (weighted P/R/F1) plus macro F1."""

from __future__ import annotations

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(golds: list[int], preds: list[int | None]) -> dict:
    """`None` predictions (unparseable generations) count as wrong and appear in `none_rate`.

    For P/R/F1 a None is mapped to a third class that is never gold, so it lowers recall of the gold
    class without inventing a positive or negative call.
    """
    n = len(golds)
    if n == 0:
        return {"n": 0}
    mapped = [-1 if p is None else p for p in preds]
    labels = [0, 1]
    p, r, f, _ = precision_recall_fscore_support(golds, mapped, labels=labels, average="weighted",
                                                 zero_division=0)
    return {
        "accuracy": float(accuracy_score(golds, mapped)),
        "precision": float(p),
        "recall": float(r),
        "f1": float(f),
        "f1_macro": float(f1_score(golds, mapped, labels=labels, average="macro", zero_division=0)),
        "none_rate": sum(x is None for x in preds) / n,
        "confusion_matrix": confusion_matrix(golds, mapped, labels=[0, 1, -1])[:2].tolist(),
        "confusion_matrix_labels": {"rows": ["gold negative", "gold positive"],
                                    "columns": ["pred negative", "pred positive", "pred None"]},
        "n": n,
    }
