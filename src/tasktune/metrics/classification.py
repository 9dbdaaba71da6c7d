"""Classification metrics as the seed project reports them (weighted P/R/F1) plus macro F1, for any number of
labels."""

from __future__ import annotations

from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(golds: list[int], preds: list[int | None], label_names: list[str]) -> dict:
    """`None` predictions (unparseable generations) count as wrong and appear in `none_rate`.

    For P/R/F1 a None is mapped to an extra class that is never gold, so it lowers recall of the gold class
    without inventing a call for another label.
    """
    n = len(golds)
    if n == 0:
        return {"n": 0}
    mapped = [-1 if p is None else p for p in preds]
    labels = list(range(len(label_names)))
    p, r, f, _ = precision_recall_fscore_support(golds, mapped, labels=labels, average="weighted",
                                                 zero_division=0)
    return {
        "accuracy": float(accuracy_score(golds, mapped)),
        "precision": float(p),
        "recall": float(r),
        "f1": float(f),
        "f1_macro": float(f1_score(golds, mapped, labels=labels, average="macro", zero_division=0)),
        "none_rate": sum(x is None for x in preds) / n,
        "confusion_matrix": confusion_matrix(golds, mapped, labels=labels + [-1])[: len(labels)].tolist(),
        "confusion_matrix_labels": {"rows": [f"gold {name}" for name in label_names],
                                    "columns": [f"pred {name}" for name in label_names] + ["pred None"]},
        "n": n,
    }
