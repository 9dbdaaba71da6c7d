"""Typed recipes: a YAML file plus `section.key=value` overrides, validated before anything runs."""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from tasktune.errors import TasktuneError

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DataConfig:
    path: str | None = None        # file or dir; None: $TASKTUNE_DATA_DIR/<task>/ then the hub
    seed: int = 42
    test_size: float = 0.2
    val_size: int = 500            # rows of the training part held out for early stopping
    # None: the task's leak-free default. sst2: sentence (no test row inside a training row) | row (the seed's
    # protocol, which leaks phrases of test sentences into training); squad_v2: article | question (the seed's).
    split_by: str | None = None
    test_path: str | None = None   # evaluate on this file instead of a split of `path` (e.g. GLUE validation)
    limit_train: int | None = None
    limit_test: int | None = None


@dataclass
class EvalConfig:
    protocols: list[str] = field(default_factory=lambda: ["score", "generate"])
    batch_size: int = 32
    limit_generate: int | None = None  # cap on test rows for the slower generate protocol
    prompt_format: str = "plain"       # plain | chat | auto
    shots: int = 0
    max_prompt_tokens: int = 512       # SQuAD v2: longer contexts are truncated
    verbalizers: list[str] | None = None  # SST-2: [negative, positive] words; None = [" negative", " positive"]


@dataclass
class TrainConfig:
    objective: str | None = None     # None: the task type's default (classification: verbalizer; QA: answer)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    eval_steps: int = 100
    patience: int = 2
    logging_steps: int = 10
    seed: int = 42
    group_by_length: bool = True     # batches of similar length: less padding
    shuffle: bool = True             # false: file order (used to compare multi-process with single-process)
    gradient_checkpointing: bool = False
    max_length: int = 256


@dataclass
class Recipe:
    name: str
    task: str = ""                   # a shipped task (`tasktune tasks`) or the path of a task spec YAML
    model: str = "gemma3-270m"
    dtype: str = "auto"
    trust_remote_code: bool = False  # run a hub model's own Python code: only for models you trust
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


POSITIVE = {"val_size", "batch_size", "lora_r", "lora_alpha", "grad_accum", "eval_steps", "logging_steps",
            "max_length", "max_prompt_tokens", "limit_train", "limit_test", "limit_generate", "max_steps",
            "learning_rate", "epochs"}
NON_NEGATIVE = {"patience", "shots", "weight_decay", "seed"}
UNIT_INTERVAL = {"test_size": (0.0, 1.0), "lora_dropout": (0.0, 1.0), "warmup_ratio": (0.0, 1.0)}
CHOICES = {"objective": ("verbalizer", "label_lm", "lm", "seqcls", "answer"),
           "split_by": ("sentence", "row", "article", "question"), "prompt_format": ("plain", "chat", "auto"),
           "lr_scheduler": ("linear", "cosine", "constant", "constant_with_warmup"),
           "dtype": ("auto", "bf16", "bfloat16", "fp32", "float32", "fp16", "float16")}
PROTOCOLS = ("score", "generate")


def _coerce(value, annotation, key: str, source: str):
    """Convert a YAML value to the field's type, or explain what was expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())) and type(None) in args:
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise TasktuneError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, f"{key}.", source)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TasktuneError(f"{source}: {key} must be true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TasktuneError(f"{source}: {key} must be a number, got {value!r}")
        try:
            number = float(value) if annotation is float else int(value)
        except ValueError as exc:
            raise TasktuneError(f"{source}: {key} must be {annotation.__name__}, got {value!r}") from exc
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise TasktuneError(f"{source}: {key} must be an integer, got {value!r}")
        return number
    if annotation is str:
        if value is None or isinstance(value, (dict, list)):
            raise TasktuneError(f"{source}: {key} must be a string, got {value!r}")
        return str(value)
    return value


def build_dataclass(cls, data: dict, prefix: str, source: str):
    """A dataclass from a YAML mapping: unknown keys and wrong types are one-line errors naming `source`."""
    if not isinstance(data, dict):
        raise TasktuneError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise TasktuneError(f"{source}: unknown key(s) {[prefix + k for k in unknown]} "
                            f"(expected one of {sorted(prefix + k for k in known)})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, value or {}, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(value, hint, prefix + name, source)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise TasktuneError(f"{source}: {exc}") from exc


def validate(recipe: Recipe, source: str) -> Recipe:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", recipe.name or ""):
        raise TasktuneError(f"{source}: name {recipe.name!r} must be a plain directory name "
                            "(letters, digits, '.', '_', '-'; no slashes)")
    for section in (recipe, recipe.data, recipe.eval, recipe.train):
        for f in fields(section):
            value = getattr(section, f.name)
            if value is None or isinstance(value, bool) or dataclasses.is_dataclass(value):
                continue
            if f.name in POSITIVE and value <= 0:
                raise TasktuneError(f"{source}: {f.name} must be > 0, got {value}")
            if f.name in NON_NEGATIVE and value < 0:
                raise TasktuneError(f"{source}: {f.name} must be >= 0, got {value}")
            if f.name in UNIT_INTERVAL:
                low, high = UNIT_INTERVAL[f.name]
                if not low <= value < high or (f.name == "test_size" and value == 0):
                    raise TasktuneError(f"{source}: {f.name} must be in [{low}, {high}), got {value}")
            if f.name in CHOICES and value not in CHOICES[f.name]:
                raise TasktuneError(f"{source}: {f.name} {value!r} is not one of {list(CHOICES[f.name])}")
    bad = [p for p in recipe.eval.protocols if p not in PROTOCOLS]
    if bad or not recipe.eval.protocols:
        raise TasktuneError(f"{source}: eval.protocols {recipe.eval.protocols} must be a non-empty subset "
                            f"of {list(PROTOCOLS)}")
    if not recipe.train.target_modules:
        raise TasktuneError(f"{source}: train.target_modules must name at least one module")
    if not recipe.task:
        raise TasktuneError(f"{source}: a recipe needs a task (a shipped task such as those `tasktune tasks` lists, "
                            "or the path of a task spec YAML)")
    from tasktune.tasks.spec import OBJECTIVES, SPLITS, check_verbalizers, load_spec

    spec = load_spec(recipe.task)  # a malformed spec fails here, before any model is loaded
    verbalizers = recipe.eval.verbalizers
    if verbalizers is not None:
        if spec.type != "classification" or len(verbalizers) != len(spec.labels):
            raise TasktuneError(f"{source}: eval.verbalizers {verbalizers} must give one word per label of task "
                                f"{spec.name!r} ({[label.name for label in spec.labels]}, in that order)")
        check_verbalizers(verbalizers, f"{source}: eval.verbalizers")
    if recipe.data.split_by is not None and recipe.data.split_by not in SPLITS[spec.type]:
        raise TasktuneError(f"{source}: data.split_by {recipe.data.split_by!r} does not apply to task "
                            f"{spec.name!r} (expected one of {list(SPLITS[spec.type])})")
    recipe.train.objective = recipe.train.objective or OBJECTIVES[spec.type][0]
    if recipe.train.objective not in OBJECTIVES[spec.type]:
        raise TasktuneError(f"{source}: objective {recipe.train.objective!r} does not apply to task "
                            f"{spec.name!r} (expected one of {list(OBJECTIVES[spec.type])})")
    return recipe


def parse_overrides(overrides: list[str]) -> dict:
    """`train.lr=1e-4 data.path=x.tsv` → nested dict, values parsed as YAML scalars."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise TasktuneError(f"override {item!r} must look like key=value (e.g. train.learning_rate=1e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
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


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping (a recipe, a task spec), read with safe_load: data, never code."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TasktuneError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(loaded, dict):
        raise TasktuneError(f"{path}: expected a mapping of {what} keys, got {type(loaded).__name__}")
    return loaded


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
