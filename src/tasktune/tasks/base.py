"""The task-type contract, and the registry of task types.

A *task* is data (a spec YAML); a *task type* is the code that gives a spec its meaning. Everything outside
`tasks/` talks to a task through `TaskType` and never compares a type's name: adding a type is one class
registered with `register_task_type` (a plug-in can do it from its own module).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from tasktune.errors import TasktuneError


class TaskType(ABC):
    """What every task type provides, grouped as the pipeline uses it."""

    # --- declared by the type --------------------------------------------------------------------------------
    type_name: ClassVar[str]                     # the spec's `type:`
    split_policies: ClassVar[tuple[str, ...]]    # data.split_by values; the first is the default
    objectives: ClassVar[tuple[str, ...]]        # train.objective values (losses.OBJECTIVES)
    hub_task: ClassVar[tuple[str, str]]          # (model-index task type, task name) for model cards
    takes_verbalizers: ClassVar[bool] = False    # eval.verbalizers applies
    official_predictions: ClassVar[bool] = False  # `tasktune score` reads its prediction files
    template_fields: ClassVar[tuple[str, ...] | None] = None  # fields a template may name (None: any column)
    report_rows: ClassVar[tuple[str, ...]]
    sampled_protocols: ClassVar[tuple[str, ...]] = ()
    calibration_protocol: ClassVar[str | None] = None
    packs_questions: ClassVar[bool] = False      # train.questions_per_context > 1 applies

    name: str
    metric_for_best: str

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

    def label_token_ids(self, builder, example: dict) -> list[int] | None:
        return None

    # --- data --------------------------------------------------------------------------------------------------
    @abstractmethod
    def load(self, path: str | None) -> tuple[list[dict], str]: ...

    @abstractmethod
    def split(self, rows: list[dict], data_cfg) -> dict[str, list]: ...

    def split_policy(self, data_cfg) -> str:
        return self.split_policy_of(self.spec, data_cfg)

    @classmethod
    def split_policy_of(cls, spec, data_cfg) -> str:
        """The recipe's data.split_by, else the spec's, else the type's default (before a task is built)."""
        return data_cfg.split_by or spec.split_by or cls.split_policies[0]

    @abstractmethod
    def overlap(self, train: list[dict], test: list[dict]) -> dict: ...

    @abstractmethod
    def train_features(self, builder, examples: list[dict], objective: str, max_length: int,
                       label_token_ids: list[int] | None, questions_per_context: int = 1) -> list[dict]: ...

    # --- requests and metrics ----------------------------------------------------------------------------------
    @abstractmethod
    def protocols(self, requested: list[str], head: str = "causal_lm") -> list[str]: ...

    @abstractmethod
    def validation_protocol(self, head: str = "causal_lm") -> str: ...

    @abstractmethod
    def new_records(self, examples: list[dict]) -> list[dict]: ...

    @abstractmethod
    def requests(self, builder, examples: list[dict], protocol: str) -> tuple[list, list[dict]]: ...

    @abstractmethod
    def read_results(self, records: list[dict], protocol: str, results: list) -> None: ...

    @abstractmethod
    def validation_metrics(self, records: list[dict]) -> dict: ...

    @abstractmethod
    def score(self, records: list[dict], seconds: dict | None = None, **extra) -> dict: ...

    @abstractmethod
    def paired(self, before: list[dict], after: list[dict]) -> dict: ...

    # --- reporting ---------------------------------------------------------------------------------------------
    @abstractmethod
    def report_columns(self, metrics: dict) -> list[tuple[str, dict]]: ...

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

    @abstractmethod
    def protocol_notes(self, proto: dict) -> list[str]: ...

    @abstractmethod
    def summary(self, metrics: dict) -> str: ...

    @abstractmethod
    def changed_example(self, old: dict, new: dict) -> tuple[bool, bool, dict] | None:
        """(right before, right after, the row the report shows) for one test example, or None to skip it."""

    @abstractmethod
    def report_plots(self, zeroshot: dict | None, finetuned: dict | None, columns: list, out: Path) -> list: ...

    @abstractmethod
    def hub_eval_rows(self, finetuned: dict) -> list[tuple[str, float, str]]:
        """(metric type, value, label) of the fine-tuned test figures a model card lists."""

    @abstractmethod
    def compare_figures(self, metrics: dict) -> dict:
        """{name: value} of one stage's figures that make runs of this task comparable (`tasktune compare`)."""


TASK_TYPES: dict[str, type[TaskType]] = {}
BUILT_IN = {"classification": "tasktune.tasks.classification", "extractive_qa": "tasktune.tasks.extractive_qa"}


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
