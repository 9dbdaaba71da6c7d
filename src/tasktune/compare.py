"""`tasktune compare RUN...`: several runs side by side in one table and one plot."""

from __future__ import annotations

import json
from pathlib import Path

from tasktune import plots
from tasktune.costs import cost_figures
from tasktune.errors import TasktuneError
from tasktune.ownership import check_outside
from tasktune.report import markdown_table
from tasktune.rundir import StagingDir, require_finished_run, write_text


def headline(report: dict, task) -> dict:
    """The fine-tuned (and zero-shot) figures that make runs of one task comparable."""
    out = {"model": report["model"], "objective": report["config"]["train"]["objective"],
           "train_examples": report["data"].get("train"), "train_s": report["timings_s"].get("train_s")}
    for stage in ("zeroshot", "finetuned"):
        out.update({f"{stage}_{k}": v for k, v in task.compare_figures(report.get(stage) or {}).items()})
    return {**out, **cost_figures(report.get("costs"))}  # what each adaptation cost, paired, with intervals


def compare(run_dirs: list[str], out: Path, overwrite: bool = False) -> str:
    from tasktune.report import task_of_run

    reports = [json.loads((require_finished_run(Path(run)) / "report.json").read_text()) for run in run_dirs]
    if len({r["task"] for r in reports}) > 1:
        raise TasktuneError(f"runs of different tasks cannot share a table: {sorted({r['task'] for r in reports})}")
    check_outside(Path(out), {f"run {run}": run for run in run_dirs})
    staging = StagingDir(out, overwrite=overwrite)
    task = task_of_run(Path(run_dirs[0]), reports[0])
    columns = [(f"`{r['name']}`", headline(r, task)) for r in reports]
    rows = list(dict.fromkeys(k for _, c in columns for k in c))
    keys = [k for k in rows if k.startswith("finetuned_") or k.startswith("zeroshot_")]
    text = f"# Comparison of {len(reports)} {reports[0]['task']} runs\n\n" + markdown_table(rows, columns)
    with staging as work:
        figure = plots.metric_bars([(n.strip("`"), c) for n, c in columns], keys,
                                   f"{reports[0]['task']}: runs compared", work / "compare.png")
        if figure:
            text += "\n![runs compared](compare.png)\n"
        write_text(work / "compare.md", text)
    return text
