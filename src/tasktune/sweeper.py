"""`tasktune sweep SWEEP.yaml`: find the best adaptation within a budget, choose it on validation, prove it on
test once.

A sweep file names a base recipe, a search `space` over recipe keys, a sampler, a budget and a pruner. Optuna
runs the search (the engine; tasktune schedules nothing itself): an SQLite file in the sweep directory by
default, or any RDB URL (`storage: postgresql://...`) that `tasktune sweep --worker SWEEP_DIR` processes on other
machines join. Honest selection:

- every trial shares the base recipe's split and the one loaded model (re-wrapped with a fresh adapter per
  trial, the same initialisation for the same seed); tokenized rows are cached across trials;
- trials are ranked on the validation slice only (each trial's best validation figure, with its interval);
- the test set is evaluated once at the end: zero-shot, the winner and the base recipe; never another trial.
  The report gives the winner's test figure with its interval, the paired tests winner vs base and winner vs
  zero-shot, and the winner's validation figure beside its test figure (the optimism of choosing).

The directory `sweeps/NAME/` is locked and signed like a run directory: `sweep.yaml` (the resolved sweep),
`study.db`, `trials/N/` (a run directory without the test stages), `leaderboard.json` / `.md`, `test/`,
`sweep.json`, `report.md` / `report.html` and `plots/`. Killing a sweep and re-running the same command
continues it: finished trials are kept and the interrupted one is retried from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasktune.errors import TasktuneError
from tasktune.methods import get_method

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
    base_recipe(spec)  # the base recipe and its overrides are valid
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


# --- the study ----------------------------------------------------------------------------------------------------

def storage_url(spec: SweepSpec, sweep_dir: Path) -> str:
    return spec.storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def open_study(spec: SweepSpec, sweep_dir: Path, create: bool):
    import optuna

    url = storage_url(spec, sweep_dir)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        # Heartbeats mark a trial whose process died as failed; the retry callback queues it again with the same
        # parameters (its directory, and so its checkpoints, are reused).
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=20, grace_period=60,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
    except Exception as exc:  # SQLAlchemy raises many types; all mean "cannot open this storage"
        raise TasktuneError(f"sweep storage {url}: cannot open it ({' '.join(str(exc).split())[:300]})") from None
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(),
              "none": lambda: optuna.pruners.NopPruner()}[spec.pruner]()
    kwargs = dict(study_name=spec.name, storage=storage, direction="maximize", pruner=pruner,
                  sampler=TrialSeededSampler(spec))
    if create:
        return optuna.create_study(load_if_exists=True, **kwargs)
    try:
        return optuna.load_study(**{k: v for k, v in kwargs.items() if k != "direction"})
    except KeyError:
        raise TasktuneError(f"{url}: no study {spec.name!r} yet; start the sweep with `tasktune sweep FILE` "
                            "before adding workers") from None


class TrialSeededSampler:
    """The configured sampler, made afresh for every trial with seed + the number of trials that have not
    failed. A process's sampler state is then no part of the outcome: a sweep killed and resumed asks the
    same questions as one never killed, and two workers sampling at once get different seeds."""

    def __new__(cls, spec: SweepSpec):
        import optuna

        class _Sampler(optuna.samplers.BaseSampler):
            def __init__(self):
                self.inner = self._make(spec.seed)

            @staticmethod
            def _make(seed: int):
                if spec.sampler == "grid":
                    return optuna.samplers.GridSampler({p.key: p.grid() for p in spec.space}, seed=seed)
                if spec.sampler == "random":
                    return optuna.samplers.RandomSampler(seed=seed)
                if spec.constraint is not None:  # TPE models feasibility from each trial's constraint value
                    return optuna.samplers.TPESampler(seed=seed, constraints_func=_constraint_values)
                return optuna.samplers.TPESampler(seed=seed)

            def before_trial(self, study, trial):
                alive = [t for t in study.get_trials(deepcopy=False)
                         if t.state != optuna.trial.TrialState.FAIL and t.number <= trial.number]
                # The grid keeps one seed: Optuna's GridSampler gives trial n the n-th point of an order it
                # shuffles with its seed, so a seed per trial would repeat points and skip others (seen: a
                # 4-point grid ran `lora` twice and never `full`). Its choices depend only on the study then.
                self.inner = self._make(spec.seed if spec.sampler == "grid" else spec.seed + len(alive))
                self.inner.before_trial(study, trial)

            def infer_relative_search_space(self, study, trial):
                return self.inner.infer_relative_search_space(study, trial)

            def sample_relative(self, study, trial, search_space):
                return self.inner.sample_relative(study, trial, search_space)

            def sample_independent(self, study, trial, param_name, param_distribution):
                return self.inner.sample_independent(study, trial, param_name, param_distribution)

            def after_trial(self, study, trial, state, values):
                self.inner.after_trial(study, trial, state, values)

        return _Sampler()


def _constraint_values(trial) -> list[float]:
    """Optuna's constraint convention: <= 0 is feasible (pruned and failed trials count as feasible)."""
    return trial.user_attrs.get("constraint", [0.0])


IDENTITY_ATTRS = ("identity", "base", "base_values", "trial_dir")  # what a retried trial keeps of the one it retries


def identity_of(trial) -> int:
    """The number a trial is known by (its directory, recipe name and leaderboard row): its own, or for a retry
    of a killed trial, the number of the trial it retries."""
    return trial.user_attrs.get("identity", trial.number)


def fail_dead_local_trials(study) -> None:
    """Trials left RUNNING by a process of this machine that no longer exists (killed): failed now rather than
    after the heartbeat's grace period, and queued again as the same trial (number, directory, base or not,
    parameters)."""
    import optuna

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host or _alive(t.user_attrs.get("pid"), t.user_attrs.get("process")):
            continue
        # Optuna has no public call to fail one trial of another process; its storage API is what
        # fail_stale_trials itself uses.
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
        kept = {k: t.user_attrs[k] for k in IDENTITY_ATTRS if k in t.user_attrs}
        study.enqueue_trial(t.params, user_attrs={**kept, "identity": identity_of(t), "retry_of": t.number},
                            skip_if_exists=False)


def process_identity(pid: int) -> str | None:
    """This boot's id, the pid and the process's start time (clock ticks after boot, /proc/PID/stat field 22):
    a pid alone is reused (in a container tasktune may be pid 1 every time); the three together are not. None
    where /proc does not tell."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        start = stat.rsplit(")", 1)[1].split()[19]  # after the command name, which may hold spaces
    except (OSError, IndexError):
        return None
    return f"{boot}:{pid}:{start}"


def _alive(pid, process: str | None = None) -> bool:
    """Whether the process that ran a trial still runs: the pid exists and, where its identity was recorded,
    it is the same process (not a new one given the same pid)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if process is not None:
        return process_identity(pid) == process
    return True


# --- trials ---------------------------------------------------------------------------------------------------

class Trials:
    """One loaded model and one split for every trial; a fresh adapter per trial (methods with a base of their
    own, `methods.Method.own_base`, load it per trial and leave the shared one untouched)."""

    def __init__(self, spec: SweepSpec, sweep_dir: Path, prepared):
        self.spec, self.dir, self.base = spec, sweep_dir, prepared
        self.features: dict[tuple, list[dict]] = {}
        self._base_perplexity: tuple[list[str], list[dict]] | None = None
        by_id = {r["id"]: r for r in prepared.rows}
        self.train_all = [by_id[i] for i in prepared.split["train"]]

    def prepared_for(self, recipe):
        """The shared Prepared with this trial's recipe: task, prompt builder and training rows rebuilt from it
        (shots, verbalizers, prompt budget, data.limit_train and data.train_sentences may vary); split, validation
        sample and model are shared."""
        from tasktune.tasks import PromptBuilder, get_task

        base = self.base
        task = get_task(recipe.task, recipe.eval.verbalizers, recipe.eval.max_prompt_tokens)
        train = task.training_sample(self.train_all, recipe.data)
        builder = PromptBuilder(task, base.lm.tokenizer, recipe.eval.prompt_format, recipe.eval.shots,
                                shot_pool=train, seed=recipe.data.seed)
        from tasktune.pipeline import resolve_objective

        label_ids = task.label_token_ids(builder, base.examples["test"][0])  # as `run` decides it
        resolve_objective(recipe, task, label_ids, training=True)
        return dataclasses.replace(base, recipe=recipe, task=task, builder=builder, label_token_ids=label_ids,
                                   examples={**base.examples, "train": train})

    def perplexity_increase(self, p, model, head: str) -> dict | None:
        """The trial model's perplexity on held-out general text against the base model's, paired over
        documents (`metrics.perplexity.perplexity_change`); None for a model without its LM head (a
        classification head)."""
        from tasktune import costs
        from tasktune.metrics.perplexity import perplexity_change

        if head != "causal_lm":
            return None
        if self._base_perplexity is None:  # the base model's, once per process
            # Not the base run's own documents: a trial may train on more rows (data.limit_train) than the base
            # recipe, so no context of the whole training split may be among them.
            base = self.base
            by_id = {r["id"]: r for r in base.rows}
            split_rows = {part: [by_id[i] for i in ids if i in by_id] for part, ids in base.split.items()}
            documents, _ = costs.held_out_documents(base.recipe, base.examples, split_rows)
            self._base_perplexity = documents, costs.document_nll(self.base.lm.model, self.base.lm.tokenizer, documents)
        documents, base_nll = self._base_perplexity
        change = perplexity_change(base_nll, costs.document_nll(model, p.lm.tokenizer, documents))
        return {k: change[k] for k in ("relative_change", "interval", "p_value", "n")}

    def train_features(self, p) -> list[dict]:
        from tasktune.pipeline import training_features

        cfg = p.recipe.train
        key = (cfg.objective, cfg.max_length, p.recipe.eval.shots, p.recipe.eval.prompt_format,
               tuple(p.recipe.eval.verbalizers or ()), p.recipe.eval.max_prompt_tokens, p.recipe.data.limit_train,
               p.recipe.data.train_sentences, cfg.questions_per_context)
        if key not in self.features:
            self.features[key] = training_features(p)
        return self.features[key]

    def run(self, trial) -> float:
        """Train one trial into trials/N/ (resuming a retried trial's checkpoints), validate it, return the
        validation figure. Pruned trials stop at a validation step."""
        import optuna

        from tasktune.pipeline import release_base, train_stage
        from tasktune.rundir import mark_as_ours, write_json

        base_values = trial.user_attrs.get("base_values") or {}
        # The base recipe's own values where the space does not hold them (a rank outside the choices, say):
        # trial 0 is then the base recipe itself, not its nearest point in the space.
        params = {param.key: base_values[param.key] if param.key in base_values else param.suggest(trial)
                  for param in self.spec.space}
        identity = identity_of(trial)
        folder = Path(trial.user_attrs.get("trial_dir") or self.dir / "trials" / str(identity))
        trial.set_user_attr("identity", identity)
        trial.set_user_attr("trial_dir", str(folder))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("process", process_identity(os.getpid()))
        recipe = trial_recipe(self.spec, params, identity)
        p = self.prepared_for(recipe)
        if not folder.is_dir():
            folder.mkdir(parents=True)
            mark_as_ours(folder, "trial")
        write_json(folder / "recipe.json", recipe.to_dict())
        start = time.perf_counter()
        limit = self.spec.perplexity_limit
        cost = None
        if not get_method(recipe.train.method).trains:  # prompting: the base model with eval.shots examples
            figure = validation_figure(p, p.lm.model, "causal_lm")
            summary = {"global_step": 0, "train_runtime_s": 0.0}
            cost = {"relative_change": 0.0, "interval": [0.0, 0.0], "p_value": 1.0, "n": 0} if limit is not None \
                else None
        else:
            model, summary, head = train_stage(p, folder, features=self.train_features(p),
                                               callbacks=(PruneOnValidation(trial, p.task.metric_for_best),))
            try:
                # The best checkpoint's own validation pass when it saw this model; else one pass now.
                figure = summary.get("best_validation") or validation_figure(p, model, head)
                if limit is not None:
                    cost = self.perplexity_increase(p, model, head)
            finally:
                release_base(p, model)  # the shared base, clean for the next trial
        record = {"trial": identity, "params": params, "validation": figure, "steps": summary["global_step"],
                  "wall_s": round(time.perf_counter() - start, 2), "train_s": summary.get("train_runtime_s"),
                  "compile_warmup_s": summary.get("compile_warmup_s"),
                  "pruned": False}
        if limit is not None:
            # Unmeasurable (a classification head has no LM head to read text with) counts as outside the limit.
            record["perplexity_increase"] = cost
            record["feasible"] = cost is not None and cost["relative_change"] <= limit
            trial.set_user_attr("constraint", [cost["relative_change"] - limit if cost is not None else math.inf])
        write_json(folder / "trial.json", record)
        trial.set_user_attr("record", record)
        if figure["value"] is None:
            raise optuna.TrialPruned("no validation figure")
        return figure["value"]


class PruneOnValidation:
    """A Trainer callback: report each validation's figure to Optuna and stop the trial when its pruner says so."""

    def __new__(cls, trial, metric: str):
        from transformers import TrainerCallback

        class _Callback(TrainerCallback):
            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                import optuna

                value = (metrics or {}).get(f"eval_{metric}")
                if value is None:
                    return
                trial.report(float(value), state.global_step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {state.global_step} (validation {metric} {value:.4f})")

        return _Callback()


def validation_figure(p, model, head: str) -> dict:
    """The trial's figure on the validation slice, with its 95% interval and n (the task's own metric)."""
    from tasktune import evaluation
    from tasktune.runner import Runner

    runner = Runner(model.eval(), p.lm.tokenizer, p.recipe.eval.batch_size, shard=False)
    records = evaluation.validation_records(p.task, runner, p.builder, p.examples["validation"], head)
    return evaluation.validation_figure(p.task, records, head)


def figure_of(task, metrics: dict, column: str | None = None) -> dict:
    """Trials are ranked on the validation protocol over every validation row, the metric early stopping reads
    (SST-2's validation slice holds too few whole sentences to rank on them alone); test figures are reported
    in the headline column too."""
    return task.figure(metrics, column)


# --- the command ---------------------------------------------------------------------------------------------------

def sweep(path: str, overrides: list[str] = (), overwrite: bool = False) -> Path:
    """`tasktune sweep FILE`: run (or continue) the sweep, then the once-only test evaluation and the report."""
    from tasktune.pipeline import prepare
    from tasktune.rundir import RunLock, mark_as_ours, read_marker, remove_ours, write_json, write_text

    spec = load_sweep(path, overrides)
    sweep_dir = spec.sweep_dir
    resolved = json.dumps(spec_to_dict(spec), indent=1, sort_keys=True)
    lock = RunLock(sweep_dir)
    lock.acquire()
    try:
        if sweep_dir.exists():
            same = (sweep_dir / "spec.json").is_file() and (sweep_dir / "spec.json").read_text() == resolved
            if not same and not overwrite:
                raise TasktuneError(f"{sweep_dir} holds another sweep; choose another name or pass --overwrite")
            if not same:
                remove_ours(sweep_dir, allow_partial=True)  # checks, then deletes: the one deletion path
            elif read_marker(sweep_dir)[0] is None:
                raise TasktuneError(f"{sweep_dir}: {read_marker(sweep_dir)[1]}; refusing to write into it")
        if (sweep_dir / "sweep.json").is_file():
            print(f"[tasktune] {sweep_dir} is already complete for this sweep; nothing to do")
            return sweep_dir
        if not sweep_dir.exists():
            sweep_dir.mkdir(parents=True)
            mark_as_ours(sweep_dir, "sweep")
            write_text(sweep_dir / "spec.json", resolved)
        base = base_recipe(spec)
        prepared = prepare(base)
        check_sweep_fingerprint(sweep_dir, prepared)
        study = open_study(spec, sweep_dir, create=True)
        fail_dead_local_trials(study)
        if not study.trials:  # the base recipe competes as trial 0, so its adapter exists for the test
            defaults = {param.key: _value_at(base, param.key) for param in spec.space}
            study.enqueue_trial({k: v for k, v in defaults.items() if _in_space(spec, k, v)},
                                user_attrs={"base": True, "base_values": {
                                    k: v for k, v in defaults.items() if not _in_space(spec, k, v)}})
        optimize(spec, sweep_dir, study, prepared)
        _wait_for_workers(study)
        result = finish(spec, sweep_dir, study, prepared)
        write_json(sweep_dir / "sweep.json", result)
        from tasktune.ownership import seal

        seal(sweep_dir, "sweep")
        print(f"[tasktune] wrote {sweep_dir} (winner: trial {result['winner']['trial']})")
        return sweep_dir
    finally:
        lock.release()


def check_sweep_fingerprint(sweep_dir: Path, prepared) -> None:
    """A sweep continues only on the data, model and task spec its trials were trained on (as a run resumes)."""
    from tasktune.pipeline import check_fingerprint, run_fingerprint
    from tasktune.run_layout import RunLayout
    from tasktune.rundir import write_json

    fingerprint = run_fingerprint(prepared)
    if RunLayout(sweep_dir).fingerprint.is_file():
        check_fingerprint(sweep_dir, fingerprint, "its trials were trained on the earlier one: pass --overwrite to "
                                                  "start the sweep again, or give it another name")
    else:
        write_json(RunLayout(sweep_dir).fingerprint, fingerprint)


def worker(sweep_dir: str) -> Path:
    """`tasktune sweep --worker SWEEP_DIR`: join a sweep's study and run trials until its budget is spent."""
    from tasktune.pipeline import prepare

    folder = Path(sweep_dir)
    saved = folder / "spec.json"
    if not saved.is_file():
        raise TasktuneError(f"{folder} is not a sweep directory (no spec.json); start the sweep first")
    data = json.loads(saved.read_text())
    spec = SweepSpec(**{**data, "space": [Param(key, **body) for key, body in data["space"].items()]},
                     source=str(saved))
    prepared = prepare(base_recipe(spec))
    check_sweep_fingerprint(folder, prepared)
    study = open_study(spec, folder, create=False)
    optimize(spec, folder, study, prepared)
    print(f"[tasktune] worker done: {len(study.trials)} trials in {spec.name}")
    return folder


def optimize(spec: SweepSpec, sweep_dir: Path, study, prepared) -> None:
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    trials = Trials(spec, sweep_dir, prepared)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    remaining = spec.trials - len(study.get_trials(deepcopy=False, states=done))
    if remaining <= 0:
        return
    study.optimize(trials.run, n_trials=remaining + len(study.get_trials(deepcopy=False,
                                                                           states=(TrialState.WAITING,))),
                   timeout=spec.timeout, callbacks=[MaxTrialsCallback(spec.trials, states=done)],
                   catch=(), gc_after_trial=True)


def _wait_for_workers(study, poll_s: float = 2.0, say_every_s: float = 60.0) -> None:
    """Wait for trials other processes are running, saying which (at once, then every minute)."""
    from optuna.trial import TrialState

    said = -math.inf
    while True:
        fail_dead_local_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        if time.monotonic() - said >= say_every_s:
            shown = ", ".join(f"{identity_of(t)} (host {t.user_attrs.get('host')}, pid {t.user_attrs.get('pid')})"
                              for t in running)
            print(f"[tasktune] waiting for trial(s) still running in other processes: {shown}", flush=True)
            said = time.monotonic()
        time.sleep(poll_s)


def _value_at(recipe, dotted: str):
    node = recipe
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _in_space(spec: SweepSpec, key: str, value) -> bool:
    param = next(p for p in spec.space if p.key == key)
    if param.kind == "categorical":
        return value in param.choices
    return value is not None and param.low <= value <= param.high


def leaderboard(study) -> list[dict]:
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        record = t.user_attrs.get("record") or {}
        validation = record.get("validation") or {"value": t.value, "interval": None, "n": None}
        last_step = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"trial": identity_of(t), "params": record.get("params", t.params), "validation": validation,
                     "steps": record.get("steps", last_step), "wall_s": record.get("wall_s") or (
                         round((t.datetime_complete - t.datetime_start).total_seconds(), 2)
                         if t.datetime_complete else None),
                     "pruned": t.state == TrialState.PRUNED, "base": bool(t.user_attrs.get("base")),
                     "retry_of": t.user_attrs.get("retry_of")})
        if "perplexity_increase" in record:
            rows[-1].update(perplexity_increase=record["perplexity_increase"], feasible=record["feasible"])
    rows.sort(key=lambda r: (r["pruned"], not r.get("feasible", True),
                             -(r["validation"]["value"] if r["validation"]["value"] is not None else -math.inf),
                             r["trial"]))
    mark_pareto_front(rows)
    return rows


def mark_pareto_front(rows: list[dict]) -> None:
    """`pareto: true` on the finished trials no other beats on both validation figure (higher) and perplexity
    increase (lower): the trade-offs worth choosing between, whatever the limit."""
    measured = [r for r in rows if not r["pruned"] and r["validation"]["value"] is not None
                and r.get("perplexity_increase") is not None]
    for r in measured:
        v, c = r["validation"]["value"], r["perplexity_increase"]["relative_change"]
        r["pareto"] = not any(o["validation"]["value"] >= v and o["perplexity_increase"]["relative_change"] <= c
                              and (o["validation"]["value"] > v or o["perplexity_increase"]["relative_change"] < c)
                              for o in measured)


def evaluate_test(p, model, out_dir: Path, head: str = "causal_lm") -> dict:
    """One evaluation on the test split (the only place a sweep reads it)."""
    from tasktune.pipeline import evaluate_stage

    return evaluate_stage(p, model, out_dir, head=head)


def finish(spec: SweepSpec, sweep_dir: Path, study, prepared) -> dict:
    """Winner by validation; then the test set, once each: zero-shot, winner, base recipe."""
    from tasktune.run_layout import read_jsonl
    from tasktune.rundir import write_json, write_text

    board = leaderboard(study)
    ranked = [r for r in board if not r["pruned"] and r["validation"]["value"] is not None]
    if not ranked:
        raise TasktuneError(f"sweep {spec.name}: no trial finished with a validation figure (all pruned or failed)")
    if spec.constraint is not None:
        within = [r for r in ranked if r.get("feasible")]
        if not within:
            least = min((r["perplexity_increase"]["relative_change"] for r in ranked if r.get("perplexity_increase")),
                        default=None)
            raise TasktuneError(f"sweep {spec.name}: no finished trial meets `{spec.constraint}` (smallest perplexity "
                                f"increase: {'unmeasured' if least is None else f'{100 * least:+.1f}%'}); relax it, "
                                "or add train.method none (prompting) or smaller learning rates to the space")
        ranked = within
    winner = ranked[0]
    base_row = next((r for r in board if r["base"] and not r["pruned"]), None)
    trials = Trials(spec, sweep_dir, prepared)
    pristine = {k: v.detach().clone() for k, v in prepared.lm.model.state_dict().items()}
    test = sweep_dir / "test"
    zeroshot = evaluate_test(prepared, prepared.lm.model, test / "zeroshot")
    results = {"zeroshot": figure_of(prepared.task, zeroshot)}
    for role, row in (("winner", winner), ("base", base_row)):
        if row is None:
            continue
        if role == "base" and row["trial"] == winner["trial"]:
            results["base"], results["base_as_validated"] = dict(results["winner"]), dict(
                results["winner_as_validated"])
            continue
        metrics = _test_trial(trials, spec, row, test / role, pristine)
        results[role] = figure_of(prepared.task, metrics)
        results[f"{role}_as_validated"] = figure_of(prepared.task, metrics, row["validation"].get("protocol"))
    paired = {}
    for role in ("base", "zeroshot"):
        if role in results and not (role == "base" and base_row and base_row["trial"] == winner["trial"]):
            other = read_jsonl(test / role / "predictions.jsonl")
            paired[f"winner_vs_{role}"] = prepared.task.paired(other, read_jsonl(test / "winner" / "predictions.jsonl"))
    within = (f" among trials with {spec.constraint} (perplexity on held-out general text against the base "
              "model, no test data)") if spec.constraint else ""
    result = {"name": spec.name, "selection": "highest validation "
              f"{prepared.task.metric_for_best}{within} on the base recipe's validation slice "
              f"(n = {len(prepared.examples['validation'])}); the test set was evaluated once each for zero-shot, "
              "the winner and the base recipe, never for the other trials",
              "winner": winner, "base": base_row, "test": results, "paired": paired,
              "trials": len(board), "pruned": sum(r["pruned"] for r in board),
              "test_rows": len(prepared.examples["test"]), "validation_rows": len(prepared.examples["validation"]),
              "constraint": spec.constraint,
              "pareto_front": [r["trial"] for r in board if r.get("pareto")]}
    write_json(sweep_dir / "leaderboard.json", board)
    from tasktune.sweep_report import leaderboard_markdown, write_sweep_report

    write_text(sweep_dir / "leaderboard.md", leaderboard_markdown(board, prepared.task.metric_for_best))

    write_sweep_report(sweep_dir, spec, study, result, board)
    return result


def _test_trial(trials: Trials, spec: SweepSpec, row: dict, out_dir: Path, pristine: dict) -> dict:
    from tasktune.infer import merge_for_inference
    from tasktune.pipeline import load_trained

    recipe = trial_recipe(spec, row["params"], row["trial"])
    p = trials.prepared_for(recipe)
    if not get_method(recipe.train.method).trains:
        return evaluate_test(p, p.lm.model, out_dir)  # prompting: the base model with the trial's shots
    # The trial's model as every command loads it: a plain adapter on the shared base, or a base of its own (a
    # classification head, a full fine-tune, QLoRA's dequantized 4-bit base).
    model, _, head = load_trained(p, Path(trials.dir / "trials" / str(row["trial"])))
    merged = merge_for_inference(model)
    try:
        return evaluate_test(p, merged, out_dir, head=head)
    finally:
        if merged is p.lm.model:
            p.lm.model.load_state_dict(pristine)  # merged into the shared base in place: back to its weights
