"""report.json (everything, machine-readable) and report.md (the tables a person reads)."""

from __future__ import annotations

from pathlib import Path

from tasktune.rundir import write_json

def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def comparison_table(task, zeroshot: dict | None, finetuned: dict | None) -> str:
    """Markdown table: one row per metric, one column per (stage, protocol or decision)."""
    columns = []
    for stage, metrics in (("zero-shot", zeroshot), ("fine-tuned", finetuned)):
        for name, values in task.report_columns(metrics or {}):
            columns.append((f"{stage} `{name}`", values))
    if not columns:
        return "_no evaluation was run_\n"
    rows = [r for r in task.report_rows if any(r in values for _, values in columns)]
    lines = ["| metric | " + " | ".join(c for c, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(_fmt(values.get(row)) for _, values in columns) + " |")
    return "\n".join(lines) + "\n"


def write_report(run_dir: Path, recipe, prepared, zeroshot, finetuned, training, base_params, versions) -> dict:
    training = dict(training)
    history = training.pop("log_history", [])
    report = {
        "name": recipe.name, "task": recipe.task, "model": recipe.model, "model_path": prepared.lm.path,
        "dtype": str(prepared.lm.dtype).replace("torch.", ""),
        "data": {"source": prepared.source, **{k: len(v) for k, v in prepared.examples.items()}},
        "protocol": {**prepared.builder.describe(), "verbalizers": getattr(prepared.task, "verbalizers", None),
                     "label_token_ids": prepared.label_token_ids},
        "zeroshot": zeroshot, "finetuned": finetuned, "training": training,
        "parameters": {"base": base_params, "adapted": training.get("parameters")},
        "timings_s": {k: round(v, 2) for k, v in prepared.timings.items()},
        "config": recipe.to_dict(), "versions": versions,
    }
    write_json(run_dir / "report.json", report)
    (run_dir / "report.md").write_text(render_markdown(report, history, prepared.task), encoding="utf-8")
    return report


def render_markdown(report: dict, history: list[dict], task) -> str:
    proto = report["protocol"]
    adapted = report["parameters"]["adapted"] or {}
    train = report["training"]
    vals = [h for h in history if any(k.startswith("eval_") for k in h)]
    lines = [
        f"# {report['name']}: {report['task']} on {report['model']}",
        "",
        f"Data: `{report['data']['source']}` — train {report['data'].get('train')}, validation "
        f"{report['data'].get('validation')}, test {report['data'].get('test')} examples. dtype {report['dtype']}.",
        "",
        "## Zero-shot vs fine-tuned (same test split, same protocol)",
        "",
        comparison_table(task, report["zeroshot"], report["finetuned"]),
        "## Protocol",
        "",
        f"- prompt format `{proto['prompt_format']}`, shots {proto['shots']}",
        f"- template: `{proto['template']!r}`",
        *task.protocol_notes(proto),
        "",
        "## Parameters",
        "",
        "| | count |",
        "|---|---:|",
        f"| base model | {_fmt(report['parameters']['base']['total'])} |",
        f"| adapted model (base + LoRA) | {_fmt(adapted.get('total'))} |",
        f"| trainable (LoRA) | {_fmt(adapted.get('trainable'))} ({100 * adapted.get('trainable_share', 0):.3f}%) |",
        "",
        "## Training",
        "",
        f"- objective `{report['config']['train']['objective']}`, steps {train.get('global_step')}, "
        f"best validation {train.get('best_metric')}, {_fmt(train.get('train_runtime_s'))} s "
        f"({_fmt(train.get('train_samples_per_second'))} examples/s)",
    ]
    if vals:
        lines += ["", "| step | " + " | ".join(k for k in vals[0] if k.startswith("eval_")) + " |",
                  "|---:|" + "---:|" * sum(k.startswith("eval_") for k in vals[0])]
        for h in vals:
            lines.append(f"| {h.get('step')} | " + " | ".join(_fmt(v) for k, v in h.items()
                                                             if k.startswith("eval_")) + " |")
    lines += ["", "## Timings (s)", "", *(f"- {k}: {v}" for k, v in report["timings_s"].items()), "",
              "## Versions", "", *(f"- {k}: {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)
