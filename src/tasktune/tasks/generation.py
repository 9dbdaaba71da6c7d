"""Free-form generation from instruction or chat data: the model writes an answer, judged against a reference by
the spec's metrics (`metrics.generation`: exact, contains, regex, json_fields, chrf, rouge_l, bleu).

Data, one row per answer (JSON lines, CSV, Parquet, or a hub dataset), in either shape:
- chat: a `messages` list as TRL and OpenAI write it (`{"role": "system"|"user"|"assistant", "content": ...}`);
  the last turn must be the assistant's and is the target, the turns before it are the context. With
  `eval.prompt_format: chat` they go through the model's chat template; with `plain` the template's
  `{conversation}` field holds them as "User: ..." / "Assistant: ..." lines.
- columns: the template names the prompt's columns (Alpaca's `{instruction}`, `{input}`) and `data.columns.target`
  the answer's (default `output`).
`generate`: greedy decoding until the EOS token (or a chat template's end of turn), a `stop` text of the spec, or
`max_new_tokens`; the answer is stripped. Training: the causal-LM loss on the answer's tokens and the EOS token
(the `lm` objective), the prompt masked.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np

from tasktune import inference_requests as req
from tasktune.errors import TasktuneError
from tasktune.metrics.generation import BINARY, METRIC_COLUMNS, row_scores
from tasktune.metrics.intervals import bootstrap_weights, mcnemar_exact, mean_interval, paired_difference
from tasktune.tasks.base import TaskOptions, TaskType, register_task_type

ROLES = ("system", "user", "assistant")
PLAIN_ROLE = {"system": "System", "user": "User", "assistant": "Assistant"}
DEFAULT_MAX_NEW_TOKENS = 64


def plain_conversation(turns: list[dict]) -> str:
    """Turns as plain text for a base model: "User: ..." lines, one turn after another."""
    return "\n".join(f"{PLAIN_ROLE[t['role']]}: {t['content']}" for t in turns)


@register_task_type
class GenerationTask(TaskType):
    type_name = "generation"
    split_policies = ("row",)
    objectives = ("lm",)
    hub_task = ("text-generation", "Text Generation")

    def __init__(self, spec, options: TaskOptions = TaskOptions()):
        self.spec, self.name = spec, spec.name
        self.metrics = list(spec.metrics)
        self.metric_for_best = spec.headline or METRIC_COLUMNS[self.metrics[0]][0]
        self.report_rows = (*self.columns(), "n")
        self.max_new_tokens = spec.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        self.pattern = re.compile(spec.regex) if spec.regex else None
        self.messages_column = spec.data.columns.get("messages", "messages")
        self.target_column = spec.data.columns.get("target", "output")
        self.chat_data = "conversation" in self.named_fields()

    def columns(self) -> list[str]:
        return [column for metric in self.metrics for column in METRIC_COLUMNS[metric]]

    @classmethod
    def check_spec(cls, spec) -> None:
        where = spec.source
        if not spec.metrics:
            raise TasktuneError(f"{where}: a generation task needs metrics (one or more of {sorted(METRIC_COLUMNS)})")
        unknown = [m for m in spec.metrics if m not in METRIC_COLUMNS]
        if unknown or len(set(spec.metrics)) != len(spec.metrics):
            raise TasktuneError(f"{where}: metrics {spec.metrics} must be different names from "
                                f"{sorted(METRIC_COLUMNS)}")
        columns = [c for m in spec.metrics for c in METRIC_COLUMNS[m]]
        if spec.headline and spec.headline not in columns:
            raise TasktuneError(f"{where}: headline {spec.headline!r} is not one of the metrics' figures {columns}")
        if ("regex" in spec.metrics) != bool(spec.regex):
            raise TasktuneError(f"{where}: the regex metric and the `regex:` pattern go together (got metrics "
                                f"{spec.metrics}, regex {spec.regex!r})")
        if spec.regex:
            try:
                re.compile(spec.regex)
            except re.error as exc:
                raise TasktuneError(f"{where}: regex {spec.regex!r} is not a valid pattern ({exc})") from None
        if any(not isinstance(s, str) or not s for s in spec.stop):
            raise TasktuneError(f"{where}: stop {spec.stop} must be non-empty texts")
        if spec.labels:
            raise TasktuneError(f"{where}: a generation task has a reference answer per row, not labels")
        unknown_columns = sorted(set(spec.data.columns) - {"messages", "target"})
        if unknown_columns:
            raise TasktuneError(f"{where}: data.columns {unknown_columns} do not apply to a generation task "
                                "(expected messages and target)")
        from tasktune.prompt_template import template_fields

        fields = template_fields(spec.template, where)
        if "conversation" in fields and len(fields) > 1:
            raise TasktuneError(f"{where}: template field {{conversation}} (chat data) goes alone; got "
                                f"{sorted(fields)}")

    # --- prompting -------------------------------------------------------------------------------------------
    def prompt(self, example: dict) -> str:
        return self.spec.template.format(**example["fields"])

    def target(self, example: dict) -> str:
        return " " + example["answer"]

    def chat_turns(self, example: dict) -> list[dict] | None:
        return example.get("turns")

    def continuation(self, builder, example: dict) -> tuple[list[int], list[int]]:
        """The prompt's tokens and the answer's as they follow it, ending with the EOS token (or, under a chat
        template, the template's own end of the assistant turn), so the model learns to stop."""
        context = builder.render(example)
        ids = builder.encode(context)
        if builder.format == "chat":
            turns = [*builder.turns(example), {"role": "assistant", "content": example["answer"]}]
            full = builder.tokenizer.apply_chat_template(turns, tokenize=False)
            if full.startswith(context):
                return ids, builder.encode(full)[len(ids):]
        answer = builder.encode(context + self.target(example))[len(ids):]
        eos = builder.tokenizer.eos_token_id
        return ids, answer + ([eos] if eos is not None else [])

    def stop_texts(self, builder) -> tuple[str, ...]:
        """What ends an answer: the spec's stop texts, the EOS token, and under a chat template the text its
        assistant turn ends with (Gemma's `<end_of_turn>`: not the EOS token of every checkpoint)."""
        stops = list(self.spec.stop)
        if builder.tokenizer.eos_token:
            stops.append(builder.tokenizer.eos_token)
        if builder.format == "chat":
            probe = builder.tokenizer.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ANSWER"}], tokenize=False)
            end = probe.split("ANSWER", 1)[-1].strip()
            if end:
                stops.append(end)
        return tuple(dict.fromkeys(stops))

    # --- data ------------------------------------------------------------------------------------------------
    def load(self, path: str | None) -> tuple[list[dict], str]:
        from tasktune.data import format_suffix, hub, resolve
        from tasktune.data.table import json_objects, pick_files

        files = resolve(self.spec, path, pick_files(self.spec))
        if isinstance(files, hub.HubSource):
            dataset = hub.load(files, self.spec.name)
            records = ((i, dict(r)) for i, r in enumerate(dataset))
            source, unit = str(files), "row"
        else:
            file = Path(files[0])
            suffix = format_suffix(file)
            readers = {".jsonl": json_objects, ".csv": self.csv_rows, ".parquet": self.parquet_rows}
            if suffix not in readers:
                raise TasktuneError(f"{file}: a generation task reads .jsonl, .csv or .parquet files (optionally "
                                    f".gz for the first two), not {suffix or 'a file without a suffix'}")
            records, source = readers[suffix](file), str(file)
            unit = "line" if suffix in (".jsonl", ".csv") else "row"
        rows = [self.row(record, i, f"{source}, {unit} {n}") for i, (n, record) in enumerate(records)]
        if not rows:
            raise TasktuneError(f"{source} holds no rows (expected one example per row)")
        return rows, source

    @staticmethod
    def csv_rows(file: Path):
        from tasktune.data import read_text

        reader = csv.DictReader(io.StringIO(read_text(file), newline=""), strict=True)
        try:
            for values in reader:
                if None in values or None in values.values():
                    raise TasktuneError(f"{file}, line {reader.line_num}: {len(values) - (None in values)} "
                                        f"columns where the header has {len(reader.fieldnames)}")
                yield reader.line_num, values
        except csv.Error as exc:
            raise TasktuneError(f"{file}, line {reader.line_num}: not valid CSV ({exc})") from None

    @staticmethod
    def parquet_rows(file: Path):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(file)
        except Exception as exc:  # pyarrow raises its own error kinds for a file that is not Parquet
            raise TasktuneError(f"{file}: not a readable Parquet file ({exc})") from None
        return enumerate(table.to_pylist(), start=1)

    def row(self, record: dict, row_id: int, where: str) -> dict:
        """One example as the stages use it: `fields` for the template, `turns` (chat data), `answer`."""
        if self.chat_data:
            turns = record.get(self.messages_column)
            if not isinstance(turns, list) or not turns:
                raise TasktuneError(f"{where}: {self.messages_column!r} must be a list of turns, got {turns!r:.80}")
            for i, turn in enumerate(turns):
                if (not isinstance(turn, dict) or turn.get("role") not in ROLES
                        or not isinstance(turn.get("content"), str)):
                    raise TasktuneError(f"{where}: turn {i} of {self.messages_column!r} must be {{\"role\": one of "
                                        f"{list(ROLES)}, \"content\": text}}, got {turn!r:.80}")
            if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
                raise TasktuneError(f"{where}: the last turn of {self.messages_column!r} must be the assistant's "
                                    "non-empty answer (the target)")
            if not any(t["role"] == "user" for t in turns[:-1]):
                raise TasktuneError(f"{where}: {self.messages_column!r} has no user turn before the answer")
            context = turns[:-1]
            fields = {"conversation": plain_conversation(context)}
            answer = turns[-1]["content"].strip()
        else:
            fields = self.template_values(record, where)
            answer = record.get(self.target_column)
            if not isinstance(answer, str) or not answer.strip():
                raise TasktuneError(f"{where}: the target {self.target_column!r} must be non-empty text, got "
                                    f"{answer!r:.80}")
            answer, context = answer.strip(), None
        if "json_fields" in self.metrics:
            try:
                reference = json.loads(answer)
            except json.JSONDecodeError as exc:
                raise TasktuneError(f"{where}: the target is not valid JSON ({exc.msg}), which the json_fields "
                                    f"metric needs: {answer!r:.80}") from None
            if not isinstance(reference, dict) or not reference:
                raise TasktuneError(f"{where}: the target must be a JSON object with fields for the json_fields "
                                    f"metric, got {answer!r:.80}")
        row = {"id": row_id, "fields": fields, "answer": answer, "text": self.spec.template.format(**fields)}
        if context is not None:
            row["turns"] = context
        return row

    def overlap(self, train: list[dict], test: list[dict]) -> dict:
        """Test prompts seen in training, exactly or inside a training prompt, and near-duplicates: a test prompt
        whose word 5-grams are mostly (Jaccard >= 0.8) a training prompt's (`data.split.near_duplicates`)."""
        from tasktune.data.split import near_duplicates, text_overlap

        test_prompts, train_prompts = [self.prompt(r) for r in test], [self.prompt(r) for r in train]
        out = text_overlap(test_prompts, train_prompts)
        near = near_duplicates(test_prompts, train_prompts)
        out.update({"near_duplicates": near, "near_duplicate_rate": near / len(test) if test else 0.0})
        return out

    # --- training --------------------------------------------------------------------------------------------
    def train_features(self, builder, examples: list[dict], objective, max_length: int,
                       label_token_ids: list[int] | None, questions_per_context: int = 1) -> list[dict]:
        features = []
        for ex in examples:
            ids, answer = self.continuation(builder, ex)
            answer = answer[:max_length - 1]
            ids = ids[-max(max_length - len(answer), 1):]  # the prompt's start gives way to the answer
            features.append({"input_ids": ids + answer, "labels": [-100] * len(ids) + answer})
        return features

    # --- requests and metrics --------------------------------------------------------------------------------
    def validation_protocol(self, head: str = "causal_lm") -> str:
        return "generate"

    def protocols(self, requested: list[str], head: str = "causal_lm") -> list[str]:
        return ["generate"]  # free text has one protocol, whatever eval.protocols lists (as extractive QA)

    def new_records(self, examples: list[dict]) -> list[dict]:
        return [{"id": ex["id"], "target": ex["answer"], "prompt": ex["text"][-400:]} for ex in examples]

    def requests(self, builder, examples: list[dict], protocol: str) -> tuple[list, list[dict]]:
        if protocol != "generate":
            raise TasktuneError(f"protocol {protocol!r} does not apply to a generation task (expected generate)")
        stops = self.stop_texts(builder)
        requests = [req.Generate(tuple(builder.encode(builder.render(ex))), self.max_new_tokens,
                                 stop_strings=stops) for ex in examples]
        return requests, [{} for _ in examples]

    def read_results(self, records: list[dict], protocol: str, results: list) -> None:
        for record, result in zip(records, results):
            text = result.text
            for stop in self.spec.stop:  # the runner cut at the first stop; a spec's stop may sit inside a token
                text = text.split(stop, 1)[0]
            record["generate_text"] = text.strip()
            record["generate_scores"] = {k: round(v, 6) for k, v in row_scores(
                record["generate_text"], record["target"], self.metrics, self.pattern).items()}

    def score(self, records: list[dict], seconds: dict | None = None, **extra) -> dict:
        scored = [r for r in records if "generate_scores" in r]
        if not scored:
            return {}
        weights = bootstrap_weights(len(scored))
        values: dict = {"n": len(scored), "ci95": {}}
        for column in self.columns():
            per_row = np.asarray([r["generate_scores"][column] for r in scored], dtype=float)
            values[column] = float(per_row.mean())
            values["ci95"][column] = mean_interval(per_row, weights)
        values["empty_rate"] = float(np.mean([not r["generate_text"] for r in scored]))
        if seconds and "generate" in seconds:
            values["seconds"] = round(seconds["generate"], 3)
        return {"generate": values}

    def paired(self, before: list[dict], after: list[dict]) -> dict:
        after_by_id = {r["id"]: r for r in after}
        pairs = [(b, after_by_id[b["id"]]) for b in before
                 if "generate_scores" in b and "generate_scores" in after_by_id.get(b["id"], {})]
        if not pairs:
            return {}
        metric = self.metric_for_best
        was = [b["generate_scores"][metric] for b, _ in pairs]
        now = [a["generate_scores"][metric] for _, a in pairs]
        out = {"n": len(pairs), "metric": metric, "gain": paired_difference(was, now, bootstrap_weights(len(pairs)))}
        if metric in BINARY:
            out["mcnemar"] = mcnemar_exact([w == 1 for w in was], [n == 1 for n in now])
        return {"generate": out}

    def changed_example(self, old: dict, new: dict) -> tuple[bool, bool, dict] | None:
        """A win or a loss on the headline: for a 0/1 metric right and wrong, for a graded one (chrF, ROUGE-L,
        BLEU, a share of fields) whether the fine-tuned answer scored higher or lower."""
        if "generate_scores" not in old or "generate_scores" not in new:
            return None
        was, now = old["generate_scores"][self.metric_for_best], new["generate_scores"][self.metric_for_best]
        row = {"text": new.get("prompt", "")[-160:], "gold": new["target"],
               "zero-shot": old["generate_text"], "fine-tuned": new["generate_text"]}
        if self.metric_for_best in BINARY:
            return was == 1, now == 1, row
        return (was > now, now > was, row) if was != now else (True, True, row)

    def change_names(self) -> tuple[str, str]:
        if self.metric_for_best in BINARY:
            return super().change_names()
        return f"{self.metric_for_best} rose", f"{self.metric_for_best} fell"

    def decision_key(self, column: str) -> str:
        return "generate_text"  # the answer itself: every metric reads it

    def protocol_notes(self, proto: dict) -> list[str]:
        return [f"- `generate`: greedy answer (at most {self.max_new_tokens} new tokens, ended by the EOS token"
                + (f" or {self.spec.stop}" if self.spec.stop else "") + "), judged by "
                + ", ".join(self.metrics) + f"; headline `{self.metric_for_best}` (95% bootstrap intervals over "
                "rows; paired bootstrap, and exact McNemar for a 0/1 headline)."]
