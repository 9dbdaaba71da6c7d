"""PNG plots for the report (matplotlib, headless). Each returns the file it wrote, or None if no data."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

MODULE_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_figure(fig, path: Path) -> Path:
    """Render to memory, then write atomically: a full disk never leaves a truncated PNG in place of a good one."""
    import io

    from tasktune.atomic import write_bytes

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
    return path


def training_curves(history: list[dict], metric: str, path: Path) -> Path | None:
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h[f"eval_{metric}"]) for h in history if f"eval_{metric}" in h]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), color="tab:blue", label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss", color="tab:blue")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:orange", label=f"validation {metric}")
        ax2.set_ylabel(f"validation {metric}", color="tab:orange")
    ax.set_title(f"Training loss and validation {metric}")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def confusion_matrices(zeroshot: dict, finetuned: dict, protocol: str, label_names: list[str],
                       path: Path) -> Path | None:
    pairs = [(name, m[protocol]) for name, m in (("zero-shot", zeroshot), ("fine-tuned", finetuned))
             if m and protocol in m and "confusion_matrix" in m[protocol]]
    if not pairs:
        return None
    size = max(3.8, 1.0 * len(label_names) + 1.8)
    fig, axes = plt.subplots(1, len(pairs), figsize=(1.2 * size * len(pairs), size))
    for ax, (name, m) in zip(np.atleast_1d(axes), pairs):
        cm = np.array(m["confusion_matrix"])
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, f"{v:,}", ha="center", va="center", color="black")
        ax.set_xticks(range(cm.shape[1]), (list(label_names) + ["None"])[: cm.shape[1]], rotation=30, ha="right")
        ax.set_yticks(range(len(label_names)), label_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        ax.set_title(f"{name} ({protocol}), acc {m['accuracy']:.3f}")
    return save_figure(fig, path)


def metric_bars(columns: list[tuple[str, dict]], metrics: list[str], title: str, path: Path) -> Path | None:
    columns = [(n, c) for n, c in columns if c]
    metrics = [m for m in metrics if any(m in c for _, c in columns)]
    if not columns or not metrics:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metrics) * len(columns) / 2), 4))
    width = 0.8 / len(columns)
    x = np.arange(len(metrics))
    for i, (name, values) in enumerate(columns):
        heights = [values.get(m, 0) or 0 for m in metrics]
        bars = ax.bar(x + i * width - 0.4 + width / 2, heights, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, metrics)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def delta_heatmap(modules: list[dict], path: Path) -> Path | None:
    if not modules:
        return None
    layers = sorted({m["layer"] for m in modules if m["layer"] is not None})
    types = [t for t in MODULE_ORDER if any(m["type"] == t for m in modules)] + \
        sorted({m["type"] for m in modules} - set(MODULE_ORDER))
    grid = np.full((len(types), len(layers)), np.nan)
    for m in modules:
        if m["layer"] is not None:
            grid[types.index(m["type"]), layers.index(m["layer"])] = m["relative"]
    fig, ax = plt.subplots(figsize=(max(6, 0.4 * len(layers) + 2), 0.45 * len(types) + 1.8))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(layers)), layers)
    ax.set_yticks(range(len(types)), types)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("module")
    ax.set_title("LoRA update size ‖ΔW‖F / ‖W‖F per layer and module")
    fig.colorbar(image, ax=ax, label="‖ΔW‖ / ‖W‖")
    return save_figure(fig, path)
