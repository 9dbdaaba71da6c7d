"""The Python API for notebooks: the same pipeline as the command line, returning what it wrote.

    import tasktune
    report = tasktune.run("sst2-gemma3-270m-cpu", train={"max_steps": 50}, data={"limit_test": 500})
    report.headline            # zero-shot → fine-tuned, gain, interval, p-value, n
    metrics = tasktune.evaluate("gemma3-270m", "sst2", limit=200)
    metrics["score"]["accuracy"], metrics.predictions[0]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tasktune.run_layout import RunLayout, read_jsonl


class _Mapping(dict):
    """A dict of what the CLI wrote as JSON, plus the directory it lives in."""

    path: Path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, keys={list(self)})"


class Report(_Mapping):
    """report.json of a finished run (a dict), with the run directory and its headline."""

    @property
    def run_dir(self) -> Path:
        return self.path

    @property
    def headline(self) -> dict | None:
        from tasktune.report import headline, task_of_run

        return headline(self, task_of_run(self.path, self))


class Metrics(_Mapping):
    """metrics.json of an evaluation (a dict), with its output directory and the prediction records."""

    @property
    def predictions(self) -> list[dict]:
        return read_jsonl(RunLayout.predictions(self.path))


def _loaded(cls, folder: Path, file: Path):
    obj = cls(json.loads(file.read_text()))
    obj.path = folder
    return obj


def run(recipe: str, *, overrides: list[str] = (), overwrite: bool = False, resume: bool = False,
        **settings) -> Report:
    """`tasktune run RECIPE [k=v ...]`: `recipe` is a shipped recipe's name or a YAML path; `settings` are
    recipe sections as keyword arguments (`train={"max_steps": 50}`, `model="..."`), `overrides` the command
    line's `key=value` strings. Returns the run's report.json."""
    from tasktune.config import load_recipe
    from tasktune.pipeline import run as run_pipeline

    run_dir = run_pipeline(load_recipe(recipe, list(overrides), settings=settings), overwrite=overwrite,
                           resume=resume)
    return _loaded(Report, Path(run_dir), RunLayout(run_dir).report)


def evaluate(model: str, task: str, data: str | None = None, *, adapter: str | None = None, rows: str = "test",
             limit: int | None = None, out: str | None = None, overwrite: bool = False, **settings) -> Metrics:
    """`tasktune eval --task TASK --model MODEL`: the evaluation stage of `run` on a base model (and optional
    LoRA adapter). `rows="test"` evaluates the test part of the task's split, `"all"` every row of `data`.
    `settings` are recipe sections (`eval={"shots": 1}`, `dtype="fp32"`). Files go to `out` (default: a new
    temporary directory); returns metrics.json with the prediction records at hand."""
    from tasktune.config import load_recipe, merge_mappings
    from tasktune.pipeline import evaluate_model

    base = {"name": "eval", "task": task, "model": model, "data": {"path": data, "limit_test": limit}}
    recipe = load_recipe(None, settings=merge_mappings(base, settings))
    out_dir = Path(out) if out else Path(tempfile.mkdtemp(prefix="tasktune-eval-"))
    evaluate_model(recipe, out_dir, adapter, rows, overwrite=overwrite)
    return _loaded(Metrics, out_dir, RunLayout.metrics(out_dir))


class SweepResult(_Mapping):
    """sweep.json of a finished sweep (winner, base, test figures, paired tests), with its directory."""

    @property
    def leaderboard(self) -> list[dict]:
        return json.loads((self.path / "leaderboard.json").read_text())


def sweep(sweep_file: str, *overrides: str, overwrite: bool = False) -> SweepResult:
    """`tasktune sweep FILE [k=v ...]`: run or continue the sweep; returns sweep.json (the leaderboard beside)."""
    from tasktune.sweeper import sweep as run_sweep

    sweep_dir = Path(run_sweep(sweep_file, list(overrides), overwrite=overwrite))
    return _loaded(SweepResult, sweep_dir, sweep_dir / "sweep.json")
