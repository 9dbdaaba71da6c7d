"""Multiple choice, as lm-evaluation-harness's `multiple_choice` output type: a question (any template over the
row's text fields), a list of choices, the gold choice. `score`: the log-likelihood of each choice after the
prompt (the choice tokenized in context, after a space), reported raw (`acc`: the highest sum) and length-normalised
(`acc_norm`: the highest sum per character of the choice); `generate`: the choice the greedy answer begins with.
Training: the causal-LM loss on the gold choice's tokens.

Data: JSON lines, one question per line, with the template's fields as text, `choices` (a list of two or more
different texts) and `answer` (the gold choice's index from 0, or its text); the two column names can be renamed
under the spec's `data.columns: {choices: ..., answer: ...}`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasktune import inference_requests as req
from tasktune.errors import TasktuneError
from tasktune.metrics.intervals import bootstrap_weights, mcnemar_exact, mean_interval, paired_difference
from tasktune.tasks.base import TaskOptions, TaskType, register_task_type


@register_task_type
class MultipleChoiceTask(TaskType):
    type_name = "multiple_choice"
    split_policies = ("row",)
    objectives = ("lm",)
    hub_task = ("multiple-choice", "Multiple choice")
    sampled_protocols = ("generate",)
    report_rows = ("acc", "acc_norm", "n")
    metric_for_best = "acc"

    def __init__(self, spec, options: TaskOptions = TaskOptions()):
        self.spec, self.name = spec, spec.name
        self.choices_column = spec.data.columns.get("choices", "choices")
        self.answer_column = spec.data.columns.get("answer", "answer")

    @classmethod
    def check_spec(cls, spec) -> None:
        unknown = sorted(set(spec.data.columns) - {"choices", "answer"})
        if unknown:
            raise TasktuneError(f"{spec.source}: data.columns {unknown} do not apply to a multiple_choice task "
                                "(expected choices and answer)")
        if spec.labels:
            raise TasktuneError(f"{spec.source}: a multiple_choice task takes its choices from each row, not labels")

    # --- prompting -------------------------------------------------------------------------------------------
    def prompt(self, example: dict) -> str:
        return self.spec.template.format(**example["fields"])

    def target(self, example: dict) -> str:
        return " " + example["choices"][example["label"]]

    def encoded(self, builder, example: dict) -> tuple[list[int], list[list[int]]]:
        """The prompt's tokens, and each choice's tokens as they follow it: the prompt and " choice" encoded
        together, the prompt's own length cut off (lm-evaluation-harness's split of context and continuation)."""
        context = builder.render(example)
        ids = builder.encode(context)
        return ids, [builder.encode(context + " " + choice)[len(ids):] for choice in example["choices"]]

    # --- data ------------------------------------------------------------------------------------------------
    def load(self, path: str | None) -> tuple[list[dict], str]:
        from tasktune.data import resolve
        from tasktune.data.table import json_objects, pick_files

        files = resolve(self.spec, path, pick_files(self.spec))
        if not isinstance(files, list):
            raise TasktuneError(f"{self.spec.source}: a multiple_choice task reads a local JSON-lines file "
                                f"(data.path), not {files}")
        file = Path(files[0])
        rows = [self.row(record, i, file, line_no) for i, (line_no, record) in enumerate(json_objects(file))]
        if not rows:
            raise TasktuneError(f"{file} holds no rows (expected one JSON object per line)")
        return rows, str(file)

    def row(self, record: dict, row_id: int, file: Path, line_no: int) -> dict:
        """One question as the stages use it; any malformed field is named with its file and line."""
        where = f"{file}, line {line_no}"
        choices = record.get(self.choices_column)
        if (not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip()
                                                                         for c in choices)):
            raise TasktuneError(f"{where}: {self.choices_column!r} must be a list of two or more non-empty texts, "
                                f"got {choices!r}")
        if len({c.strip() for c in choices}) != len(choices):
            raise TasktuneError(f"{where}: {self.choices_column!r} holds the same choice twice: {choices!r}")
        answer = record.get(self.answer_column)
        if isinstance(answer, bool) or not isinstance(answer, (int, str)):
            raise TasktuneError(f"{where}: {self.answer_column!r} must be the gold choice's index (from 0) or its "
                                f"text, got {answer!r}")
        if isinstance(answer, int):
            if not 0 <= answer < len(choices):
                raise TasktuneError(f"{where}: {self.answer_column!r} {answer} is out of range for "
                                    f"{len(choices)} choices (expected 0 to {len(choices) - 1})")
            label = answer
        elif answer in choices:
            label = choices.index(answer)
        else:
            raise TasktuneError(f"{where}: {self.answer_column!r} {answer!r} is not one of the choices {choices!r}")
        fields = self.template_values(record, where)
        return {"id": row_id, "fields": fields, "choices": [c.strip() for c in choices], "label": label,
                "text": self.spec.template.format(**fields)}

    # --- training --------------------------------------------------------------------------------------------
    def train_features(self, builder, examples: list[dict], objective, max_length: int,
                       label_token_ids: list[int] | None, questions_per_context: int = 1) -> list[dict]:
        features = []
        for ex in examples:
            ids, choices = self.encoded(builder, ex)
            target = choices[ex["label"]]
            ids = ids[-max(max_length - len(target), 1):]
            features.append({"input_ids": ids + target, "labels": [-100] * len(ids) + target})
        return features

    # --- requests and metrics --------------------------------------------------------------------------------
    def validation_protocol(self, head: str = "causal_lm") -> str:
        return "score"

    def new_records(self, examples: list[dict]) -> list[dict]:
        return [{"id": ex["id"], "label": ex["label"], "choices": ex["choices"]} for ex in examples]

    def requests(self, builder, examples: list[dict], protocol: str) -> tuple[list, list[dict]]:
        if protocol not in ("score", "generate"):
            raise TasktuneError(f"protocol {protocol!r} does not apply to a multiple_choice task (expected score "
                                "or generate)")
        encoded = [self.encoded(builder, ex) for ex in examples]
        if protocol == "score":
            requests = [req.Score(tuple(ids), tuple(tuple(t) for t in choices)) for ids, choices in encoded]
        else:
            # One token budget for every question (the longest choice of all, plus one), so that the runner batches
            # the questions together; an answer stops at its newline and is read by its first words.
            budget = max(len(t) for _, choices in encoded for t in choices) + 1
            requests = [req.Generate(tuple(ids), budget, stop_at_newline=True) for ids, _ in encoded]
        return requests, [{} for _ in examples]

    def read_results(self, records: list[dict], protocol: str, results: list) -> None:
        for record, result in zip(records, results):
            if protocol == "generate":
                text = result.text.strip().lower()
                record["generate_text"] = result.text
                matches = [i for i, c in enumerate(record["choices"]) if text.startswith(c.lower())]
                # The longest choice the answer begins with ("New York City" over "New York"); none: wrong.
                record["generate_pred"] = max(matches, key=lambda i: len(record["choices"][i])) if matches else None
                continue
            logprobs = [float(x) for x in result]
            lengths = [len(c) for c in record["choices"]]
            record["score_logprobs"] = [round(x, 5) for x in logprobs]
            record["score_pred"] = int(np.argmax(logprobs))
            record["score_norm_pred"] = int(np.argmax(np.asarray(logprobs) / np.asarray(lengths)))

    def score(self, records: list[dict], seconds: dict | None = None, **extra) -> dict:
        metrics = {}
        for protocol, columns in (("score", {"acc": "score_pred", "acc_norm": "score_norm_pred"}),
                                  ("generate", {"acc": "generate_pred"})):
            scored = [r for r in records if next(iter(columns.values())) in r]
            if not scored:
                continue
            weights = bootstrap_weights(len(scored)).astype(float)
            values = {"n": len(scored), "ci95": {}}
            for metric, key in columns.items():
                right = np.asarray([r[key] == r["label"] for r in scored], dtype=float)
                values[metric] = float(right.mean())
                values["ci95"][metric] = mean_interval(right, weights)
            if seconds and protocol in seconds:
                values["seconds"] = round(seconds[protocol], 3)
            metrics[protocol] = values
        return metrics

    def paired(self, before: list[dict], after: list[dict]) -> dict:
        out = {}
        after_by_id = {r["id"]: r for r in after}
        for protocol, key in (("score", "score_pred"), ("generate", "generate_pred")):
            pairs = [(b, after_by_id[b["id"]]) for b in before
                     if key in b and b["id"] in after_by_id and key in after_by_id[b["id"]]]
            if not pairs:
                continue
            was = [b[key] == b["label"] for b, _ in pairs]
            now = [a[key] == a["label"] for _, a in pairs]
            out[protocol] = {"n": len(pairs), "metric": "acc", "mcnemar": mcnemar_exact(was, now),
                             "gain": paired_difference(was, now, bootstrap_weights(len(pairs)))}
        return out

    def protocol_notes(self, proto: dict) -> list[str]:
        return ["- `score`: log-likelihood of each choice (after a space) following the prompt; `acc` takes the "
                "highest sum, `acc_norm` the highest per character of the choice (lm-evaluation-harness's).",
                "- `generate`: greedy answer; the choice it begins with, else wrong."]

