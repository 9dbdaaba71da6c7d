"""A sweep file, read and checked whole before anything loads: the base recipe, the search `space` over recipe
keys, the sampler, budget, pruner, storage and an optional constraint; and the recipe of each trial."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from tasktune.errors import TasktuneError

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
# Keys a trial may not change: all trials share one split and one zero-shot evaluation of one model.
SHARED_KEYS = ("name", "task", "model", "dtype", "trust_remote_code", "output_dir", "data.path", "data.seed",
               "data.test_size", "data.val_size", "data.split_by", "data.test_path", "data.limit_test",
               "data.limit_validation", "eval.protocols", "eval.limit_generate", "eval.batch_size")


@dataclass
class Param:
    key: str
    kind: str                      # float | int | categorical
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list = field(default_factory=list)

    def suggest(self, trial):
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)

    def grid(self) -> list:
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            raise TasktuneError(f"space.{self.key}: the grid sampler needs a step (or choices) for a float range")
        count = int(round((self.high - self.low) / self.step)) + 1
        return [self.low + i * self.step for i in range(count)]

    def corners(self) -> list:
        """The values that must each make a valid recipe (checked before anything loads)."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]


@dataclass
class SweepSpec:
    name: str
    recipe: str
    space: list[Param]
    overrides: dict = field(default_factory=dict)
    sampler: str = "tpe"
    trials: int = 10
    timeout: float | None = None
    pruner: str = "median"
    storage: str | None = None
    seed: int = 0
    output_dir: str = "sweeps"
    constraint: str | None = None  # "perplexity_increase <= 5%": the winner is the best trial within it
    source: str = ""

    @property
    def perplexity_limit(self) -> float | None:
        """The largest relative perplexity increase a winner may have (0.05 for "<= 5%"), or None."""
        return None if self.constraint is None else parse_constraint(self.constraint, self.source)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output_dir) / self.name


CONSTRAINT = re.compile(r"\s*perplexity_increase\s*<=\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)\s*")


def parse_constraint(text: str, where: str) -> float:
    """`perplexity_increase <= 5%` (or `<= 0.05`): perplexity on held-out general text (the base recipe's
    eval.perplexity, else the embedded Wikipedia paragraphs), measured for every trial against the base model;
    no test data is read."""
    match = CONSTRAINT.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise TasktuneError(f"{where}: constraint {text!r} must read `perplexity_increase <= LIMIT` (e.g. 5% or 0.05)")
    value = float(match.group(1)) / (100 if match.group(2) else 1)
    if not math.isfinite(value):
        raise TasktuneError(f"{where}: constraint limit must be a finite number, got {match.group(1)}")
    return value


def _nested(dotted: dict) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TasktuneError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _param(key: str, body, where: str) -> Param:
    if key in SHARED_KEYS or key.split(".")[0] in ("name", "task", "model"):
        raise TasktuneError(f"{where}: {key} cannot vary between trials (every trial shares the base recipe's "
                            "split, model and test protocol)")
    if not isinstance(body, dict) or "type" not in body:
        raise TasktuneError(f"{where}: expected a mapping with `type` (float, int or categorical), got {body!r}")
    kind = body["type"]
    allowed = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
               "categorical": {"type", "choices"}}
    if kind not in allowed:
        raise TasktuneError(f"{where}: type {kind!r} is not one of {list(allowed)}")
    unknown = sorted(set(body) - allowed[kind])
    if unknown:
        raise TasktuneError(f"{where}: unknown key(s) {unknown} for a {kind} (expected {sorted(allowed[kind])})")
    if kind == "categorical":
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices or len({json.dumps(c) for c in choices}) != len(choices):
            raise TasktuneError(f"{where}: choices must be a non-empty list of different values, got {choices!r}")
        if not all(isinstance(c, (str, int, float, bool)) or c is None for c in choices):
            raise TasktuneError(f"{where}: choices must be plain values (strings, numbers, booleans)")
        return Param(key, kind, choices=choices)
    low, high = (_number(body.get(k), f"{where}.{k}") for k in ("low", "high"))
    log = body.get("log", False)
    if not isinstance(log, bool):
        raise TasktuneError(f"{where}.log: expected true or false, got {log!r}")
    step = body.get("step")
    step = None if step is None else _number(step, f"{where}.step")
    if not low < high or (log and low <= 0) or (step is not None and (step <= 0 or log)):
        raise TasktuneError(f"{where}: expected low < high (low > 0 with log; a step > 0 only without log), got "
                            f"low={low}, high={high}, log={log}, step={step}")
    if kind == "int" and not (low.is_integer() and high.is_integer() and (step is None or step.is_integer())):
        raise TasktuneError(f"{where}: an int range needs integer low, high and step")
    return Param(key, kind, low, high, log, step)


def load_sweep(path: str, overrides: list[str] = ()) -> SweepSpec:
    """The sweep file (a path or a shipped example's name), validated whole before anything loads: every key,
    and every corner of the space as a recipe."""
    from tasktune import recipes
    from tasktune.config import parse_overrides, read_yaml_mapping

    p = Path(path)
    if not p.is_file():
        shipped = recipes.find_sweep(path)
        if shipped is None:
            raise TasktuneError(f"sweep file {p} does not exist (and is not a shipped sweep: "
                                f"{sorted(recipes.shipped_sweeps())})")
        p = shipped
    where = str(p)
    data = read_yaml_mapping(p, "sweep")
    known = {f.name for f in dataclasses.fields(SweepSpec)} - {"source"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TasktuneError(f"{where}: unknown key(s) {unknown} (expected some of {sorted(known)})")
    for key, value in parse_overrides(list(overrides)).items():  # `tasktune sweep FILE trials=3`
        if key not in known:
            raise TasktuneError(f"sweep override {key!r} is not a sweep key (expected one of {sorted(known)})")
        data[key] = value
    for key in ("recipe", "space"):
        if key not in data:
            raise TasktuneError(f"{where}: missing {key!r} (a sweep names a base recipe and a search space)")
    if not isinstance(data["space"], dict) or not data["space"]:
        raise TasktuneError(f"{where}: space must map recipe keys to ranges, e.g. train.learning_rate: "
                            "{type: float, low: 1e-5, high: 1e-3, log: true}")
    space = [_param(str(k), v, f"{where}: space.{k}") for k, v in data["space"].items()]
    overrides_map = data.get("overrides") or {}
    if not isinstance(overrides_map, dict):
        raise TasktuneError(f"{where}: overrides must map recipe keys to values, got {overrides_map!r}")
    spec = SweepSpec(name=str(data.get("name") or p.stem), recipe=str(data["recipe"]), space=space,
                     overrides={str(k): v for k, v in overrides_map.items()}, source=where)
    for key, kind in (("sampler", str), ("trials", int), ("timeout", (int, float)), ("pruner", str),
                      ("storage", str), ("seed", int), ("output_dir", str), ("constraint", str)):
        if key in data and data[key] is not None:
            value = data[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise TasktuneError(f"{where}: {key} must be {getattr(kind, '__name__', 'a number')}, got {value!r}")
            setattr(spec, key, value)
    if spec.sampler not in SAMPLERS:
        raise TasktuneError(f"{where}: sampler {spec.sampler!r} is not one of {list(SAMPLERS)}")
    if spec.pruner not in PRUNERS:
        raise TasktuneError(f"{where}: pruner {spec.pruner!r} is not one of {list(PRUNERS)}")
    if spec.trials < 1 or (spec.timeout is not None and spec.timeout <= 0):
        raise TasktuneError(f"{where}: trials must be >= 1 and timeout > 0 seconds")
    spec.perplexity_limit  # a malformed constraint fails now
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.name):
        raise TasktuneError(f"{where}: name {spec.name!r} must be a plain directory name")
    if spec.sampler == "grid":
        # The base recipe is trial 0 and is not a grid point to Optuna (it suggests nothing), so the whole grid
        # takes one trial more.
        size = math.prod(len(param.grid()) for param in spec.space)
        spec.trials = min(spec.trials, size + 1)
    if base_recipe(spec).export.gguf:  # the base recipe and its overrides are valid
        raise TasktuneError(f"{where}: the base recipe's export.gguf is a run's last stage, which a sweep does not "
                            "run: drop it here, and run the winner's recipe with it (or `tasktune export RUN --gguf TYPE --eval`)")
    for param in spec.space:
        for value in param.corners():
            trial_recipe(spec, {param.key: value}, where=f"{where}: space.{param.key}={value!r}")
    return spec


def base_recipe(spec: SweepSpec, where: str | None = None):
    from tasktune.config import load_recipe

    overrides = {**spec.overrides, "name": f"{spec.name}-base"}
    try:
        return load_recipe(spec.recipe, settings=_nested(overrides))
    except TasktuneError as exc:
        raise TasktuneError(f"{where or spec.source}: base recipe {spec.recipe!r}: {exc}") from None


def trial_recipe(spec: SweepSpec, params: dict, number: int | None = None, where: str | None = None):
    from tasktune.config import load_recipe

    name = f"{spec.name}-trial-{number}" if number is not None else f"{spec.name}-trial"
    try:
        return load_recipe(spec.recipe, settings=_nested({**spec.overrides, **params, "name": name}))
    except TasktuneError as exc:
        raise TasktuneError(f"{where or spec.source}: {exc}") from None


def spec_to_dict(spec: SweepSpec) -> dict:
    data = dataclasses.asdict(spec)
    data["space"] = {p.key: {k: v for k, v in dataclasses.asdict(p).items() if k != "key" and v not in (None, [])
                             and not (k == "log" and v is False)} for p in spec.space}
    data.pop("source")
    return data


def value_at(recipe, dotted: str):
    """The recipe's value of a dotted key (`train.lora_r`)."""
    node = recipe
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def in_space(spec: SweepSpec, key: str, value) -> bool:
    """Whether a value is one the space can suggest for `key`."""
    param = next(p for p in spec.space if p.key == key)
    if param.kind == "categorical":
        return value in param.choices
    return value is not None and param.low <= value <= param.high


def saved_spec(folder: Path) -> SweepSpec:
    """The resolved sweep a sweep directory was started with (spec.json): what a worker joins."""
    saved = folder / "spec.json"
    if not saved.is_file():
        raise TasktuneError(f"{folder} is not a sweep directory (no spec.json); start the sweep first")
    data = json.loads(saved.read_text())
    return SweepSpec(**{**data, "space": [Param(key, **body) for key, body in data["space"].items()]},
                     source=str(saved))
