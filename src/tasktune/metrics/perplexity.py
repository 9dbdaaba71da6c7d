"""Perplexity on held-out text with a bootstrap interval over documents, and its paired change between two
models on the same documents (per-document summed NLL and token counts, as `costs.document_nll` writes them)."""

from __future__ import annotations

import math

import numpy as np

from tasktune.metrics.intervals import bootstrap_weights, percentile_interval


def perplexity_summary(rows: list[dict]) -> dict:
    nll = np.asarray([r["nll"] for r in rows], dtype=np.float64)
    tokens = np.asarray([r["tokens"] for r in rows], dtype=np.float64)
    weights = bootstrap_weights(len(rows)).astype(np.float64)
    samples = np.exp((weights @ nll) / (weights @ tokens))
    return {"perplexity": float(math.exp(nll.sum() / tokens.sum())), "ci95": percentile_interval(samples),
            "documents": len(rows), "tokens": int(tokens.sum())}


def perplexity_change(before: list[dict], after: list[dict]) -> dict:
    """The relative perplexity change after/before - 1 with a paired bootstrap over documents."""
    b = np.asarray([r["nll"] for r in before], dtype=np.float64)
    a = np.asarray([r["nll"] for r in after], dtype=np.float64)
    tokens = np.asarray([r["tokens"] for r in before], dtype=np.float64)
    weights = bootstrap_weights(len(before)).astype(np.float64)
    samples = np.exp((weights @ (a - b)) / (weights @ tokens)) - 1
    share = min(float((samples <= 0).mean()), float((samples >= 0).mean()))
    return {"test": "paired bootstrap over documents", "relative_change": float(math.exp((a - b).sum() / tokens.sum()) - 1),
            "interval": percentile_interval(samples), "p_value": min(1.0, 2 * share), "n": len(before)}
