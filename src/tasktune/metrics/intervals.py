"""Error bars and paired tests for the headline figures.

Every metric tasktune reports is a function of per-example counts (correct or not, a confusion cell, an
example's F1), so one seeded matrix of bootstrap weights serves them all: row b holds how often each example
is drawn in resample b (multinomial, n draws), and a resampled mean is a matrix-vector product. 1,000
resamples of 13k examples take well under a second.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


def bootstrap_weights(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """[resamples, n] draw counts; the same seed and n give the same matrix (paired comparisons share it)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float32)


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> list[float]:
    tail = (1 - level) / 2 * 100
    low, high = np.nanpercentile(samples, [tail, 100 - tail])
    return [float(low), float(high)]


def mean_interval(values: np.ndarray, weights: np.ndarray, mask: np.ndarray | None = None) -> list[float]:
    """Interval of the mean of `values` (over the examples where `mask` is true)."""
    values = np.asarray(values, dtype=np.float32)
    mask = np.ones_like(values) if mask is None else np.asarray(mask, dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        samples = (weights @ (values * mask)) / (weights @ mask)
    return percentile_interval(samples)


def classification_intervals(golds: list[int], preds: list[int | None], num_labels: int,
                             weights: np.ndarray) -> dict:
    """Intervals of accuracy, weighted F1 and macro F1. A None prediction is an extra column that is never
    gold, as in `classification_metrics`."""
    gold = np.asarray(golds)
    pred = np.asarray([num_labels if p is None else p for p in preds])
    cols = num_labels + 1
    onehot = np.zeros((len(gold), num_labels * cols), dtype=np.float32)
    onehot[np.arange(len(gold)), gold * cols + pred] = 1.0
    counts = (weights @ onehot).reshape(len(weights), num_labels, cols)  # [B, gold, pred]
    true_pos = counts[:, np.arange(num_labels), np.arange(num_labels)]
    support = counts.sum(axis=2)
    predicted = counts[:, :, :num_labels].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, true_pos / predicted, 0.0)
        recall = np.where(support > 0, true_pos / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    total = support.sum(axis=1)
    return {"accuracy": percentile_interval(true_pos.sum(axis=1) / total),
            "f1": percentile_interval((f1 * support).sum(axis=1) / total),
            "f1_macro": percentile_interval(f1.mean(axis=1))}


def mcnemar_exact(before_correct: list[bool], after_correct: list[bool]) -> dict:
    """Exact McNemar test on paired outcomes: only the examples whose outcome changed carry information."""
    before, after = np.asarray(before_correct, bool), np.asarray(after_correct, bool)
    fixed, broken = int((~before & after).sum()), int((before & ~after).sum())
    p = binomtest(min(fixed, broken), fixed + broken, 0.5).pvalue if fixed + broken else 1.0
    return {"test": "exact McNemar (two-sided)", "wrong_to_right": fixed, "right_to_wrong": broken,
            "p_value": float(p)}


def paired_difference(before: list[float], after: list[float], weights: np.ndarray) -> dict:
    """Paired bootstrap of the mean difference after - before: its interval and a two-sided p-value (twice
    the share of resamples on the other side of zero)."""
    diff = np.asarray(after, dtype=np.float32) - np.asarray(before, dtype=np.float32)
    samples = weights @ diff / len(diff)
    share = min(float((samples <= 0).mean()), float((samples >= 0).mean()))
    return {"test": "paired bootstrap", "difference": float(diff.mean()), "interval": percentile_interval(samples),
            "p_value": min(1.0, 2 * share), "resamples": len(weights)}
