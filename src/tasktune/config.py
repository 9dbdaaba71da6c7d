"""Typed recipes: a YAML file plus `section.key=value` overrides, validated before anything runs."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from tasktune.errors import TasktuneError
from tasktune.methods import METHODS
from tasktune.typed_yaml import build_dataclass, read_yaml_mapping, yaml_error_line  # noqa: F401

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def opt(default=None, help: str = "", factory=None, required: bool = False):
    """A recipe key: its default and what it means (docs/recipe-reference.md is generated from these)."""
    metadata = {"help": help, "required": required}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    path: str | None = opt(None, "data file or directory, or `hub:ID[:CONFIG]`; unset: $TASKTUNE_DATA_DIR/<task>/, "
                                 "then the copy embedded in the package, then the task's hub dataset")
    seed: int = opt(42, "seed of the split and of every sampled subset")
    test_size: float = opt(0.2, "share of the rows held out as the test set")
    val_size: int = opt(500, "rows of the training part held out as the validation slice (early stopping, and "
                             "extractive QA's abstention threshold)")
    split_by: str | None = opt(None, "unset: the task's leak-free default. Classification: `sentence` (no test row "
                                     "inside a training row) or `row`; extractive QA: `article` or `question`")
    test_path: str | None = opt(None, "evaluate on this file instead of a split of `path` (e.g. GLUE validation)")
    limit_train: int | None = opt(None, "train on a seeded random sample of this many training rows")
    train_sentences: float | None = opt(None, "share of the training sample (data.limit_train) taken from whole "
                                              "sentences, the rest from phrases (a sentence-split classification "
                                              "file such as SST-2's); unset: a uniform sample")
    limit_validation: int | None = opt(None, "validate on a seeded sample of this many validation rows (whole "
                                             "sentences first, as data.limit_test): with a larger data.val_size, a "
                                             "validation figure that measures what the headline measures")
    limit_test: int | None = opt(None, "evaluate on a seeded random sample of this many test rows (a classification "
                                       "test split of whole sentences and phrases takes every whole sentence first: "
                                       "they are the headline)")


@dataclass
class EvalConfig:
    protocols: list[str] = opt(help="classification protocols: `score` (log-likelihood of each label's "
                                    "verbalizer) and/or `generate` (greedy, parsed); extractive QA always generates",
                               factory=lambda: ["score", "generate"])
    batch_size: int = opt(32, "rows per evaluation batch")
    limit_generate: int | None = opt(None, "cap on test rows for the slower `generate` protocol (seeded sample)")
    prompt_format: str = opt("plain", "`plain` (the template as text), `chat` (the tokenizer's chat template) or "
                                      "`auto` (chat when the tokenizer has one)")
    shots: int = opt(0, "in-context examples from the training part, drawn once with the seed")
    max_prompt_tokens: int = opt(512, "extractive QA: longer contexts are cut around the answer region (counted "
                                      "in `truncated_prompts`)")
    perplexity: str | None = opt(None, "what the adaptation cost on general text: `embedded` (held-out Wikipedia "
                                       "paragraphs the run does not read) or a text file (documents separated by "
                                       "blank lines); perplexity of base and adapted model, paired")
    perplexity_docs: int = opt(200, "documents for eval.perplexity (a seeded sample)")
    controls: list[str] = opt(help="other tasks (shipped names or spec paths) evaluated on the base and the adapted "
                                   "model with their own protocol: what the adaptation cost there",
                              factory=list)
    control_rows: int = opt(200, "rows per control task (a seeded sample, never the run's training rows)")
    verbalizers: list[str] | None = opt(None, "classification: one word per label, replacing the task spec's "
                                              "(e.g. `[\" bad\", \" good\"]`)")


@dataclass
class TrainConfig:
    objective: str | None = opt(None, "the loss (docs/protocols.md, section Training objectives); unset: the task "
                                      "type's default (classification `verbalizer`, extractive QA `answer`)")
    method: str = opt("lora", "adaptation method, one of the registry's (tasktune/methods.py): " + "; ".join(
        f"`{m.name}`: {m.description}" for m in METHODS.values()))
    lora_r: int = opt(16, "LoRA rank r of each adapter")
    lora_alpha: int = opt(32, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    target_modules: list[str] = opt(help="the linear layers that get LoRA adapters",
                                    factory=lambda: list(ALL_PROJECTIONS))
    learning_rate: float = opt(2e-4, "AdamW peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    batch_size: int = opt(16, "rows per device per step")
    grad_accum: int = opt(1, "gradient accumulation steps (global batch = batch_size x grad_accum x devices)")
    epochs: float = opt(1.0, "passes over the training rows (max_steps, when set, wins)")
    max_steps: int | None = opt(None, "stop after this many optimizer steps")
    warmup_ratio: float = opt(0.03, "share of the steps with a linearly rising learning rate")
    lr_scheduler: str = opt("cosine", "learning-rate schedule after warm-up")
    eval_steps: int = opt(100, "validate (and checkpoint) every this many steps")
    patience: int = opt(2, "early stopping: validations without improvement before stopping")
    keep_checkpoints: int | None = opt(3, "checkpoints kept on disk besides the best one (older ones are deleted); "
                                          "null keeps every one")
    logging_steps: int = opt(10, "log the training loss every this many steps")
    seed: int = opt(42, "seed of LoRA initialisation, shuffling and dropout")
    group_by_length: bool = opt(True, "batches of rows of similar length (less padding)")
    shuffle: bool = opt(True, "false: rows in file order (to compare several processes with one)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward: much less memory, ~30% slower")
    compile: bool = opt(False, "compile each decoder layer with torch.compile for the training steps (validation "
                               "and evaluation stay eager); bench/RESULTS.md has what it bought on each CPU")
    max_length: int = opt(256, "longest training row in tokens (prompts are cut from the start)")
    questions_per_context: int = opt(1, "extractive QA: up to this many training questions about one context in "
                                        "one training row, the context read once and every answer trained on "
                                        "(the first question reads as evaluated, the later ones follow the earlier "
                                        "answers); 1: a row per question")
    pad_to_multiple_of: int = opt(1, "round each training batch's length up to a multiple of this: fewer distinct "
                                     "shapes, so fewer compiled CPU kernels held in memory (the SQuAD CPU recipe "
                                     "uses 32)")
    report_to: list[str] = opt(help="experiment loggers for the Trainer: `none`, or any of tensorboard, wandb, "
                                    "mlflow, trackio, ... (each needs its extra, e.g. `pip install "
                                    "\"tasktune[tensorboard]\"`); TensorBoard writes to train/tensorboard/",
                               factory=lambda: ["none"])


@dataclass
class ExportConfig:
    gguf: list[str] = opt(help="GGUF files the run writes at its end (f16, bf16, q8_0, q4_k_m: the adaptation "
                               "merged; adapter: llama.cpp's LoRA adapter for the base GGUF), each run by llama.cpp "
                               "on the test split and paired with the adapter (`shipped/`, the report's \"Shipped "
                               "as\" table); needs a GGUF base and tasktune[llama-cpp]", factory=list)


@dataclass
class Recipe:
    name: str = opt(None, "the run directory's name (runs/<name>/): letters, digits, '.', '_', '-'; a recipe "
                          "file's name by default", required=True)
    task: str = opt("", "a shipped task (`tasktune tasks`) or the path of a task spec YAML")
    model: str = opt("gemma3-270m", "hub id, local directory, .gguf file or alias (gemma3-270m, llama3.2-1b, "
                                    "gemma2-2b)")
    dtype: str = opt("auto", "weights' dtype: `auto` (bf16 on CUDA compute capability >= 8.0 and on CPUs with "
                             "AVX512-BF16/AMX; fp16 with a gradient scaler on older CUDA cards such as the T4; fp32 "
                             "elsewhere), or bf16, fp16, fp32")
    trust_remote_code: bool = opt(False, "run a hub model's own Python code: only for models you trust")
    output_dir: str = opt("runs", "where run directories go")
    gpu_memory_gib: float | None = opt(None, "GPU memory this shipped recipe's training needs on one device as "
                                             "measured by bench/gpu_memory.py (live tensors + 2 GiB for CUDA): "
                                             "`run --task --model` picks the most demanding recipe that fits the "
                                             "card; the fit check itself estimates the recipe as given")
    gpu_memory_check: bool = opt(True, "on a CUDA machine, estimate the training's GPU memory from the recipe as "
                                       "given (after overrides: method, batch, length, checkpointing, dtype) and "
                                       "stop before loading when it cannot fit; false: no check")
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


POSITIVE = {"gpu_memory_gib", "keep_checkpoints", "perplexity_docs", "control_rows", "val_size", "batch_size", "lora_r", "lora_alpha", "grad_accum", "eval_steps", "logging_steps",
            "max_length", "max_prompt_tokens", "pad_to_multiple_of", "questions_per_context", "limit_train", "limit_test", "limit_generate", "max_steps",
            "learning_rate", "epochs", "limit_validation"}
NON_NEGATIVE = {"patience", "shots", "weight_decay", "seed"}
AT_LEAST = {"max_length": 16, "max_prompt_tokens": 16}
UNIT_INTERVAL = {"test_size": (0.0, 1.0), "lora_dropout": (0.0, 1.0), "warmup_ratio": (0.0, 1.0)}
CLOSED_UNIT_INTERVAL = {"train_sentences"}
CHOICES = {"prompt_format": ("plain", "chat", "auto"),
           "lr_scheduler": ("linear", "cosine", "constant", "constant_with_warmup"),
           "dtype": ("auto", "bf16", "bfloat16", "fp32", "float32", "fp16", "float16")}
PROTOCOLS = ("score", "generate")


def validate(recipe: Recipe, source: str) -> Recipe:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", recipe.name or ""):
        raise TasktuneError(f"{source}: name {recipe.name!r} must be a plain directory name "
                            "(letters, digits, '.', '_', '-'; no slashes)")
    for prefix, section in (("", recipe), ("data.", recipe.data), ("eval.", recipe.eval), ("train.", recipe.train)):
        for f in fields(section):
            value, key = getattr(section, f.name), prefix + f.name  # the key as the user writes it
            if value is None or isinstance(value, bool) or dataclasses.is_dataclass(value):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise TasktuneError(f"{source}: {key} must be a finite number, got {value}")
            if f.name in AT_LEAST and value < AT_LEAST[f.name]:
                raise TasktuneError(f"{source}: {key} must be >= {AT_LEAST[f.name]} (a prompt and its answer "
                                    f"must fit), got {value}")
            if f.name in POSITIVE and value <= 0:
                raise TasktuneError(f"{source}: {key} must be > 0, got {value}")
            if f.name in NON_NEGATIVE and value < 0:
                raise TasktuneError(f"{source}: {key} must be >= 0, got {value}")
            if f.name in UNIT_INTERVAL:
                low, high = UNIT_INTERVAL[f.name]
                if not low <= value < high or (f.name == "test_size" and value == 0):
                    raise TasktuneError(f"{source}: {key} must be in [{low}, {high}), got {value}")
            if f.name in CLOSED_UNIT_INTERVAL and not 0.0 <= value <= 1.0:
                raise TasktuneError(f"{source}: {key} must be in [0, 1], got {value}")
            if f.name in CHOICES and value not in CHOICES[f.name]:
                raise TasktuneError(f"{source}: {key} {value!r} is not one of {list(CHOICES[f.name])}")
    bad = [p for p in recipe.eval.protocols if p not in PROTOCOLS]
    if bad or not recipe.eval.protocols:
        raise TasktuneError(f"{source}: eval.protocols {recipe.eval.protocols} must be a non-empty subset "
                            f"of {list(PROTOCOLS)}")
    check_loggers(recipe.train.report_to, source)
    if recipe.train.method not in METHODS:
        raise TasktuneError(f"{source}: train.method {recipe.train.method!r} is not one of {sorted(METHODS)}")
    refused = METHODS[recipe.train.method].refuses.get(recipe.train.objective)
    if refused:
        raise TasktuneError(f"{source}: train.method {recipe.train.method} with train.objective "
                            f"{recipe.train.objective}: {refused}")
    if METHODS[recipe.train.method].quantization:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise TasktuneError(f'{source}: train.method {recipe.train.method} needs bitsandbytes: pip install '
                                '"tasktune[qlora]" (its wheel has a CPU backend as well as CUDA)')
    for key in ("path", "test_path"):
        value = getattr(recipe.data, key)
        if isinstance(value, str) and not value.strip():
            raise TasktuneError(f"{source}: data.{key} is empty; expected a file, a directory or hub:NAME (null, or "
                                "no key, for the task's default data)")
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise TasktuneError(f"{source}: output_dir {recipe.output_dir!r} is a file; expected a directory for runs")
    if not recipe.train.target_modules:
        raise TasktuneError(f"{source}: train.target_modules must name at least one module")
    if not recipe.task:
        raise TasktuneError(f"{source}: a recipe needs a task (a shipped task such as those `tasktune tasks` lists, "
                            "or the path of a task spec YAML)")
    from tasktune.losses import objectives_for
    from tasktune.tasks.base import task_type
    from tasktune.tasks.spec import check_verbalizers, load_spec

    spec = load_spec(recipe.task)  # a malformed spec fails here, before any model is loaded
    kind = task_type(spec.type, spec.source)
    verbalizers = recipe.eval.verbalizers
    if verbalizers is not None:
        if not kind.takes_verbalizers or len(verbalizers) != len(spec.labels):
            raise TasktuneError(f"{source}: eval.verbalizers {verbalizers} must give one word per label of task "
                                f"{spec.name!r} ({[label.name for label in spec.labels]}, in that order)")
        check_verbalizers(verbalizers, f"{source}: eval.verbalizers")
    if recipe.data.split_by is not None and recipe.data.split_by not in kind.split_policies:
        raise TasktuneError(f"{source}: data.split_by {recipe.data.split_by!r} does not apply to task "
                            f"{spec.name!r} (expected one of {list(kind.split_policies)})")
    split_by = kind.split_policy_of(spec, recipe.data)
    if recipe.data.train_sentences is not None and split_by != "sentence":
        raise TasktuneError(f"{source}: data.train_sentences needs rows split as whole sentences and phrases "
                            f"(data.split_by: sentence, a classification task); task {spec.name!r} splits by "
                            f"{split_by!r}")
    if recipe.train.questions_per_context > 1:
        if not kind.packs_questions:
            raise TasktuneError(f"{source}: train.questions_per_context applies to extractive QA; task "
                                f"{spec.name!r} is {spec.type}")
        if recipe.eval.prompt_format == "chat":
            raise TasktuneError(f"{source}: train.questions_per_context > 1 needs eval.prompt_format plain (a chat "
                                "template wraps one question per turn)")
        try:
            kind.follow_up_template(spec.template)
        except TasktuneError as e:
            raise TasktuneError(f"{source}: {e}") from None
    for control in recipe.eval.controls:  # a malformed control spec fails now, too
        load_spec(control)
    ppl = recipe.eval.perplexity
    if ppl is not None and ppl != "embedded" and not Path(ppl).is_file():
        raise TasktuneError(f"{source}: eval.perplexity {ppl!r} is neither `embedded` nor an existing text file")
    # An unset objective is chosen once the tokenizer shows what the verbalizers allow (stages.prepare).
    allowed = objectives_for(spec.type)
    if recipe.train.objective is not None and recipe.train.objective not in allowed:
        raise TasktuneError(f"{source}: objective {recipe.train.objective!r} does not apply to task "
                            f"{spec.name!r} (expected one of {allowed})")
    check_export(recipe, source)
    return recipe


def check_export(recipe: Recipe, source: str) -> None:
    """export.gguf: each type once, each one the run can write and measure (the objective chosen later is
    checked again once known: `pipeline`)."""
    from tasktune.gguf_export import check_export as check_gguf_export

    types = recipe.export.gguf
    if len(set(types)) < len(types):
        raise TasktuneError(f"{source}: export.gguf {types} names a type twice")
    for gguf_type in types:
        try:
            check_gguf_export(gguf_type, head="seqcls" if recipe.train.objective == "seqcls" else "causal_lm",
                              method=METHODS[recipe.train.method], base_model=recipe.model, evaluate=True)
        except TasktuneError as e:
            raise TasktuneError(f"{source}: export.gguf: {e}") from None


# Loggers the Trainer knows (transformers' INTEGRATION_TO_CALLBACK), and the module each one needs.
LOGGERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio",
           "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
           "neptune": "neptune", "azure_ml": "azureml", "codecarbon": "codecarbon", "dagshub": "dagshub",
           "flyte": "flytekit", "kubeflow": "kubeflow"}


def check_loggers(report_to: list[str], source: str) -> None:
    """`none` alone, or loggers that exist and are installed: a missing one fails now, not after zero-shot."""
    import importlib.util

    if report_to == ["none"] or not report_to:
        return
    for name in report_to:
        if name not in LOGGERS:
            raise TasktuneError(f"{source}: train.report_to {name!r} is not one of {['none', *LOGGERS]}")
        if importlib.util.find_spec(LOGGERS[name]) is None:
            extra = f'pip install "tasktune[{name}]"' if name in ("tensorboard", "wandb", "mlflow") else \
                f"pip install {LOGGERS[name]}"
            raise TasktuneError(f"{source}: train.report_to names {name!r}, which is not installed: {extra}")


def parse_overrides(overrides: list[str]) -> dict:
    """`train.lr=1e-4 data.path=x.tsv` → nested dict, values parsed as YAML scalars."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise TasktuneError(f"override {item!r} must look like key=value (e.g. train.learning_rate=1e-4)")
        key, raw = item.split("=", 1)
        if not raw.strip():  # an unset shell variable (`data.path=$DATA`) must not quietly mean "the default"
            raise TasktuneError(f"override {item!r} has no value (an unset shell variable?): give one, or "
                                f"{key.strip()}=null to unset the key")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def merge_mappings(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_mappings(out[key], value)
        else:
            out[key] = value
    return out


def load_recipe(path: str | None, overrides: list[str] = (), defaults: dict | None = None,
                settings: dict | None = None) -> Recipe:
    """The recipe: `defaults` < the file (a path or a shipped recipe's name) < `settings` (typed, nested, from
    Python) < `overrides` (`key=value` strings from the command line)."""
    data: dict = dict(defaults or {})
    source = "command line"
    if path:
        p = Path(path)
        if not p.is_file():
            from tasktune import recipes

            shipped = recipes.find(path) if not p.suffix or p.name == path else None
            if shipped is None:
                raise TasktuneError(f"recipe {p} does not exist (and is not a shipped recipe: "
                                    f"{sorted(n for n in recipes.shipped() if '/' not in n)})")
            p = shipped
        source = str(p)
        data = merge_mappings(data, read_yaml_mapping(p, "recipe"))
        data.setdefault("name", p.stem)
    data = merge_mappings(data, settings or {})
    data = merge_mappings(data, parse_overrides(list(overrides)))
    if "name" not in data:
        raise TasktuneError(f"{source}: a recipe needs a name")
    return validate(build_dataclass(Recipe, data, "", source), source)
