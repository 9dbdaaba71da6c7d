"""A task type written from outside tasktune, in this one file: "answer with the text's first word". It implements
only the contract's core (prompting, loading, training rows, requests, metrics, the paired test); splitting,
sampling, the leakage check, records, validation and every report and model-card section come from the
`TaskType` defaults. `register()` is its one registration; `write_spec` writes a spec that names it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from tasktune import inference_requests as req
from tasktune.metrics.intervals import bootstrap_weights, mcnemar_exact, mean_interval, paired_difference
from tasktune.tasks.base import TaskOptions, TaskType, register_task_type


class FirstWordTask(TaskType):
    type_name = "toy_first_word"
    split_policies = ("row",)
    objectives = ("lm",)
    hub_task = ("text-generation", "First word")
    sampled_protocols = ("generate",)
    report_rows = ("exact", "n")
    metric_for_best = "exact"

    def __init__(self, spec, options: TaskOptions = TaskOptions()):
        self.spec, self.name = spec, spec.name

    def prompt(self, example: dict) -> str:
        return self.spec.template.format(text=example["text"])

    def target(self, example: dict) -> str:
        return " " + example["text"].split()[0]

    def load(self, path: str | None) -> tuple[list[dict], str]:
        with open(path, newline="", encoding="utf-8") as file:
            table = csv.DictReader(file, delimiter="\t")
            rows = [{"id": i, "text": row["sentence"].strip()} for i, row in enumerate(table)]
        return rows, str(path)

    def train_features(self, builder, examples, objective, max_length, label_token_ids=None, questions_per_context=1):
        features = []
        for ex in examples:
            target = builder.encode(self.target(ex))
            ids = builder.encode(builder.render(ex))[-(max_length - len(target)):]
            features.append({"input_ids": ids + target, "labels": [-100] * len(ids) + target})
        return features

    def validation_protocol(self, head: str = "causal_lm") -> str:
        return "generate"

    def requests(self, builder, examples, protocol):
        return [req.Generate(tuple(builder.encode(builder.render(ex))), 3, stop_at_newline=True)
                for ex in examples], [{} for _ in examples]

    def read_results(self, records, protocol, results) -> None:
        for record, result in zip(records, results):
            words = result.text.split()
            record["generate_pred"] = " " + words[0] if words else ""

    def score(self, records, seconds=None, **extra) -> dict:
        scored = [r for r in records if "generate_pred" in r]
        if not scored:
            return {}
        right = np.asarray([r["generate_pred"] == r["target"] for r in scored], dtype=float)
        interval = mean_interval(right, bootstrap_weights(len(scored)).astype(float))
        return {"generate": {"exact": float(right.mean()), "n": len(scored), "ci95": {"exact": interval}}}

    def paired(self, before, after) -> dict:
        after_by_id = {r["id"]: r for r in after}
        pairs = [(b, after_by_id[b["id"]]) for b in before if b["id"] in after_by_id]
        was = [b["generate_pred"] == b["target"] for b, _ in pairs]
        now = [a["generate_pred"] == a["target"] for _, a in pairs]
        return {"generate": {"n": len(pairs), "metric": "exact", "mcnemar": mcnemar_exact(was, now),
                             "gain": paired_difference(was, now, bootstrap_weights(len(pairs)))}}


def register() -> None:
    register_task_type(FirstWordTask)


def write_spec(path: Path) -> Path:
    path.write_text("name: first_word\ntype: toy_first_word\ntemplate: \"{text}\\nfirst word:\"\n")
    return path
