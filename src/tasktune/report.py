"""The run's report: report.json (everything, machine-readable), report.md and a self-contained report.html
(the tables, the parameter analysis, plots and example predictions a person reads).

`write_report` records the run; `render` rebuilds the human-readable files from the run directory alone,
so `tasktune report RUN_DIR` can redo them at any time.
"""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from tasktune import plots
from tasktune.rundir import write_json


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def columns_of(task, zeroshot: dict | None, finetuned: dict | None) -> list[tuple[str, dict]]:
    return [(f"{stage} `{name}`", values)
            for stage, metrics in (("zero-shot", zeroshot), ("fine-tuned", finetuned))
            for name, values in task.report_columns(metrics or {})]


def markdown_table(rows: list[str], columns: list[tuple[str, dict]]) -> str:
    """One row per metric, one column per (label, values)."""
    if not columns:
        return "_no evaluation was run_\n"
    rows = [r for r in rows if any(r in values for _, values in columns)]
    lines = ["| metric | " + " | ".join(c for c, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {row} | " + " | ".join(_cell_with_interval(v, row) for _, v in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cell_with_interval(values: dict, row: str) -> str:
    """`0.9219 [0.9174, 0.9263]` where a 95% interval exists for the metric."""
    interval = (values.get("ci95") or {}).get(row)
    text = _fmt(values.get(row))
    return f"{text} [{interval[0]:.4f}, {interval[1]:.4f}]" if interval and values.get(row) is not None else text


def comparison_table(task, zeroshot: dict | None, finetuned: dict | None) -> str:
    return markdown_table(list(task.report_rows), columns_of(task, zeroshot, finetuned))


def write_report(run_dir: Path, recipe, prepared, zeroshot, finetuned, training, base_params, versions) -> dict:
    report = {
        "name": recipe.name, "task": prepared.task.name, "model": recipe.model, "model_path": prepared.lm.path,
        "dtype": str(prepared.lm.dtype).replace("torch.", ""),
        "data": {"source": prepared.source, "origin": data_origin(prepared.source),
                 "sha256": json.loads((run_dir / "fingerprint.json").read_text())["data_sha256"],
                 **{k: len(v) for k, v in prepared.examples.items()}},
        "task_type": prepared.task.type,
        "protocol": {**prepared.builder.describe(), "labels": list(getattr(prepared.task, "label_names", [])),
                     "verbalizers": list(getattr(prepared.task, "verbalizers", [])),
                     "label_token_ids": prepared.label_token_ids},
        "split": {"split_by": prepared.task.split_policy(recipe.data), "test_source": prepared.test_source,
                  "overlap": prepared.overlap},
        "zeroshot": zeroshot, "finetuned": finetuned,
        "paired": paired_comparison(run_dir, prepared.task) if zeroshot and finetuned else None,
        "training": training,
        "parameters": {"base": base_params, "adapted": training.get("parameters")},
        "timings_s": {k: round(v, 2) for k, v in prepared.timings.items()},
        "config": recipe.to_dict(), "versions": versions,
    }
    write_json(run_dir / "report.json", report)
    render(run_dir)
    return report


def paired_comparison(run_dir: Path, task) -> dict:
    """Zero-shot vs fine-tuned on the same test examples (the task's paired tests), from the run's files."""
    return task.paired(_read_jsonl(run_dir / "zeroshot" / "predictions.jsonl"),
                       _read_jsonl(run_dir / "finetuned" / "predictions.jsonl"))


def paired_lines(paired: dict | None) -> list[str]:
    lines = []
    for name, result in (paired or {}).items():
        gain = result["gain"]
        p_value = gain["p_value"]
        p_text = "< 0.001" if p_value < 0.001 else f"{p_value:.3g}"
        line = (f"- `{name}`: {result['metric']} gain {gain['difference']:+.4f} (95% paired bootstrap interval "
                f"[{gain['interval'][0]:+.4f}, {gain['interval'][1]:+.4f}], p {p_text}), n = {result['n']}")
        if "mcnemar" in result:
            m = result["mcnemar"]
            line += (f"; exact McNemar p = {m['p_value']:.3g} ({m['wrong_to_right']} wrong → right, "
                     f"{m['right_to_wrong']} right → wrong)")
        lines.append(line)
    return lines


def overlap_lines(split: dict | None) -> list[str]:
    if not split:
        return []
    from tasktune.data.split import overlap_warning

    overlap = split["overlap"]
    shown = ", ".join(f"{k.replace('_', ' ')} {100 * v:.2f}%" for k, v in overlap.items() if k.endswith("_rate"))
    lines = [f"- split `{split['split_by']}`" + (f", test file `{split['test_source']}`" if split.get("test_source")
                                                 else "") + f"; test rows seen in training: {shown} "
             f"(of {overlap['test_rows']:,} test rows)"]
    warning = overlap_warning(overlap)
    return lines + ([f"- **{warning}**"] if warning else [])


def task_of_run(run_dir: Path, report: dict):
    """The run's task, rebuilt from the spec the run recorded (`task.yaml` in the run directory), with the
    run's own verbalizers: a report never depends on where the user's spec file was."""
    from tasktune.tasks import get_task

    return get_task(str(Path(run_dir) / "task.yaml"), report["protocol"].get("verbalizers") or None)


def data_origin(source: str) -> str:
    """`path`, `TASKTUNE_DATA_DIR`, `embedded` or `hub`: where the run's data came from."""
    from tasktune.data import origin

    return "hub" if source.startswith("hub:") else origin([Path(f) for f in source.split(", ")])


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


def changed_examples(run_dir: Path, task, limit: int = 5) -> dict[str, list[dict]]:
    """Test examples whose outcome changed between zero-shot and fine-tuned, in both directions."""
    before = {r["id"]: r for r in _read_jsonl(run_dir / "zeroshot" / "predictions.jsonl")}
    after = {r["id"]: r for r in _read_jsonl(run_dir / "finetuned" / "predictions.jsonl")}
    fixed, broken = [], []
    for qid, new in after.items():
        old = before.get(qid)
        if old is None:
            continue
        if task.type == "classification":
            key = "score_pred" if "score_pred" in new else "classifier_pred"
            if "score_pred" not in old or key not in new:
                continue
            was, now = old["score_pred"] == old["label"], new[key] == new["label"]
            names = task.label_names
            row = {"text": new["text"], "gold": names[new["label"]], "zero-shot": names[old["score_pred"]],
                   "fine-tuned": names[new[key]]}
        else:
            was, now = old["f1"] >= 0.5, new["f1"] >= 0.5
            row = {"text": new["question"], "gold": " | ".join(new["golds"]) or "(unanswerable)",
                   "zero-shot": old["prediction"] or "(abstains)", "fine-tuned": new["prediction"] or "(abstains)"}
        if was != now:
            (fixed if now else broken).append(row)
    return {"fixed": fixed[:limit], "broken": broken[:limit], "n_fixed": len(fixed), "n_broken": len(broken)}


def make_plots(run_dir: Path, report: dict, task, params: dict | None, history: list[dict]) -> list[tuple[str, Path]]:
    out = run_dir / "plots"
    made = [("Training", plots.training_curves(history, task.metric_for_best, out / "training.png"))]
    zs, ft = report.get("zeroshot"), report.get("finetuned")
    if task.type == "classification":
        made.append(("Confusion matrices", plots.confusion_matrices(zs, ft, "score", task.label_names,
                                                                    out / "confusion_score.png")))
        made.append(("Zero-shot vs fine-tuned", plots.metric_bars(
            [(n.replace("`", ""), v) for n, v in columns_of(task, zs, ft)],
            ["accuracy", "f1", "f1_macro", "none_rate"], f"{task.name} test metrics", out / "metrics.png")))
    else:
        made.append(("Zero-shot vs fine-tuned", plots.metric_bars(
            [(n.replace("`", ""), v) for n, v in columns_of(task, zs, ft)],
            ["exact", "f1", "HasAns_f1", "NoAns_f1"], f"{task.name} test metrics (HasAns / NoAns)",
            out / "metrics.png")))
    if params:
        made.append(("LoRA update per layer", plots.delta_heatmap(params["analysis"]["modules"], out / "delta_heatmap.png")))
    return [(title, path) for title, path in made if path is not None]


def render(run_dir: Path) -> None:
    run_dir = Path(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    params = json.loads((run_dir / "params.json").read_text()) if (run_dir / "params.json").is_file() else None
    task = task_of_run(run_dir, report)
    history_path = run_dir / "train" / "log_history.json"
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    figures = make_plots(run_dir, report, task, params, history)
    changes = changed_examples(run_dir, task)
    markdown = render_markdown(report, task, params, figures, changes, history, run_dir)
    (run_dir / "report.md").write_text(markdown, encoding="utf-8")
    (run_dir / "report.html").write_text(markdown_to_html(markdown, run_dir), encoding="utf-8")


def render_markdown(report, task, params, figures, changes, history: list[dict], run_dir: Path) -> str:
    proto, train = report["protocol"], report["training"]
    adapted = report["parameters"]["adapted"] or {}
    lines = [
        f"# {report['name']}: {report['task']} on {report['model']}", "",
        f"Data ({report['data'].get('origin', 'path')}): `{report['data']['source']}` — train {report['data'].get('train')}, validation "
        f"{report['data'].get('validation')}, test {report['data'].get('test')} examples. dtype {report['dtype']}.",
        *(f"- sha256 of `{Path(f).name}`: `{h}`" for f, h in report["data"].get("sha256", {}).items()), "",
        *overlap_lines(report.get("split")), "",
        "## Zero-shot vs fine-tuned (same test split, same protocol)", "",
        "Figures with their 95% bootstrap interval (1,000 seeded resamples of the test examples).", "",
        comparison_table(task, report["zeroshot"], report["finetuned"]),
        *paired_lines(report.get("paired")), "",
        "## Protocol", "",
        f"- prompt format `{proto['prompt_format']}`, shots {proto['shots']}",
        f"- template: `{proto['template']!r}`",
        *task.protocol_notes(proto), "",
        "## Parameters", "", "| | count |", "|---|---:|",
        f"| base model | {_fmt(report['parameters']['base']['total'])} |",
        f"| adapted model (base + LoRA) | {_fmt(adapted.get('total'))} |",
        f"| trainable (LoRA) | {_fmt(adapted.get('trainable'))} ({100 * adapted.get('trainable_share', 0):.3f}%) |",
    ]
    if params:
        lora = params["analysis"]["lora"]
        lines += [f"| merged model | {_fmt(params['counts']['merged'])} (equals base: {params['counts']['merged_equals_base']}) |",
                  "", f"LoRA r={lora['r']}, alpha={lora['alpha']} (scale {lora['scale']:.3g}) on {lora['modules']} modules "
                  f"({', '.join(lora['target_modules'])}); r×(in+out) = {_fmt(lora['rank_formula'])} = counted "
                  f"{_fmt(lora['parameters'])}: {lora['rank_formula_matches']}.",
                  f"Frozen weights bit-identical after merging: {params['frozen']['identical']} tensors; changed: "
                  f"{params['frozen']['changed']} (all LoRA targets); unexpected changes: "
                  f"{len(params['frozen']['unexpected_changes'])}.", "",
                  "| module type | mean ‖ΔW‖/‖W‖ | max ‖ΔW‖/‖W‖ | modules |", "|---|---:|---:|---:|"]
        lines += [f"| {t} | {v['mean_relative']:.5f} | {v['max_relative']:.5f} | {v['modules']} |"
                  for t, v in params["analysis"]["by_type"].items()]
        ranks = sorted({m["effective_rank"] for m in params["analysis"]["modules"]})
        lines += ["", f"Effective rank of ΔW (singular values above 1e-6 × the largest): {ranks}."]
    evals = [h for h in history if any(k.startswith("eval_") for k in h)]
    lines += ["", "## Training", "",
              f"- objective `{report['config']['train']['objective']}`, steps {train.get('global_step')}, best "
              f"validation {task.metric_for_best} {_fmt(train.get('best_metric'))}, {_fmt(train.get('train_runtime_s'))} s "
              f"({_fmt(train.get('train_samples_per_second'))} examples/s)"]
    if evals:
        keys = [k for k in evals[0] if k.startswith("eval_")]
        lines += ["", "| step | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
        lines += [f"| {h.get('step')} | " + " | ".join(_fmt(h.get(k)) for k in keys) + " |" for h in evals]
    if figures:
        lines += ["", "## Plots", ""]
        lines += [f"![{title}]({path.relative_to(run_dir)})" for title, path in figures]
    if changes["n_fixed"] or changes["n_broken"]:
        lines += ["", "## Predictions that changed", "",
                  f"{changes['n_fixed']} test examples went from wrong to right, {changes['n_broken']} from right to wrong.", ""]
        for label, rows in (("wrong → right", changes["fixed"]), ("right → wrong", changes["broken"])):
            if rows:
                lines += [f"**{label}**", "", "| example | gold | zero-shot | fine-tuned |", "|---|---|---|---|"]
                lines += [f"| {_cell(r['text'])} | {_cell(r['gold'])} | {_cell(r['zero-shot'])} | {_cell(r['fine-tuned'])} |"
                          for r in rows]
                lines.append("")
    lines += ["", "## Timings (s)", "", *(f"- {k}: {v}" for k, v in report["timings_s"].items()), "",
              "## Versions", "", *(f"- {k}: {v}" for k, v in report["versions"].items()), "",
              "## Configuration", "", "```json", json.dumps(report["config"], indent=1), "```", ""]
    return "\n".join(lines)


def _cell(value) -> str:
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def markdown_to_html(markdown: str, run_dir: Path) -> str:
    """A small converter for the markdown this module writes (headings, lists, tables, images, code);
    images are embedded as base64 so the HTML file stands alone."""
    out, table, in_code = [], [], False

    def inline(text: str) -> str:
        text = html.escape(text)
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", text)

    def flush_table():
        if table:
            rows = [r for r in table if not re.fullmatch(r"\|[-:|]+\|", r)]
            cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", r.strip())[1:-1]] for r in rows]
            out.append("<table>" + "".join(
                "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{inline(c)}</{'th' if i == 0 else 'td'}>" for c in row)
                + "</tr>" for i, row in enumerate(cells)) + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("```"):
            flush_table()
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        image = re.fullmatch(r"!\[(.*)\]\((.*)\)", line)
        if image:
            data = base64.b64encode((run_dir / image[2]).read_bytes()).decode()
            out.append(f'<figure><img alt="{html.escape(image[1])}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(image[1])}</figcaption></figure>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush_table()
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}code{background:#f5f5f5}"
             "pre{background:#f5f5f5;padding:1em;overflow:auto}")
    title = html.escape(markdown.splitlines()[0].lstrip("# ")) if markdown else "tasktune report"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style>"
            f"</head><body>{''.join(out)}</body></html>\n")
