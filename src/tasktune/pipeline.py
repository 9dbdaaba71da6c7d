"""The whole job for one recipe: data → task → model → zero-shot eval → LoRA → same-protocol eval → report.

Everything that can be checked (recipe, data file, model, verbalizers) is checked before the run
directory is created; the directory itself is staged and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState

from tasktune._version import __version__
from tasktune.config import Recipe
from tasktune.costs import held_out_documents
from tasktune.device import describe as device_of, process_state
from tasktune.infer import merge_for_inference, unwrap
from tasktune.data.sampling import sample
from tasktune.data.split import overlap_warning
from tasktune.errors import TasktuneError
from tasktune.memory import MemoryLog, StepMemory
from tasktune.models import LoadedModel, count_parameters, load_adapted_model, load_model, model_identity
from tasktune.param_report import parameter_report
from tasktune.methods import adapter_head, get_method
from tasktune.run_layout import RunLayout
from tasktune.runlog import RunLog
from tasktune.rundir import RunDir, write_json, write_jsonl, write_text
from tasktune.tasks import PromptBuilder, get_task
from tasktune.tasks.base import TaskType


def versions() -> dict:
    import peft
    import transformers

    return {"tasktune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


@dataclass
class Prepared:
    recipe: Recipe
    task: TaskType
    source: str
    split: dict[str, list[int]]
    examples: dict[str, list[dict]]
    lm: LoadedModel
    builder: PromptBuilder
    label_token_ids: list[int] | None
    overlap: dict  # how much of the test set the training part has seen (see the task's `overlap`)
    test_source: str | None = None  # data.test_path, when the test set is a separate file
    timings: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)  # for the wall time of this invocation
    memory: MemoryLog = field(default_factory=MemoryLog)
    rows: list[dict] = field(default_factory=list)  # every row of the data file, as loaded (read once)
    documents: tuple[list[str], str] | None = None  # eval.perplexity's held-out documents and their origin

    @property
    def sources(self) -> str:
        """Every data file the run reads (for fingerprints)."""
        return self.source + (f", {self.test_source}" if self.test_source else "")


def prepare(recipe: Recipe, training: bool = True) -> Prepared:
    """Load and check everything the run needs (`training=False`: an evaluation only); writes nothing."""
    timings = {}
    started = start = time.perf_counter()
    task = get_task(recipe.task, recipe.eval.verbalizers, recipe.eval.max_prompt_tokens)
    rows, source = task.load(recipe.data.path)
    split = task.split(rows, recipe.data)
    by_id = {r["id"]: r for r in rows}
    examples = {part: [by_id[i] for i in ids] for part, ids in split.items()}
    test_source = None
    if recipe.data.test_path:  # a separate test file; the data file's own test part is then left unused
        examples["test"], test_source = task.load(recipe.data.test_path)
        split["test"] = [r["id"] for r in examples["test"]]
    overlap = task.overlap(examples["train"] + examples["validation"], examples["test"])
    examples = task.sampled_parts(examples, recipe.data)
    timings["data_s"] = time.perf_counter() - start
    # Before the model loads: a perplexity source without documents is bad input, refused first.
    documents = held_out_documents(recipe, examples) if recipe.eval.perplexity else None

    start = time.perf_counter()
    lm = load_model(recipe.model, recipe.dtype, trust_remote_code=recipe.trust_remote_code)
    timings["model_load_s"] = time.perf_counter() - start
    if training:
        check_target_modules(lm.model, recipe.train.target_modules)
    memory = MemoryLog()
    memory.stage("model loaded")
    builder = PromptBuilder(task, lm.tokenizer, recipe.eval.prompt_format, recipe.eval.shots,
                            shot_pool=examples["train"], seed=recipe.data.seed)
    label_ids = task.label_token_ids(builder, examples["test"][0])
    resolve_objective(recipe, task, label_ids, training)
    check_prompt_lengths(recipe, task, builder, lm, examples, source if not test_source else
                         f"{source} or {test_source}", training)
    return Prepared(recipe, task, source, split, examples, lm, builder, label_ids, overlap, test_source, timings,
                    started, memory, rows, documents)


def check_prompt_lengths(recipe: Recipe, task, builder, lm: LoadedModel, examples: dict, source: str,
                         training: bool) -> None:
    """Before any stage: the longest evaluation prompts must fit the model's positions (the rule every evaluation
    applies, `inference_requests.check_positions`, here on the few longest rows so that a run refuses before its
    directory exists), and so must a training row of train.max_length tokens."""
    from tasktune.inference_requests import check_positions, model_positions

    positions = model_positions(lm.model.config)
    if positions is None:
        return
    if training and recipe.train.max_length > positions:
        raise TasktuneError(f"train.max_length={recipe.train.max_length} is more than the {positions} positions the "
                            "model reads (config.max_position_embeddings)")
    rows = examples["test"] + examples["validation"]
    longest = sorted(rows, key=lambda ex: -len(builder.render(ex)))[:3]
    for protocol in task.protocols(recipe.eval.protocols, "causal_lm"):
        requests, _ = task.requests(builder, longest, protocol)
        check_positions(requests, longest, positions, source)


def resolve_objective(recipe: Recipe, task, label_ids: list[int] | None, training: bool) -> None:
    """An unset train.objective becomes the task type's choice for these verbalizers (single tokens: the fast
    `verbalizer`; several: `lm`); a set one that needs single tokens is refused when they are not."""
    from tasktune.losses import get_objective

    if recipe.train.objective is None:
        recipe.train.objective = task.default_objective(label_ids is not None)
    if training and label_ids is None and get_objective(recipe.train.objective).single_token_verbalizers:
        raise TasktuneError(f"train.objective={recipe.train.objective} needs single-token verbalizers; those of "
                            f"{task.name!r} are several tokens for this tokenizer: use train.objective=lm")


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Every train.target_modules name must be a linear layer of this model: fail here, before the run
    directory exists, rather than in peft after the zero-shot evaluation."""
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    missing = [t for t in targets if t not in linear]
    if missing:
        raise TasktuneError(f"train.target_modules {missing} are not linear layers of this model (expected some "
                            f"of {linear})")


STAGES = ("split", "zeroshot", "train", "params", "finetuned")


def evaluate_stage(p: Prepared, model, out_dir: Path, head: str = "causal_lm", protocol: dict | None = None) -> dict:
    """Evaluate the test split with the run's protocol (and its threshold chosen on the validation slice).
    Under `accelerate launch`/`torchrun` the runner shards the requests across processes and gathers the
    results, so every process computes the same metrics; only the main process writes."""
    from tasktune import evaluation
    from tasktune.runner import Runner

    cfg = p.recipe.eval
    state = process_state()
    test = p.examples["test"]
    generate_ids = {ex["id"] for ex in sample(test, cfg.limit_generate, p.recipe.data.seed)}
    start = time.perf_counter()
    runner = Runner(model, p.lm.tokenizer, cfg.batch_size)
    metrics, records = evaluation.evaluate(p.task, runner, p.builder, test, cfg.protocols, head, generate_ids,
                                           validation=p.examples["validation"])
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    metrics["processes"] = state.num_processes
    metrics["device"] = device_of(model)  # where this stage computed (the GPU session checks it)
    if state.is_main_process:
        from tasktune.costs import measure

        start = time.perf_counter()
        cost = measure(p, model, out_dir, head)  # perplexity and controls, when the recipe asks for them
        if cost:
            metrics["cost"] = {**cost, "seconds": round(time.perf_counter() - start, 3)}
        write_json(RunLayout.metrics(out_dir), {**metrics, **({"protocol": protocol} if protocol else {})})
        write_jsonl(RunLayout.predictions(out_dir), records)
    return metrics


def logged_figures(task, metrics: dict | None) -> dict:
    """The report's numeric rows, flattened for experiment loggers: {"score/accuracy": 0.92, ...}."""
    return {f"{column}/{row}": values[row] for column, values in task.report_columns(metrics or {})
            for row in task.report_rows if isinstance(values.get(row), (int, float))}


def training_features(p: Prepared) -> list[dict]:
    """The tokenized training rows of a prepared run, as its recipe's train keys make them."""
    cfg = p.recipe.train
    from tasktune.losses import get_objective

    return p.task.train_features(p.builder, p.examples["train"], get_objective(cfg.objective), cfg.max_length,
                                 p.label_token_ids, cfg.questions_per_context)


def train_stage(p: Prepared, work: Path, logs=None, features: list[dict] | None = None,
                callbacks: tuple = ()) -> tuple[torch.nn.Module, dict, str]:
    """Fine-tuning with the recipe's method (resuming from a checkpoint when one exists); writes adapter/ and
    train/summary.json. `features`: the tokenized training rows when the caller has them (a sweep caches them
    across trials)."""
    from tasktune.train import wrap_for_training

    cfg = p.recipe.train
    head = objective_head(cfg.objective)
    base = base_for_training(p, head)
    base_count = count_parameters(base)["total"]
    if features is None:
        features = training_features(p)
    torch.manual_seed(cfg.seed)  # LoRA initialisation
    model = wrap_for_training(base, cfg, cfg.objective, work / "train")
    try:
        return _train_adapted(p, work, logs, features, callbacks, model, head, base_count)
    except BaseException:
        release_base(p, model)
        raise


def _train_adapted(p: Prepared, work: Path, logs, features: list[dict], callbacks: tuple, model, head: str,
                   base_count: int) -> tuple[torch.nn.Module, dict, str]:
    from tasktune import evaluation
    from tasktune.train import ValidationRecords, fit

    cfg = p.recipe.train
    params = count_parameters(model)
    val_features = features[:1]  # the Trainer wants an eval set; validation runs through `validate`
    validations = ValidationRecords()

    def validate(m):  # each process runs the whole validation slice (the Trainer evaluates on every process)
        from tasktune.runner import Runner

        runner = Runner(m, p.lm.tokenizer, p.recipe.eval.batch_size, shard=False)
        validations.latest = evaluation.validation_records(p.task, runner, p.builder, p.examples["validation"], head)
        return p.task.validation_metrics(validations.latest)

    method = get_method(cfg.method)
    summary = fit(model, p.lm.tokenizer, features, val_features, cfg, work / "train", cfg.objective, validate,
                  p.task.metric_for_best, p.label_token_ids, logs=logs,
                  callbacks=[StepMemory(p.memory), validations, *callbacks],
                  autocast=p.lm.dtype if method.master_dtype and p.lm.dtype != torch.float32 else None)
    if method.master_dtype:  # evaluated, analysed and saved in the run's dtype, as the zero-shot base was
        model = model.to(p.lm.dtype)
    summary.pop("log_history")
    # The best checkpoint's validation figure from its own pass, where that pass saw the model as it now is
    # (the Trainer reloaded that checkpoint's weights); not for a model cast after training (full) or
    # evaluated as saved (QLoRA, PiSSA), nor for a checkpoint validated before a resume.
    records = validations.of_checkpoint(summary.get("best_checkpoint"))
    summary["best_validation"] = (evaluation.validation_figure(p.task, records, head)
                                  if records is not None and not method.master_dtype
                                  and not method.evaluate_as_saved else None)
    # What was trained on: QLoRA's 4-bit linear layers are counted, so that a silent fall-back to 16 bits shows.
    quantized = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    # Training rows, which are not the training examples where several questions share a row.
    summary.update(parameters=params, base_parameters_before_lora=base_count, head=head,
                   quantized_linear_layers=quantized, training_rows=len(features), device=device_of(model))
    state = process_state()
    if state.is_main_process:
        method.save(model, RunLayout(work).adapter, work / "train", head)
        write_json(RunLayout(work).summary, summary)
    state.wait_for_everyone()
    if method.evaluate_as_saved:
        # Evaluated as it is exported: QLoRA's adapter on the dequantized 4-bit base; PiSSA's converted adapter
        # on the original base (checks the conversion, and the merged model is the same either way).
        del model
        model, _, head = load_trained(p, work)
    return model, summary, head


def release_base(p: Prepared, model) -> None:
    """Take the adapter off the run's loaded base when `model` wraps it, so that a sweep trains on it again
    (methods with a base of their own, and classification heads, leave it untouched)."""
    if hasattr(model, "unload") and unwrap(model) is p.lm.model:
        model.unload()


def objective_head(objective: str) -> str:
    from tasktune.losses import get_objective

    return get_objective(objective).head


def base_for_training(p: Prepared, head: str) -> torch.nn.Module:
    """The loaded base (a causal-LM head), or a base of its own: with a fresh classification head, in 4 bits
    for QLoRA (prepared as peft prescribes: norms and head in fp32, inputs requiring grad), rewritten by the
    method (PiSSA), or in fp32 master weights (full)."""
    method = get_method(p.recipe.train.method)
    quantization = method.quantization
    if head == "seqcls" or method.own_base:
        labels = p.task.seqcls_labels()
        model = load_model(p.recipe.model, method.master_dtype or p.recipe.dtype, head=head, num_labels=labels,
                           trust_remote_code=p.recipe.trust_remote_code, quantization=quantization).model
        if quantization:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=p.recipe.train.gradient_checkpointing)
        return model
    return p.lm.model


def load_trained(p: Prepared, work: Path) -> tuple[torch.nn.Module, dict, str]:
    """The train stage's results when it already finished in an earlier (interrupted) invocation."""
    layout = RunLayout(work)
    summary = json.loads(layout.summary.read_text())
    adapted = load_adapted_model(layout.adapter, p.recipe.model, p.recipe.dtype,
                                 num_labels=p.task.seqcls_labels(),
                                 base=p.lm.model, trust_remote_code=p.recipe.trust_remote_code)
    return adapted.model, summary, adapted.head


def data_fingerprint(source: str) -> dict:
    """sha256 of every local data file the run read, of its content (decompressed, for the embedded .gz
    files, so it matches the published file's hash); hub datasets are named, not hashed."""
    from tasktune.data import content_sha256

    return {path: content_sha256(Path(path)) for path in source.split(", ") if Path(path).is_file()}


def run_fingerprint(p: Prepared) -> dict:
    """What a run is made from: its data, its model and its task spec (a resumed run must match all three)."""
    return {"data_sha256": data_fingerprint(p.sources), "model": model_identity(p.lm),
            "task_sha256": p.task.spec.sha256}


def check_fingerprint(folder: Path, fingerprint: dict, what: str) -> None:
    """Refuse to continue (or call complete) a run made from other data or another model than this one's."""
    path = RunLayout(folder).fingerprint
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    for key, label in (("data_sha256", "data"), ("model", "model"), ("task_sha256", "task spec")):
        if saved.get(key) != fingerprint[key]:
            raise TasktuneError(
                f"{folder} was made from different {label} than this command reads ({label} now: "
                f"{fingerprint[key]}; in the run: {saved.get(key)}): mixing them would report figures of one "
                f"{label} next to training on another; {what}")


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
    """split → zero-shot → train → params → fine-tuned → report."""
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


def evaluate_run(run_dir: Path, out: Path, data_path: str | None = None, overwrite: bool = False) -> tuple[dict, str]:
    """`tasktune eval --run RUN_DIR`: the run's adapter, evaluated with the run's own resolved recipe (prompt,
    verbalizers, shots, prompt budget, seeds, split), so "same protocol" holds outside `run` as well. Without
    `data_path` it evaluates the run's own test split (reproducing finetuned/metrics.json); with it, every row
    of that file."""
    from tasktune.config import load_recipe
    from tasktune.rundir import StagingDir, require_finished_run

    from tasktune.ownership import check_outside

    run_dir = require_finished_run(Path(run_dir), trained=True)
    check_outside(Path(out), {"run": run_dir, "data": data_path})
    staging = StagingDir(Path(out), overwrite=overwrite)  # refuse a bad --out before loading anything
    # The task as the run recorded it, wherever the user's spec file is now.
    recipe = load_recipe(str(RunLayout(run_dir).recipe), [f"task={run_dir / 'task.yaml'}"])
    p = prepare(recipe)
    check_fingerprint(run_dir, run_fingerprint(p),
                      "the run's test split cannot be rebuilt from it; evaluate the run where it was made")
    if data_path:
        rows, source = p.task.load(data_path)
        p.examples["test"] = rows
        p.source = source
    model, _, head = load_trained(p, run_dir)
    with staging as work:
        metrics = evaluate_stage(p, merge_for_inference(model), work, head=head,
                                 protocol={"run": str(run_dir), "data": p.source,
                                           "rows": "all" if data_path else "test split"})
    return metrics, p.task.summary(metrics)


def evaluate_model(recipe: Recipe, out: Path, adapter: str | None = None, rows: str = "test",
                   overwrite: bool = False) -> tuple[dict, str]:
    """`tasktune eval --task --model` and `tasktune.evaluate`: the same stages as `run` (prepare, then the
    evaluation stage with the recipe's protocol), for a base model or a base model with a LoRA adapter.

    `rows="test"`: the test part of the recipe's split (a task with a decision threshold chooses it on the
    validation slice, as `run` does); `rows="all"`: every row of the data file (no validation slice, so the raw
    decision only; in-context examples come from rows not evaluated)."""
    from tasktune.ownership import check_outside
    from tasktune.rundir import StagingDir

    check_outside(Path(out), {"model": recipe.model, "adapter": adapter, "data": recipe.data.path,
                              "test data": recipe.data.test_path, "task spec": recipe.task})
    staging = StagingDir(Path(out), overwrite=overwrite)  # refuse a bad --out before loading anything
    head = adapter_head(Path(adapter)) if adapter else "causal_lm"
    p = prepare(recipe, training=False)
    if rows == "all":
        everything = p.rows
        p.examples["test"] = sample(everything, recipe.data.limit_test, recipe.data.seed)
        p.examples["validation"] = []
        evaluated = {ex["id"] for ex in p.examples["test"]}
        p.builder = PromptBuilder(p.task, p.lm.tokenizer, recipe.eval.prompt_format, recipe.eval.shots,
                                  shot_pool=[r for r in everything if r["id"] not in evaluated],
                                  seed=recipe.data.seed)
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
