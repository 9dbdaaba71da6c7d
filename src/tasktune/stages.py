"""The stages every command is made of, as one public API that `run`, `sweep` and `eval` call:

    p = prepare(recipe)                       # data, split, task, model, prompt, adaptation: checked, nothing written
    v = variant(p, other_recipe)              # a sweep's trial: the same split and model, its own recipe
    model, summary, head = train_stage(v, work)
    figure = validate_stage(v, model, head)   # the validation slice: what a sweep chooses on
    metrics = evaluate_stage(v, model, out)   # the test split: once per reported model
    release_base(v, model)                    # the shared base, clean for the next variant

`Prepared` carries what a variant is trained and measured with, the resolved method and objective among it
(`adaptation.Adaptation`), so no stage looks them up again. The directory a stage writes into is the caller's
(`pipeline` for a run, `sweeper` for a sweep's trials and final test).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tasktune.adaptation import Adaptation
from tasktune.config import Recipe
from tasktune.costs import held_out_documents
from tasktune.data.sampling import sample
from tasktune.device import describe as device_of, process_state
from tasktune.errors import TasktuneError
from tasktune.infer import unwrap
from tasktune.memory import MemoryLog, StepMemory
from tasktune.models import LoadedModel, count_parameters, load_adapted_model, load_model, model_identity
from tasktune.rundir import write_json, write_jsonl
from tasktune.run_layout import RunLayout
from tasktune.tasks import PromptBuilder, get_task
from tasktune.tasks.base import TaskType


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
    adaptation: Adaptation
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


# --- prepare ------------------------------------------------------------------------------------------------------

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
    adaptation = Adaptation.resolve(recipe, task, label_ids, training)
    check_prompt_lengths(recipe, task, builder, lm, examples, source if not test_source else
                         f"{source} or {test_source}", training)
    return Prepared(recipe=recipe, task=task, source=source, split=split, examples=examples, lm=lm, builder=builder,
                    label_token_ids=label_ids, adaptation=adaptation, overlap=overlap, test_source=test_source,
                    timings=timings, started=started, memory=memory, rows=rows, documents=documents)


def variant(p: Prepared, recipe: Recipe) -> Prepared:
    """`p` with another recipe (a sweep's trial): task, prompt builder, training sample and adaptation rebuilt
    from it (shots, verbalizers, prompt budget, method, objective, data.limit_train and data.train_sentences
    may differ); split, validation and test rows and the loaded model are shared."""
    task = get_task(recipe.task, recipe.eval.verbalizers, recipe.eval.max_prompt_tokens)
    by_id = {r["id"]: r for r in p.rows}
    train = task.training_sample([by_id[i] for i in p.split["train"]], recipe.data)
    builder = PromptBuilder(task, p.lm.tokenizer, recipe.eval.prompt_format, recipe.eval.shots,
                            shot_pool=train, seed=recipe.data.seed)
    label_ids = task.label_token_ids(builder, p.examples["test"][0])  # as `prepare` decides it
    adaptation = Adaptation.resolve(recipe, task, label_ids, training=True)
    return dataclasses.replace(p, recipe=recipe, task=task, builder=builder, label_token_ids=label_ids,
                               adaptation=adaptation, examples={**p.examples, "train": train})


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


def check_target_modules(model: torch.nn.Module, targets: list[str]) -> None:
    """Every train.target_modules name must be a linear layer of this model: fail here, before the run
    directory exists, rather than in peft after the zero-shot evaluation."""
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear)})
    missing = [t for t in targets if t not in linear]
    if missing:
        raise TasktuneError(f"train.target_modules {missing} are not linear layers of this model (expected some "
                            f"of {linear})")


# --- fingerprints: what a run or a sweep is made from --------------------------------------------------------------

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


# --- train ---------------------------------------------------------------------------------------------------------

def training_features(p: Prepared) -> list[dict]:
    """The tokenized training rows of a prepared run, as its recipe's train keys make them."""
    cfg = p.recipe.train
    return p.task.train_features(p.builder, p.examples["train"], p.adaptation.objective, cfg.max_length,
                                 p.label_token_ids, cfg.questions_per_context)


def train_stage(p: Prepared, work: Path, logs=None, features: list[dict] | None = None,
                callbacks: tuple = ()) -> tuple[torch.nn.Module, dict, str]:
    """Fine-tuning with the prepared adaptation (resuming from a checkpoint when one exists); writes adapter/
    and train/summary.json into `work`. `features`: the tokenized training rows when the caller has them (a
    sweep caches them across trials)."""
    cfg, adaptation = p.recipe.train, p.adaptation
    base = base_for_training(p)
    base_count = count_parameters(base)["total"]
    if features is None:
        features = training_features(p)
    torch.manual_seed(cfg.seed)  # LoRA initialisation
    model = adaptation.method.wrap(base, cfg, adaptation.head == "seqcls", work / "train")
    try:
        return _train_adapted(p, work, logs, features, callbacks, model, base_count)
    except BaseException:
        release_base(p, model)
        raise


def _train_adapted(p: Prepared, work: Path, logs, features: list[dict], callbacks: tuple, model,
                   base_count: int) -> tuple[torch.nn.Module, dict, str]:
    from tasktune import evaluation
    from tasktune.train import ValidationRecords, fit

    cfg, method, head = p.recipe.train, p.adaptation.method, p.adaptation.head
    params = count_parameters(model)
    val_features = features[:1]  # the Trainer wants an eval set; validation runs through `validate`
    validations = ValidationRecords()

    def validate(m):  # each process runs the whole validation slice (the Trainer evaluates on every process)
        validations.latest = validation_records(p, m, head)
        return p.task.validation_metrics(validations.latest)

    summary = fit(model, p.lm.tokenizer, features, val_features, cfg, work / "train", p.adaptation.objective,
                  validate, p.task.metric_for_best, p.label_token_ids, logs=logs,
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


def base_for_training(p: Prepared) -> torch.nn.Module:
    """The loaded base (a causal-LM head), or a base of its own: with a fresh classification head, in 4 bits
    for QLoRA (prepared as peft prescribes: norms and head in fp32, inputs requiring grad), rewritten by the
    method (PiSSA), or in fp32 master weights (full)."""
    method, head = p.adaptation.method, p.adaptation.head
    quantization = method.quantization
    if head == "seqcls" or method.own_base:
        model = load_model(p.recipe.model, method.master_dtype or p.recipe.dtype, head=head,
                           num_labels=p.task.seqcls_labels(), trust_remote_code=p.recipe.trust_remote_code,
                           quantization=quantization).model
        if quantization:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=p.recipe.train.gradient_checkpointing)
        return model
    return p.lm.model


def release_base(p: Prepared, model) -> None:
    """Take the adapter off the run's loaded base when `model` wraps it, so that a sweep trains on it again
    (methods with a base of their own, and classification heads, leave it untouched)."""
    if hasattr(model, "unload") and unwrap(model) is p.lm.model:
        model.unload()


def load_trained(p: Prepared, work: Path) -> tuple[torch.nn.Module, dict, str]:
    """The train stage's results as it left them in `work` (an interrupted run's, a sweep trial's)."""
    layout = RunLayout(work)
    summary = json.loads(layout.summary.read_text())
    adapted = load_adapted_model(layout.adapter, p.recipe.model, p.recipe.dtype,
                                 num_labels=p.task.seqcls_labels(),
                                 base=p.lm.model, trust_remote_code=p.recipe.trust_remote_code)
    return adapted.model, summary, adapted.head


# --- validate and evaluate -----------------------------------------------------------------------------------------

def validation_records(p: Prepared, model, head: str) -> list[dict]:
    """The validation slice's prediction records, under the task's validation protocol. Every process runs the
    whole slice (the Trainer validates on every process of a launch)."""
    from tasktune import evaluation
    from tasktune.runner import Runner

    runner = Runner(model, p.lm.tokenizer, p.recipe.eval.batch_size, shard=False)
    return evaluation.validation_records(p.task, runner, p.builder, p.examples["validation"], head)


def validate_stage(p: Prepared, model, head: str) -> dict:
    """The model's figure on the validation slice, with its 95% interval and n (the task's own metric): what a
    sweep ranks its trials on."""
    from tasktune import evaluation

    return evaluation.validation_figure(p.task, validation_records(p, model.eval(), head), head)


def evaluate_stage(p: Prepared, model, out_dir: Path, head: str = "causal_lm", protocol: dict | None = None,
                   runner=None) -> dict:
    """Evaluate the test split with the run's protocol (and its threshold chosen on the validation slice), with
    the costs the recipe asks for; writes metrics.json and predictions.jsonl into `out_dir`.
    Under `accelerate launch`/`torchrun` the runner shards the requests across processes and gathers the
    results, so every process computes the same metrics; only the main process writes. `runner`: another
    `runner.RequestRunner` (llama.cpp on a GGUF file, `model` None: no cost checks, which need the PyTorch model)."""
    from tasktune import evaluation
    from tasktune.costs import measure
    from tasktune.runner import Runner

    cfg = p.recipe.eval
    state = process_state()
    test = p.examples["test"]
    generate_ids = {ex["id"] for ex in sample(test, cfg.limit_generate, p.recipe.data.seed)}
    start = time.perf_counter()
    runner = runner or Runner(model, p.lm.tokenizer, cfg.batch_size)
    metrics, records = evaluation.evaluate(p.task, runner, p.builder, test, cfg.protocols, head, generate_ids,
                                           validation=p.examples["validation"])
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    metrics["processes"] = state.num_processes
    # where this stage computed (the GPU session checks it)
    metrics["device"] = device_of(model) if model is not None else "cpu (llama.cpp)"
    if state.is_main_process:
        start = time.perf_counter()
        cost = measure(p, model, out_dir, head) if model is not None else {}  # perplexity, controls
        if cost:
            metrics["cost"] = {**cost, "seconds": round(time.perf_counter() - start, 3)}
        write_json(RunLayout.metrics(out_dir), {**metrics, **({"protocol": protocol} if protocol else {})})
        write_jsonl(RunLayout.predictions(out_dir), records)
    return metrics


def prepare_finished_run(run_dir: Path) -> Prepared:
    """A finished run's recipe prepared again (the task as the run recorded it, wherever the user's spec file is
    now), checked to rebuild the run's split: what re-evaluating the run or its exports starts from."""
    from tasktune.config import load_recipe

    recipe = load_recipe(str(RunLayout(run_dir).recipe), [f"task={run_dir / 'task.yaml'}"])
    p = prepare(recipe)
    check_fingerprint(run_dir, run_fingerprint(p),
                      "the run's test split cannot be rebuilt from it; evaluate the run where it was made")
    return p


def evaluate_gguf_stage(p: Prepared, out_dir: Path, model: str | Path, adapter: str | Path | None, protocol: dict,
                        against: Path | None = None) -> dict:
    """The evaluation stage through llama.cpp on a GGUF file (and a GGUF LoRA adapter): the same requests, the
    prompts' token ids checked against llama.cpp's own tokenizer, and with `against` (a finished run) each test
    row's prediction compared with the run's fine-tuned one (comparison.json, and `against_adapter`)."""
    from tasktune.llama_cpp_runtime import LlamaCppRunner, compare_with_run, load_gguf

    runner = LlamaCppRunner(load_gguf(Path(model), Path(adapter) if adapter else None, n_ctx=gguf_context(p)))
    agreement = runner.tokenizer_agreement(p.builder, p.examples["test"])
    if agreement["same_ids"] < agreement["rows"]:
        print(f"[tasktune] warning: llama.cpp's tokenizer gives other token ids than the Hugging Face tokenizer "
              f"for {agreement['rows'] - agreement['same_ids']} of {agreement['rows']} prompts (evaluated with the "
              f"Hugging Face ids; a runtime fed text would see the others): {agreement['differ'][:2]}")
    protocol = {**protocol, "runtime": "llama.cpp", "model": str(model), "adapter": str(adapter) if adapter else None,
                "tokenizer_agreement": agreement}
    metrics = evaluate_stage(p, None, out_dir, protocol=protocol, runner=runner)
    metrics["tokenizer_agreement"] = agreement
    if against is not None:
        comparison = compare_with_run(p.task, against, out_dir, [c for c, _ in p.task.report_columns(metrics)])
        write_json(out_dir / "comparison.json", comparison)
        metrics["against_adapter"] = comparison
    return metrics


def gguf_context(p: Prepared) -> int:
    """llama.cpp's context for an evaluation: the model's positions, at most 4,096 (the shipped tasks' longest
    prompt is under 600 tokens; a larger context only costs KV-cache memory)."""
    from tasktune.inference_requests import model_positions

    return min(model_positions(p.lm.model.config) or 4096, 4096)
