"""`tasktune compare RUN...`: several runs side by side in one table and one plot."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from tasktune import plots
from tasktune.cost_report import cost_figures
from tasktune.errors import TasktuneError
from tasktune.ownership import check_outside
from tasktune.report import markdown_table
from tasktune.run_layout import RunLayout
from tasktune.rundir import StagingDir, require_finished_run, write_text


def test_set(run_dir: Path) -> str:
    """What a run was tested on, as a short fingerprint: its data files' sha256 and the ids of its test rows."""
    path = RunLayout(run_dir).split
    if not path.is_file():
        return "unknown (no split.json)"
    split = json.loads(path.read_text())
    ids = split.get("limited", {}).get("test", split.get("test"))
    body = json.dumps({"data": split.get("data_sha256"), "test_source": split.get("test_source"), "ids": ids},
                      sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


def headline(report: dict, task, tested_on: str) -> dict:
    """The fine-tuned (and zero-shot) figures that make runs of one task comparable, each stage's n and its
    headline's 95% interval, and the test set they were measured on."""
    out = {"model": report["model"], "objective": report["config"]["train"]["objective"],
           "train_examples": report["data"].get("train"), "train_s": report["timings_s"].get("train_s"),
           "test_set": tested_on}
    for stage in ("zeroshot", "finetuned"):
        metrics = report.get(stage) or {}
        out.update({f"{stage}_{k}": v for k, v in task.compare_figures(metrics).items()})
        columns = task.report_columns(metrics)
        if columns:
            column, values = columns[0]
            out[f"{stage}_n"] = values.get("n")
            for key, interval in (values.get("ci95") or {}).items():
                out[f"{stage}_{column}_{key}_ci95"] = f"[{interval[0]:.4f}, {interval[1]:.4f}]"
    return {**out, **cost_figures(report.get("costs"))}  # what each adaptation cost, paired, with intervals


def compare(run_dirs: list[str], out: Path, overwrite: bool = False) -> str:
    from tasktune.report import task_of_run

    reports = [json.loads(RunLayout(require_finished_run(Path(run))).report.read_text()) for run in run_dirs]
    if len({r["task"] for r in reports}) > 1:
        raise TasktuneError(f"runs of different tasks cannot share a table: {sorted({r['task'] for r in reports})}")
    check_outside(Path(out), {f"run {run}": run for run in run_dirs})
    staging = StagingDir(out, overwrite=overwrite)
    task = task_of_run(Path(run_dirs[0]), reports[0])
    tested_on = [test_set(Path(run)) for run in run_dirs]
    columns = [(f"`{r['name']}`", headline(r, task, t)) for r, t in zip(reports, tested_on)]
    rows = list(dict.fromkeys(k for _, c in columns for k in c))
    keys = [k for k in rows if (k.startswith("finetuned_") or k.startswith("zeroshot_"))
            and isinstance(columns[0][1].get(k), (int, float)) and not k.endswith("_n")]
    text = f"# Comparison of {len(reports)} {reports[0]['task']} runs\n\n"
    if len(set(tested_on)) > 1:
        warning = (f"these runs were tested on {len(set(tested_on))} different test sets (row `test_set`): their "
                   "figures are not paired and a difference between them is not a finding; compare runs of one split")
        print(f"[tasktune] warning: {warning}", file=sys.stderr)
        text += f"**Warning: {warning}.**\n\n"
    text += markdown_table(rows, columns)
    with staging as work:
        figure = plots.metric_bars([(n.strip("`"), c) for n, c in columns], keys,
                                   f"{reports[0]['task']}: runs compared", work / "compare.png")
        if figure:
            text += "\n![runs compared](compare.png)\n"
        write_text(work / "compare.md", text)
    return text
