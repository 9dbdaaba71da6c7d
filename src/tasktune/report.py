"""The run's report: report.json (everything, machine-readable), report.md and a self-contained report.html
(the tables, the parameter analysis, plots and example predictions a person reads).

`write_report` records the run; `render` rebuilds the human-readable files from the run directory alone,
so `tasktune report RUN_DIR` can redo them at any time.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasktune import plots
from tasktune.html_page import markdown_to_html
from tasktune.rundir import write_json, write_text
from tasktune.cost_report import cost_lines, paired_costs
from tasktune.run_layout import RunLayout, read_jsonl
from tasktune.shipped_report import shipped_lines


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


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(run_dir: Path) -> dict:
    """report.json from the run directory's files (run.json, recipe.yaml, the stages' outputs), then report.md
    and report.html."""
    from tasktune.config import read_yaml_mapping

    run_dir = Path(run_dir)
    facts = json.loads(RunLayout(run_dir).facts.read_text())
    config = read_yaml_mapping(RunLayout(run_dir).recipe, "recipe")  # the resolved recipe the run wrote
    zeroshot, finetuned = _read_json(RunLayout(run_dir).stage_metrics("zeroshot")), _read_json(RunLayout(run_dir).stage_metrics("finetuned"))
    training = _read_json(RunLayout(run_dir).summary) or {}
    data = {**facts["data"], "sha256": json.loads(RunLayout(run_dir).fingerprint.read_text())["data_sha256"]}
    report = {
        "name": config["name"], "task": facts["task"], "model": config["model"], "model_path": facts["model_path"],
        "dtype": facts["dtype"], "dtype_reason": facts.get("dtype_reason"), "data": data, "task_type": facts["task_type"], "protocol": facts["protocol"],
        "split": facts["split"], "zeroshot": zeroshot, "finetuned": finetuned,
        "paired": paired_comparison(run_dir, task_of_run(run_dir, facts)) if zeroshot and finetuned else None,
        "costs": paired_costs(run_dir) if zeroshot and finetuned else None,
        "training": training,
        "parameters": {"base": facts["base_parameters"], "adapted": training.get("parameters")},
        "timings_s": facts["timings_s"], "config": config,
        "memory": (_read_json(RunLayout(run_dir).memory) or {}).get("summary"),
        "shipped": _read_json(RunLayout(run_dir).shipped / "shipped.json"),  # export.gguf, measured
        "versions": facts["versions"],
    }
    write_json(RunLayout(run_dir).report, report)
    render(run_dir)
    return report


def paired_comparison(run_dir: Path, task) -> dict:
    """Zero-shot vs fine-tuned on the same test examples (the task's paired tests), from the run's files."""
    layout = RunLayout(run_dir)
    return task.paired(read_jsonl(layout.stage_predictions("zeroshot"), missing_ok=True),
                       read_jsonl(layout.stage_predictions("finetuned"), missing_ok=True))


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

    from tasktune.config import read_yaml_mapping

    config = report.get("config") or read_yaml_mapping(RunLayout(run_dir).recipe, "recipe")
    return get_task(str(RunLayout(run_dir).task_spec), report["protocol"].get("verbalizers") or None,
                    config["eval"]["max_prompt_tokens"])


def changed_examples(run_dir: Path, task, limit: int = 200) -> dict[str, list[dict]]:
    """Test examples whose outcome changed between zero-shot and fine-tuned, in both directions."""
    layout = RunLayout(run_dir)
    before = {r["id"]: r for r in read_jsonl(layout.stage_predictions("zeroshot"), missing_ok=True)}
    after = {r["id"]: r for r in read_jsonl(layout.stage_predictions("finetuned"), missing_ok=True)}
    fixed, broken = [], []
    for qid, new in after.items():
        old = before.get(qid)
        if old is None:
            continue
        change = task.changed_example(old, new)
        if change is None:
            continue
        was, now, row = change
        if was != now:
            (fixed if now else broken).append(row)
    return {"fixed": fixed[:limit], "broken": broken[:limit], "n_fixed": len(fixed), "n_broken": len(broken)}


def make_plots(run_dir: Path, report: dict, task, params: dict | None, history: list[dict]) -> list[tuple[str, Path]]:
    out = run_dir / "plots"
    made = [("Training", plots.training_curves(history, task.metric_for_best, out / "training.png"))]
    zs, ft = report.get("zeroshot"), report.get("finetuned")
    made += task.report_plots(zs, ft, [(n.replace("`", ""), v) for n, v in columns_of(task, zs, ft)], out)
    if params:
        made.append(("LoRA update per layer", plots.delta_heatmap(params["analysis"]["modules"], out / "delta_heatmap.png")))
    return [(title, path) for title, path in made if path is not None]


def render(run_dir: Path) -> list[Path]:
    """Rebuild report.md, report.html and the plots from the run directory's files; returns what it wrote."""
    run_dir = Path(run_dir)
    report = json.loads((RunLayout(run_dir).report).read_text())
    params = json.loads((RunLayout(run_dir).params).read_text()) if (RunLayout(run_dir).params).is_file() else None
    task = task_of_run(run_dir, report)
    history_path = RunLayout(run_dir).log_history
    history = json.loads(history_path.read_text()) if history_path.is_file() else []
    figures = make_plots(run_dir, report, task, params, history)
    changes = changed_examples(run_dir, task)
    markdown = render_markdown(report, task, params, figures, changes, history, run_dir)
    write_text(RunLayout(run_dir).report_md, markdown)
    write_text(RunLayout(run_dir).report_html, markdown_to_html(markdown, run_dir, headline_html(report, task)))
    return [RunLayout(run_dir).report_md, RunLayout(run_dir).report_html, *(path for _, path in figures)]


def headline(report: dict, task) -> dict | None:
    """The task's main figure zero-shot → fine-tuned, the paired gain with its interval and p-value, n, and
    the wall time: what the report opens with."""
    zeroshot, finetuned = report.get("zeroshot"), report.get("finetuned")
    if not zeroshot or not finetuned:
        return None
    columns = task.report_columns(zeroshot)
    if not columns:
        return None
    column, before = columns[0]
    after = dict(task.report_columns(finetuned)).get(column)
    metric = task.metric_for_best
    if after is None or metric not in before:
        return None
    paired = (report.get("paired") or {}).get(column) or next(iter((report.get("paired") or {}).values()), None)
    return {"metric": metric, "protocol": column, "zeroshot": before[metric], "finetuned": after[metric],
            "interval": (after.get("ci95") or {}).get(metric), "gain": paired["gain"] if paired else None,
            "n": after.get("n") or after.get("total"), "wall_s": report.get("timings_s", {}).get("wall_s")}


def headline_html(report: dict, task) -> str | None:
    import html

    h = headline(report, task)
    if h is None:
        return None
    line = (f"<div class='big'>{html.escape(h['metric'])} {h['zeroshot']:.4g} → {h['finetuned']:.4g}</div>"
            f"<div>{html.escape(report['task'])}, protocol <code>{html.escape(h['protocol'])}</code>, "
            f"n = {h['n']:,} test examples")
    if h["interval"]:
        line += f"; fine-tuned 95% interval [{h['interval'][0]:.4g}, {h['interval'][1]:.4g}]"
    line += "</div>"
    if h["gain"]:
        g = h["gain"]
        p_text = "&lt; 0.001" if g["p_value"] < 0.001 else f"{g['p_value']:.3g}"
        line += (f"<div>gain {g['difference']:+.4g}, 95% paired interval [{g['interval'][0]:+.4g}, "
                 f"{g['interval'][1]:+.4g}], p {p_text}</div>")
    for cost in cost_lines(report.get("costs"), report.get("zeroshot"), report.get("finetuned")):
        line += f"<div>cost: {html.escape(cost[2:])}</div>"
    if h["wall_s"]:
        line += f"<div>wall time {h['wall_s'] / 60:.1f} min</div>"
    return line


def render_markdown(report, task, params, figures, changes, history: list[dict], run_dir: Path) -> str:
    proto, train = report["protocol"], report["training"]
    adapted = report["parameters"]["adapted"] or {}
    lines = [
        f"# {report['name']}: {report['task']} on {report['model']}", "",
        f"Data ({report['data'].get('origin', 'path')}): `{report['data']['source']}` — train {report['data'].get('train')}, validation "
        f"{report['data'].get('validation')}, test {report['data'].get('test')} examples. dtype {report['dtype']}"
        + (f" ({report['dtype_reason']})." if report.get("dtype_reason") else "."),
        *(f"- sha256 of `{Path(f).name}`: `{h}`" for f, h in report["data"].get("sha256", {}).items()), "",
        *overlap_lines(report.get("split")), "",
        *bought_and_cost(report, task), "",
        "## Zero-shot vs fine-tuned (same test split, same protocol)", "",
        "Figures with their 95% bootstrap interval (1,000 seeded resamples of the test examples).", "",
        comparison_table(task, report["zeroshot"], report["finetuned"]),
        *paired_lines(report.get("paired")), "",
        *shipped_lines(report.get("shipped")),
        "## Protocol", "",
        f"- prompt format `{proto['prompt_format']}`, shots {proto['shots']}",
        f"- template: `{proto['template']!r}`",
        *task.protocol_notes(proto), "",
        "## Parameters", "", "| | count |", "|---|---:|",
        f"| base model | {_fmt(report['parameters']['base']['total'])} |",
        f"| adapted model (base + adapter) | {_fmt(adapted.get('total'))} |",
        f"| trainable (adapter) | {_fmt(adapted.get('trainable'))} ({100 * adapted.get('trainable_share', 0):.3f}%) |",
    ]
    if params:
        adapter = adapter_section(params)
        settings = adapter.get("settings") or (  # runs before commit bdb1bbc have no `settings`
            f"r={adapter['r']}, alpha={adapter['alpha']} (scale {adapter['scale']:.3g})" if "r" in adapter
            else "one scale vector per target")
        lines += [f"| merged model | {_fmt(params['counts']['merged'])} (equals base: {params['counts']['merged_equals_base']}) |",
                  "", f"Method `{adapter.get('method', 'lora')}`: {settings} on {adapter['modules']} modules "
                  f"({', '.join(adapter['target_modules'])}); {adapter['formula_text']} = {_fmt(adapter['formula'])} = "
                  f"counted {_fmt(adapter['parameters'])}: {adapter['formula_matches']}.",
                  f"Frozen weights bit-identical after merging: {params['frozen']['identical']} tensors; changed: "
                  f"{params['frozen']['changed']} (all adapter targets); unexpected changes: "
                  f"{len(params['frozen']['unexpected_changes'])}.", "",
                  "| module type | mean ‖ΔW‖/‖W‖ | max ‖ΔW‖/‖W‖ | modules |", "|---|---:|---:|---:|"]
        lines += [f"| {t} | {v['mean_relative']:.5f} | {v['max_relative']:.5f} | {v['modules']} |"
                  for t, v in params["analysis"]["by_type"].items()]
        ranks = sorted({m["effective_rank"] for m in params["analysis"]["modules"] if "effective_rank" in m})
        if ranks:
            lines += ["", f"Effective rank of ΔW (singular values above 1e-6 × the largest): {ranks}."]
    evals = [h for h in history if any(k.startswith("eval_") for k in h)]
    lines += ["", "## Training", "",
              f"- objective `{report['config']['train']['objective']}`, steps {train.get('global_step')}, best "
              f"validation {task.metric_for_best} {_fmt(train.get('best_metric'))}, {_fmt(train.get('train_runtime_s'))} s "
              f"({_fmt(train.get('train_samples_per_second'))} training rows/s"
              + (f" of {train['training_rows']} rows" if train.get("training_rows") is not None else "") + ")"]
    if evals:
        keys = [k for k in evals[0] if k.startswith("eval_")]
        lines += ["", "| step | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
        lines += [f"| {h.get('step')} | " + " | ".join(_fmt(h.get(k)) for k in keys) + " |" for h in evals]
    if figures:
        lines += ["", "## Plots", ""]
        lines += [f"![{title}]({path.relative_to(run_dir)})" for title, path in figures]
    if changes["n_fixed"] or changes["n_broken"]:
        shown = len(changes["fixed"]) + len(changes["broken"])
        better, worse = task.change_names()
        lines += ["", "## Predictions that changed", "",
                  f"{changes['n_fixed']} test examples: {better}; {changes['n_broken']}: {worse}; "
                  f"{'all' if shown == changes['n_fixed'] + changes['n_broken'] else f'the first {shown}'} "
                  "below. (sortable)", "",
                  "| change | example | gold | zero-shot | fine-tuned |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {_cell(r['text'])} | {_cell(r['gold'])} | {_cell(r['zero-shot'])} | "
                  f"{_cell(r['fine-tuned'])} |"
                  for label, rows in ((better, changes["fixed"]), (worse, changes["broken"]))
                  for r in rows]
        lines.append("")
    lines += memory_lines(run_dir, report.get("memory"))
    lines += ["", "## Timings (s)", "", *(f"- {k}: {v}" for k, v in report["timings_s"].items()), "",
              "## Versions", "", *(f"- {k}: {v}" for k, v in report["versions"].items()), "",
              "## Configuration", "", "```json", json.dumps(report["config"], indent=1), "```", ""]
    return "\n".join(lines)


def adapter_section(params: dict) -> dict:
    """params.json's adapter summary; runs written before 2026-12-02 named it `lora`, with `rank_formula`."""
    analysis = params["analysis"]
    if "adapter" in analysis:
        return analysis["adapter"]
    old = analysis["lora"]
    return {**old, "formula": old["rank_formula"], "formula_matches": old["rank_formula_matches"],
            "formula_text": "r×(in+out)" + (" + out per target (DoRA magnitudes)"
                                           if old.get("magnitude_parameters") else "")}


def bought_and_cost(report: dict, task) -> list[str]:
    """The first screen: what the adaptation bought on its task, and what it cost elsewhere."""
    h = headline(report, task)
    if h is None:
        return []
    lines = ["## Bought and cost", ""]
    bought = f"- bought: {task.name} {h['metric']} ({h['protocol']}) {h['zeroshot']:.4f} → {h['finetuned']:.4f}"
    if h["gain"]:
        g = h["gain"]
        bought += (f", gain {g['difference']:+.4f} (95% paired interval [{g['interval'][0]:+.4f}, "
                   f"{g['interval'][1]:+.4f}], p {g['p_value']:.3g})")
    lines.append(bought + f", n = {h['n']}")
    costs = cost_lines(report.get("costs"), report.get("zeroshot"), report.get("finetuned"))
    lines += costs or ["- cost: not measured (set eval.perplexity and eval.controls)"]
    return lines


def memory_lines(run_dir: Path, summary: dict | None) -> list[str]:
    """Peak RSS, what the run added to the loaded model, and RSS at each stage (memory.json)."""
    record = _read_json(RunLayout(run_dir).memory)
    if not summary or not record:
        return []
    lines = ["", "## Memory", "",
             f"Peak resident memory {_mib(summary['peak_rss_mib'])} MiB; after loading the model "
             f"{_mib(summary['rss_after_model_load_mib'])} MiB, so the run added {_mib(summary['added_by_the_run_mib'])}"
             " MiB" + (f"; CUDA peak allocated {_mib(summary['cuda_peak_allocated_mib'])} MiB"
                       if summary.get("cuda_peak_allocated_mib") else "") + ".", "",
             "| at | RSS MiB | peak RSS so far MiB |", "|---|---:|---:|"]
    lines += [f"| {p['at']} | {_mib(p['rss_mib'])} | {_mib(p['peak_rss_mib'])} |" for p in record["stages"]]
    steps = record.get("steps") or []
    if steps:
        top = max(steps, key=lambda p: p["rss_mib"] or 0)
        lines += ["", f"During training ({len(steps)} snapshots): RSS from {_mib(min(p['rss_mib'] or 0 for p in steps))}"
                  f" to {_mib(top['rss_mib'])} MiB (highest at step {top['step']}, {top['at']})."]
    return lines


def _mib(value) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _cell(value) -> str:
    """A data value in a markdown table cell: never markup (a row holding `<script>` shows as text in any
    markdown viewer, and in report.html)."""
    import html

    text = html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."
