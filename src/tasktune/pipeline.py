"""`tasktune run` and `tasktune eval`: the stages of `stages.py` in a run directory. split → zero-shot →
train → params → fine-tuned → report, each stage done once across invocations (an interrupted run resumes).

Everything that can be checked (recipe, data file, model, verbalizers) is checked before the run
directory is created; the directory itself is staged and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from pathlib import Path

import torch
from accelerate import PartialState

from tasktune._version import __version__
from tasktune.config import Recipe
from tasktune.data.sampling import sample
from tasktune.data.split import overlap_warning
from tasktune.device import process_state
from tasktune.errors import TasktuneError
from tasktune.infer import merge_for_inference
from tasktune.memory import MemoryLog
from tasktune.methods import adapter_head
from tasktune.models import count_parameters, load_adapted_model
from tasktune.param_report import parameter_report
from tasktune.run_layout import RunLayout
from tasktune.rundir import RunDir, write_json, write_text
from tasktune.runlog import RunLog
from tasktune.shipping import check_run_can_ship, shipped_stage
from tasktune.stages import (Prepared, check_fingerprint, evaluate_gguf_stage, evaluate_stage, load_trained, prepare,
                             prepare_finished_run, run_fingerprint, train_stage)
from tasktune.tasks import PromptBuilder


def versions() -> dict:
    import peft
    import transformers

    return {"tasktune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


STAGES = ("split", "zeroshot", "train", "params", "finetuned", "shipped")


def logged_figures(task, metrics: dict | None) -> dict:
    """The report's numeric rows, flattened for experiment loggers: {"score/accuracy": 0.92, ...}."""
    return {f"{column}/{row}": values[row] for column, values in task.report_columns(metrics or {})
            for row in task.report_rows if isinstance(values.get(row), (int, float))}


def run(recipe: Recipe, overwrite: bool = False, train_only: bool = False, resume: bool = False) -> Path:
    """The whole job. Single process, or one of several under `accelerate launch -m tasktune run ...` /
    `torchrun -m tasktune run ...`: then training is data-parallel through the Trainer, evaluation is sharded
    and gathered, and only the main process writes the run directory (holding its lock throughout).

    `resume=True` insists that an unfinished run exists; re-running the same command resumes either way."""
    state = process_state()  # sets up torch.distributed when launched with several processes
    with RunLog() if state.is_main_process else contextlib.nullcontext() as log:
        return _run(recipe, state, log, overwrite, train_only, resume)


def _run(recipe: Recipe, state: PartialState, log: RunLog | None, overwrite: bool, train_only: bool,
         resume: bool) -> Path:
    from tasktune.methods import get_method

    if not get_method(recipe.train.method).trains:
        raise TasktuneError(f"train.method={recipe.train.method} trains nothing: it is for sweeps, where prompting "
                            "competes with fine-tuning; to evaluate prompting alone use `tasktune eval --shots K`")
    from tasktune import models
    from tasktune.ownership import check_outside
    from tasktune.recipes import check_gpu_fits

    # The run directory (and its unfinished twin) must not be, hold or sit inside anything the run reads: an
    # --overwrite would delete its own model.
    for folder in (recipe.run_dir, recipe.run_dir.parent / f".{recipe.run_dir.name}.partial"):
        check_outside(folder, {"model": recipe.model, "data": recipe.data.path, "test data": recipe.data.test_path,
                               "task spec": recipe.task, "perplexity text": recipe.eval.perplexity},
                      option="run directory")
    check_gpu_fits(recipe, models.gpu_memory_gib())  # before anything loads: not an out-of-memory error later
    main = state.is_main_process
    say = print if main else (lambda *_: None)
    p = prepare(recipe)
    if recipe.export.gguf:  # before training: the objective is chosen and the architecture known now
        check_run_can_ship(p)
    fingerprint = run_fingerprint(p)
    run_dir = None
    if main:
        run_dir = RunDir(recipe.run_dir, recipe.to_dict(), overwrite=overwrite)
        try:
            redo = "pass --overwrite to start it again, or choose another name"
            if run_dir.complete:
                check_fingerprint(run_dir.final, fingerprint, redo)
            elif run_dir.resumed:
                check_fingerprint(run_dir.work, fingerprint, redo)
            elif resume:
                raise TasktuneError(f"--resume: there is no unfinished run of this recipe to resume "
                                    f"({run_dir.work} does not exist); drop --resume to start one")
            if not run_dir.complete:
                run_dir.start()
                write_json(RunLayout(run_dir.work).fingerprint, fingerprint)
                # The task as declared: the report and model card read it from here, never from the user's path.
                write_text(RunLayout(run_dir.work).task_spec, p.task.spec.text)
        except BaseException:
            run_dir.release()
            raise
        if not run_dir.complete:
            log.attach(RunLayout(run_dir.work).log)
            run_dir.before_finish = log.close
    state.wait_for_everyone()
    if not main:  # the main process has created or validated the directory; follow it
        run_dir = RunDir(recipe.run_dir, recipe.to_dict(), lock=False)
    try:
        return _run_stages(p, run_dir, state, say, train_only)
    finally:
        run_dir.release()


class Stages:
    """Runs each stage once across invocations: a stage finished earlier (stages.json) is loaded instead of
    redone; after each one the memory snapshot is written and the stage marked, by the main process only,
    with every process of a launch waiting for it. Resume, process gating and memory live here, so that
    `_run_stages` reads as the list of stages."""

    def __init__(self, p: Prepared, run_dir: RunDir, state: PartialState, say):
        self.p, self.run_dir, self.state, self.say = p, run_dir, state, say
        self.layout = RunLayout(run_dir.work)
        self.main = state.is_main_process
        # Every process decides from the same snapshot: the main process marks stages as it goes.
        self.finished = {stage for stage in STAGES if run_dir.done(stage)}
        state.wait_for_everyone()
        if run_dir.resumed:
            say(f"[tasktune] resuming {run_dir.work} (finished stages are kept: {sorted(self.finished) or 'none'})")
        if self.layout.memory.is_file():  # a resumed run keeps the earlier invocation's record
            p.memory = MemoryLog(json.loads(self.layout.memory.read_text()), p.memory.stages)

    def _mark(self, stage: str) -> None:
        self.p.memory.stage(f"after {stage}")
        if self.main:
            write_json(self.layout.memory, self.p.memory.to_dict())
            self.run_dir.mark(stage)
        self.state.wait_for_everyone()

    def run(self, stage: str, compute, load=lambda: None, main_only: bool = False):
        """`load()` when the stage finished earlier, else `compute()` (on the main process only when
        `main_only`), then mark it."""
        if stage in self.finished:
            return load()
        start = time.perf_counter()
        value = compute() if self.main or not main_only else None
        self.p.timings[f"{stage}_s"] = round(time.perf_counter() - start, 3)
        self._mark(stage)
        return value

    def evaluation(self, stage: str, model, head: str = "causal_lm") -> dict:
        folder, shown = self.layout.stage(stage), {"zeroshot": "zero-shot", "finetuned": "fine-tuned"}[stage]

        def compute() -> dict:
            self.say(f"[tasktune] {shown} evaluation on {len(self.p.examples['test'])} test examples")
            return evaluate_stage(self.p, model, folder, head=head)

        metrics = self.run(stage, compute, load=lambda: json.loads(RunLayout.metrics(folder).read_text()))
        self.say(f"[tasktune] {shown:<10} {self.p.task.summary(metrics)}")
        return metrics


def _run_stages(p: Prepared, run_dir: RunDir, state: PartialState, say, train_only: bool) -> Path:
    """split → zero-shot → train → params → fine-tuned → [shipped] → report."""
    if run_dir.complete:
        say(f"[tasktune] {p.recipe.run_dir} is already complete for this recipe; nothing to do")
        return p.recipe.run_dir
    work, stages = run_dir.work, Stages(p, run_dir, state, say)
    base_params = count_parameters(p.lm.model)

    stages.run("split", lambda: write_split(p, stages.layout), main_only=True)
    report_overlap(p, say)
    zeroshot = None if train_only else stages.evaluation("zeroshot", p.lm.model)
    logs = experiment_logs(p, zeroshot)
    model, training, head = stages.run("train", lambda: train_stage(p, work, logs), load=lambda: load_trained(p, work))
    p.timings["train_s"] = training.get("train_runtime_s") or p.timings.get("train_s")
    merged = merge_for_inference(model)
    stages.run("params", lambda: write_json(stages.layout.params, parameter_report(
        p.lm.path, stages.layout.adapter, training["base_parameters_before_lora"], merged)), main_only=True)
    finetuned = None if train_only else stages.evaluation("finetuned", merged, head)
    if logs is not None and finetuned is not None:
        logs.log_finetuned(logged_figures(p.task, finetuned))
    if p.recipe.export.gguf and not train_only:
        stages.run("shipped", lambda: shipped_stage(p, work), main_only=True)

    if state.is_main_process:
        finish_run(p, run_dir, base_params, say)
    state.wait_for_everyone()
    return p.recipe.run_dir


def write_split(p: Prepared, layout: RunLayout) -> None:
    fingerprint = json.loads(layout.fingerprint.read_text())
    write_json(layout.split, {"source": p.source, "test_source": p.test_source,
                              "data_sha256": fingerprint["data_sha256"], "seed": p.recipe.data.seed,
                              "split_by": p.task.split_policy(p.recipe.data), "overlap": p.overlap, **p.split,
                              "limited": {k: [e["id"] for e in v] for k, v in p.examples.items()}})


def report_overlap(p: Prepared, say) -> None:
    say(f"[tasktune] test set seen in training: {json.dumps(p.overlap)}")
    warning = overlap_warning(p.overlap)
    if warning:
        say(f"[tasktune] {warning}")


def experiment_logs(p: Prepared, zeroshot: dict | None):
    """The experiment loggers' hook for test figures (None when train.report_to is `none`)."""
    if p.recipe.train.report_to == ["none"]:
        return None
    from tasktune.train import TestMetricLogs

    return TestMetricLogs(logged_figures(p.task, zeroshot))


def run_facts(p: Prepared, base_params: dict) -> dict:
    """What the report needs to know about a run beyond its stage outputs (run.json): the report reads files
    only, never `Prepared`."""
    from tasktune.data import source_origin

    return {
        "model_path": p.lm.path, "dtype": str(p.lm.dtype).replace("torch.", ""),
        "dtype_reason": p.lm.dtype_reason, "task": p.task.name,
        "task_type": p.task.type_name,
        "data": {"source": p.source, "origin": source_origin(p.source), **{k: len(v) for k, v in p.examples.items()}},
        "protocol": {**p.builder.describe(), "labels": list(p.task.label_names), "verbalizers": list(p.task.verbalizers),
                     "label_token_ids": p.label_token_ids},
        "split": {"split_by": p.task.split_policy(p.recipe.data), "test_source": p.test_source, "overlap": p.overlap},
        "base_parameters": base_params, "timings_s": {k: round(v, 2) for k, v in p.timings.items()},
        "versions": versions(),
    }


def finish_run(p: Prepared, run_dir: RunDir, base_params: dict, say) -> None:
    """run.json, memory.json and the report; then the directory is sealed and renamed into place."""
    from tasktune.report import write_report

    layout = RunLayout(run_dir.work)
    p.timings["wall_s"] = time.perf_counter() - p.started
    p.memory.stage("before report")
    write_json(layout.memory, p.memory.to_dict())
    write_json(layout.facts, run_facts(p, base_params))
    write_report(run_dir.work)
    say(f"[tasktune] wrote {p.recipe.run_dir}")
    run_dir.finish()  # closes run.log first: the seal lists every file as it stays


def evaluate_run(run_dir: Path, out: Path, data_path: str | None = None, overwrite: bool = False,
                 gguf: str | None = None, gguf_adapter: str | None = None) -> tuple[dict, str]:
    """`tasktune eval --run RUN_DIR`: the run's adapter, evaluated with the run's own resolved recipe (prompt,
    verbalizers, shots, prompt budget, seeds, split), so "same protocol" holds outside `run` as well. Without
    `data_path` it evaluates the run's own test split (reproducing finetuned/metrics.json); with it, every row
    of that file. With `gguf` (`--runtime llama.cpp --model FILE.gguf [--adapter FILE.gguf]`), what the run
    shipped as GGUF, run by llama.cpp with the same requests, and on the run's test split compared row by row
    with the adapter's predictions (comparison.json)."""
    from tasktune.ownership import check_outside
    from tasktune.rundir import StagingDir, require_finished_run

    run_dir = require_finished_run(Path(run_dir), trained=True)
    check_outside(Path(out), {"run": run_dir, "data": data_path, "model": gguf, "adapter": gguf_adapter})
    if gguf:
        from tasktune.llama_cpp_runtime import check_gguf_inputs

        check_gguf_inputs(gguf, gguf_adapter)
    staging = StagingDir(Path(out), overwrite=overwrite)  # refuse a bad --out before loading anything
    p = prepare_finished_run(run_dir)
    if data_path:
        rows, source = p.task.load(data_path)
        p.examples["test"] = rows
        p.source = source
    if gguf:
        with staging as work:
            metrics = evaluate_gguf_stage(p, work, gguf, gguf_adapter, {
                "run": str(run_dir), "data": p.source, "rows": "all" if data_path else "test split"},
                against=None if data_path else run_dir)
        return metrics, p.task.summary(metrics)
    model, _, head = load_trained(p, run_dir)
    with staging as work:
        metrics = evaluate_stage(p, merge_for_inference(model), work, head=head,
                                 protocol={"run": str(run_dir), "data": p.source,
                                           "rows": "all" if data_path else "test split"})
    return metrics, p.task.summary(metrics)


def evaluate_model(recipe: Recipe, out: Path, adapter: str | None = None, rows: str = "test",
                   overwrite: bool = False, runtime: str = "transformers") -> tuple[dict, str]:
    """`tasktune eval --task --model` and `tasktune.evaluate`: the same stages as `run` (prepare, then the
    evaluation stage with the recipe's protocol), for a base model or a base model with a LoRA adapter.

    `rows="test"`: the test part of the recipe's split (a task with a decision threshold chooses it on the
    validation slice, as `run` does); `rows="all"`: every row of the data file (no validation slice, so the raw
    decision only; in-context examples come from rows not evaluated)."""
    from tasktune.ownership import check_outside
    from tasktune.rundir import StagingDir

    check_outside(Path(out), {"model": recipe.model, "adapter": adapter, "data": recipe.data.path,
                              "test data": recipe.data.test_path, "task spec": recipe.task})
    if runtime == "llama.cpp":
        from tasktune.llama_cpp_runtime import check_gguf_inputs

        check_gguf_inputs(recipe.model, adapter)
    staging = StagingDir(Path(out), overwrite=overwrite)  # refuse a bad --out before loading anything
    head = adapter_head(Path(adapter)) if adapter and runtime != "llama.cpp" else "causal_lm"
    p = prepare(recipe, training=False)
    if rows == "all":
        everything = p.rows
        p.examples["test"] = sample(everything, recipe.data.limit_test, recipe.data.seed)
        p.examples["validation"] = []
        evaluated = {ex["id"] for ex in p.examples["test"]}
        p.builder = PromptBuilder(p.task, p.lm.tokenizer, recipe.eval.prompt_format, recipe.eval.shots,
                                  shot_pool=[r for r in everything if r["id"] not in evaluated],
                                  seed=recipe.data.seed)
    described = {**p.builder.describe(), "data": p.source, "rows": rows}
    if runtime == "llama.cpp":
        with staging as work:
            metrics = evaluate_gguf_stage(p, work, recipe.model, adapter, described)
        return metrics, p.task.summary(metrics)
    model = p.lm.model
    if adapter:
        adapted = load_adapted_model(Path(adapter), recipe.model, recipe.dtype,
                                     num_labels=p.task.seqcls_labels(),
                                     base=p.lm.model, trust_remote_code=recipe.trust_remote_code)
        model = merge_for_inference(adapted.model)
    protocol = {**p.builder.describe(), "data": p.source, "rows": rows, "model": recipe.model, "adapter": adapter}
    with staging as work:
        metrics = evaluate_stage(p, model, work, head=head, protocol=protocol)
    return metrics, p.task.summary(metrics)
