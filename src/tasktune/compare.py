"""`tasktune compare RUN...`: several runs side by side in one table and one plot."""

from __future__ import annotations

import json
from pathlib import Path

from tasktune import plots
from tasktune.errors import TasktuneError
from tasktune.ownership import check_outside
from tasktune.report import markdown_table
from tasktune.rundir import StagingDir, require_finished_run, write_text


def headline(report: dict) -> dict:
    """The fine-tuned (and zero-shot) figures that make runs of one task comparable."""
    out = {"model": report["model"], "objective": report["config"]["train"]["objective"],
           "train_examples": report["data"].get("train"), "train_s": report["timings_s"].get("train_s")}
    for stage in ("zeroshot", "finetuned"):
        m = report.get(stage) or {}
        if report["task_type"] == "classification":
            protocol = "score" if "score" in m else "classifier"
            for column, suffix in ((f"{protocol}_sentences", "_sentences"), (protocol, "")):
                for key in ("accuracy", "f1", "f1_macro"):
                    if key in m.get(column, {}):
                        out[f"{stage}_{key}{suffix}"] = m[column][key]
        else:
            for key in ("exact", "f1", "HasAns_f1", "NoAns_f1"):
                if key in m:
                    out[f"{stage}_{key}"] = m[key]
    return out


def compare(run_dirs: list[str], out: Path, overwrite: bool = False) -> str:
    reports = [json.loads((require_finished_run(Path(run)) / "report.json").read_text()) for run in run_dirs]
    if len({r["task"] for r in reports}) > 1:
        raise TasktuneError(f"runs of different tasks cannot share a table: {sorted({r['task'] for r in reports})}")
    check_outside(Path(out), {f"run {run}": run for run in run_dirs})
    staging = StagingDir(out, overwrite=overwrite)
    columns = [(f"`{r['name']}`", headline(r)) for r in reports]
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
