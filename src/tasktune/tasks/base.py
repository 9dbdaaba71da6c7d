"""The task-type contract, and the registry of task types.

A *task* is data (a spec YAML); a *task type* is the code that gives a spec its meaning. Everything outside
`tasks/` talks to a task through `TaskType` and never compares a type's name: adding a type is one class
registered with `register_task_type` (a plug-in can do it from its own module).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tasktune.data.sampling import part_limits, sample, say_if_short
from tasktune.errors import TasktuneError


@dataclass(frozen=True)
class TaskOptions:
    """What a recipe's eval section says about the task itself: every type is built as `Type(spec, options)`."""
    verbalizers: tuple[str, ...] | None = None  # eval.verbalizers: one word per label (types with labels)
    max_prompt_tokens: int = 384                # eval.max_prompt_tokens: the prompt budget (long-context types)


class TaskType(ABC):
    """What every task type provides, grouped as the pipeline uses it. Methods without a body here are the
    contract; those with one are capabilities a type may declare (a sampling policy, a decision threshold,
    labels for a classification head), whose defaults mean "this type has none"."""

    # --- declared by the type --------------------------------------------------------------------------------
    type_name: ClassVar[str]                     # the spec's `type:`
    split_policies: ClassVar[tuple[str, ...]]    # data.split_by values; the first is the default
    objectives: ClassVar[tuple[str, ...]]        # train.objective values (losses.OBJECTIVES)
    hub_task: ClassVar[tuple[str, str]]          # (model-index task type, task name) for model cards
    takes_verbalizers: ClassVar[bool] = False    # eval.verbalizers applies
    official_predictions: ClassVar[bool] = False  # `tasktune score` reads its prediction files
    template_fields: ClassVar[tuple[str, ...] | None] = None  # fields a template may name (None: any column)
    sampled_protocols: ClassVar[tuple[str, ...]] = ()
    calibration_protocol: ClassVar[str | None] = None
    packs_questions: ClassVar[bool] = False      # train.questions_per_context > 1 applies

    name: str
    metric_for_best: str
    spec: object                                 # the TaskSpec it was built from
    label_names: tuple[str, ...] | list[str] = ()  # a type with labels names them (a seqcls head has one per label)
    verbalizers: tuple[str, ...] = ()            # the word that stands for each label in a prompt's answer

    @abstractmethod
    def __init__(self, spec, options: TaskOptions): ...

    def seqcls_labels(self) -> int:
        """Outputs of a classification head (head seqcls): one per label; 2, transformers' default, for a type
        without labels (whose head is never seqcls)."""
        return len(self.label_names) or 2

    @classmethod
    def check_spec(cls, spec) -> None:
        """Type-specific checks of a spec, before any model loads (one-line TasktuneError)."""

    @classmethod
    def default_objective(cls, single_token_verbalizers: bool) -> str:
        """The objective when a recipe names none, chosen by what the verbalizers allow."""
        return cls.objectives[0]

    # --- prompting ---------------------------------------------------------------------------------------------
    @abstractmethod
    def prompt(self, example: dict) -> str: ...

    @abstractmethod
    def target(self, example: dict) -> str: ...

    def named_fields(self) -> list[str]:
        """The fields the spec's template names (each row must hold them), sorted."""
        from tasktune.prompt_template import template_fields

        return sorted(template_fields(self.spec.template, self.spec.source))

    def template_values(self, record: dict, where: str) -> dict[str, str]:
        """The row's value of each field the template names: text, or a one-line refusal naming the row."""
        values = {}
        for name in self.named_fields():
            value = record.get(name)
            if not isinstance(value, str):
                raise TasktuneError(f"{where}: the template's field {name!r} must be text, got {value!r:.80}")
            values[name] = value
        return values

    def label_token_ids(self, builder, example: dict) -> list[int] | None:
        return None

    def chat_turns(self, example: dict) -> list[dict] | None:
        """The conversation before the answer, for a chat template (chat data); None: the prompt is one user turn."""
        return None

    # --- data --------------------------------------------------------------------------------------------------
    @abstractmethod
    def load(self, path: str | None) -> tuple[list[dict], str]: ...

    def split(self, rows: list[dict], data_cfg) -> dict[str, list]:
        """{train, validation, test: row ids}: by row, seeded (data.test_size, then data.val_size of the
        training part). A type whose rows share context (SST-2's phrases, SQuAD's paragraphs) splits its own way."""
        from tasktune.data.split import random_split, split_errors, validation_size

        ids = [r["id"] for r in rows]
        with split_errors("data.test_size", len(rows)):
            train, test = random_split(len(rows), data_cfg.test_size, data_cfg.seed)
        val_n = validation_size(data_cfg.val_size, len(train))
        with split_errors("data.val_size", len(train)):
            fit, val = random_split(len(train), val_n / len(train), data_cfg.seed)
        return {"train": [ids[train[i]] for i in fit], "validation": [ids[train[i]] for i in val],
                "test": [ids[i] for i in test]}

    def split_policy(self, data_cfg) -> str:
        return self.split_policy_of(self.spec, data_cfg)

    @classmethod
    def split_policy_of(cls, spec, data_cfg) -> str:
        """The recipe's data.split_by, else the spec's, else the type's default (before a task is built)."""
        return data_cfg.split_by or spec.split_by or cls.split_policies[0]

    def overlap(self, train: list[dict], test: list[dict]) -> dict:
        """How much of the test set the training part has seen: its prompts, exactly or inside a training one."""
        from tasktune.data.split import text_overlap

        return text_overlap([self.prompt(r) for r in test], [self.prompt(r) for r in train])

    def sampled_parts(self, examples: dict[str, list[dict]], data_cfg) -> dict[str, list[dict]]:
        """Each part of the split as the run uses it: data.limit_train, data.limit_validation and
        data.limit_test rows of it, a seeded sample in the data's order; the validation and test samples take the
        rows `sampled_first` names before any other. A type with a sampling policy of its own (classification's
        whole sentences) declares it there and in `training_sample`."""
        say_if_short(examples, data_cfg)
        return {part: (self.training_sample(examples[part], data_cfg) if part == "train"
                       else sample(examples[part], limit, data_cfg.seed, keep=self.sampled_first))
                for part, limit in part_limits(data_cfg).items()}

    def sampled_first(self, row: dict) -> bool:
        """A validation or test row a sample takes before any other (the headline's rows); none by default."""
        return False

    def training_sample(self, rows: list[dict], data_cfg) -> list[dict]:
        """The training rows a run (or a sweep's trial) uses: data.limit_train of them, seeded."""
        if data_cfg.train_sentences is not None:
            raise TasktuneError(f"data.train_sentences={data_cfg.train_sentences} needs a sentence-split "
                                "classification file (data.split_by: sentence, whose rows are flagged whole "
                                "sentence or phrase); these rows have no such flag")
        return sample(rows, data_cfg.limit_train, data_cfg.seed)

    @abstractmethod
    def train_features(self, builder, examples: list[dict], objective, max_length: int,
                       label_token_ids: list[int] | None, questions_per_context: int = 1) -> list[dict]:
        """Tokenized training rows for `objective` (a `losses.Objective`, resolved by the caller: a task type
        never looks objectives up, so tasks/ does not import the training layer)."""

    # --- requests and metrics ----------------------------------------------------------------------------------
    def protocols(self, requested: list[str], head: str = "causal_lm") -> list[str]:
        """The protocols evaluated for a recipe's eval.protocols (a type may map or refuse them)."""
        return list(requested)

    @abstractmethod
    def validation_protocol(self, head: str = "causal_lm") -> str: ...

    def new_records(self, examples: list[dict]) -> list[dict]:
        """One prediction record per example, before any protocol ran: its id and its target."""
        return [{"id": ex["id"], "target": self.target(ex)} for ex in examples]

    @abstractmethod
    def requests(self, builder, examples: list[dict], protocol: str) -> tuple[list, list[dict]]: ...

    @abstractmethod
    def read_results(self, records: list[dict], protocol: str, results: list) -> None: ...

    def validation_metrics(self, records: list[dict]) -> dict:
        """{metric_for_best: value} on the validation records (what early stopping reads)."""
        metrics = self.score(records)
        column = self.validation_protocol() if self.validation_protocol() in metrics else next(iter(metrics))
        return {self.metric_for_best: metrics[column][self.metric_for_best]}

    def choose_threshold(self, records: list[dict]) -> float | None:
        """The decision threshold, chosen on the validation slice's `calibration_protocol` records, of a type
        whose decisions need one (extractive QA's abstention); None: argmax decides."""
        return None

    @abstractmethod
    def score(self, records: list[dict], seconds: dict | None = None, **extra) -> dict: ...

    @abstractmethod
    def paired(self, before: list[dict], after: list[dict]) -> dict: ...

    # --- reporting: a metric table per protocol, `{column: {metric: value, "ci95": {metric: [low, high]},
    # "n": n}}` as `score` returns it; the defaults read that table -------------------------------------------
    report_rows: ClassVar[tuple[str, ...]] = ("n",)  # the metric rows a report shows, beside metric_for_best

    def report_columns(self, metrics: dict) -> list[tuple[str, dict]]:
        """(column, its metrics) of one stage, the headline first."""
        return [(name, values) for name, values in metrics.items()
                if isinstance(values, dict) and self.metric_for_best in values]

    def figure(self, metrics: dict, column: str | None = None) -> dict:
        """The task's metric with its 95% interval and n, in `column` or in the report's headline column (for
        SST-2, the whole sentences)."""
        columns = dict(self.report_columns(metrics))
        if not columns:
            return {"value": None, "interval": None, "n": 0}
        column = column if column in columns else next(iter(columns))
        values = columns[column]
        return {"metric": self.metric_for_best, "protocol": column, "value": values.get(self.metric_for_best),
                "interval": (values.get("ci95") or {}).get(self.metric_for_best),
                "n": values.get("n") or values.get("total")}

    def decision_key(self, column: str) -> str:
        """The prediction record's key that holds a report column's decision: what two runtimes evaluating the
        same rows must agree on (`tasktune eval --runtime llama.cpp --run`, `export --eval`)."""
        return f"{column.partition('_')[0]}_pred"

    def protocol_notes(self, proto: dict) -> list[str]:
        """Lines the report adds under "Protocol" (how this type asks and reads the model)."""
        return []

    def summary(self, metrics: dict) -> str:
        """One line of a stage's figures, for the console."""
        parts = []
        for column, _ in self.report_columns(metrics):
            f = self.figure(metrics, column)
            interval = f" [{f['interval'][0]:.4f}, {f['interval'][1]:.4f}]" if f["interval"] else ""
            parts.append(f"{column} {f['metric']} {f['value']:.4f}{interval} n {f['n']}")
        return " | ".join(parts)

    def changed_example(self, old: dict, new: dict) -> tuple[bool, bool, dict] | None:
        """(right before, right after, the row the report shows) for one test example, or None to skip it."""
        return None

    def change_names(self) -> tuple[str, str]:
        """How the report names the two directions of `changed_example`."""
        return "wrong → right", "right → wrong"

    def report_plots(self, zeroshot: dict | None, finetuned: dict | None, columns: list, out: Path) -> list:
        """(title, PNG path) of the type's plots, from the two stages' metrics."""
        from tasktune import plots

        return [("Zero-shot vs fine-tuned", plots.metric_bars(columns, [self.metric_for_best],
                                                             f"{self.name} test metrics", out / "metrics.png"))]

    def hub_eval_rows(self, finetuned: dict) -> list[tuple[str, float, str]]:
        """(metric type, value, label) of the fine-tuned test figures a model card lists."""
        return [(self.metric_for_best, round(values[self.metric_for_best], 4),
                 f"{self.metric_for_best} ({column}, test split)") for column, values in self.report_columns(finetuned)]

    def compare_figures(self, metrics: dict) -> dict:
        """{name: value} of one stage's figures that make runs of this task comparable (`tasktune compare`)."""
        return {f"{column}_{self.metric_for_best}": values[self.metric_for_best]
                for column, values in self.report_columns(metrics)}


TASK_TYPES: dict[str, type[TaskType]] = {}
BUILT_IN = {"classification": "tasktune.tasks.classification", "extractive_qa": "tasktune.tasks.extractive_qa",
            "multiple_choice": "tasktune.tasks.multiple_choice", "generation": "tasktune.tasks.generation"}


def register_task_type(cls: type[TaskType]) -> type[TaskType]:
    TASK_TYPES[cls.type_name] = cls
    return cls


def task_types() -> dict[str, type[TaskType]]:
    for module in BUILT_IN.values():  # imported on first use: the spec loader needs the names, not torch
        importlib.import_module(module)
    return TASK_TYPES


def task_type(name: str, where: str = "task spec") -> type[TaskType]:
    types = task_types()
    if name not in types:
        raise TasktuneError(f"{where}: type {name!r} is not one of {sorted(types)}")
    return types[name]
