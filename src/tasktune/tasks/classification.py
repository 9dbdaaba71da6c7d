"""Classification with any number of labels, declared by a task spec (`tasks/sst2.yaml` is one): the prompt is
the spec's template, each label has a verbalizer, and two protocols judge the model.

- `score`: the log-likelihood of each verbalizer after the prompt, argmax (lm-evaluation-harness's
  multiple-choice protocol). A verbalizer of several tokens scores the sum of its tokens' log-probabilities.
- `generate`: greedy generation; the label whose verbalizer words open the first line, else None (wrong).
"""

from __future__ import annotations

import re

from tasktune import inference_requests as req
from tasktune.data import table
from tasktune.data.sampling import sample
from tasktune.data.split import (containment_split, split_errors, stratified_split, text_overlap,
                                 validation_size, whole_sentences)
from tasktune.errors import TasktuneError
from tasktune.metrics.classification import classification_metrics
from tasktune.metrics.intervals import bootstrap_weights, classification_intervals, mcnemar_exact, paired_difference
from tasktune.tasks.base import TaskOptions, TaskType, register_task_type
from tasktune.tasks.spec import TaskSpec, check_verbalizers


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def is_whole_sentence(example: dict) -> bool:
    """A row of a sentence-split classification file that no other row contains (SST-2's headline rows)."""
    return example.get("sentence") is True


@register_task_type
class ClassificationTask(TaskType):
    type_name = "classification"
    split_policies = ("sentence", "row")
    objectives = ("verbalizer", "label_lm", "lm", "seqcls")
    hub_task = ("text-classification", "Text Classification")
    takes_verbalizers = True

    @classmethod
    def check_spec(cls, spec) -> None:
        where = spec.source
        if spec.data.columns:
            raise TasktuneError(f"{where}: data.columns maps question fields (extractive_qa); a classification "
                                "task names its columns with data.text_column and data.label_column")
        if len(spec.labels) < 2:
            raise TasktuneError(f"{where}: a classification task needs at least 2 labels, got {len(spec.labels)}")
        check_verbalizers([label.verbalizer for label in spec.labels], where)
        names = [label.name for label in spec.labels]
        if len(set(names)) != len(names):
            raise TasktuneError(f"{where}: label names {names} are not unique")
        seen: dict[str, str] = {}
        for label in spec.labels:
            for value in label.values or [label.name]:
                key = value.strip().lower()
                if key in seen and seen[key] != label.name:
                    raise TasktuneError(f"{where}: data value {value!r} stands for both {seen[key]!r} and "
                                        f"{label.name!r}")
                seen[key] = label.name

    @classmethod
    def default_objective(cls, single_token_verbalizers: bool) -> str:
        """`verbalizer` when every verbalizer is one token (the fast objectives read one LM-head row per label),
        else `lm`, the objective multi-token verbalizers allow."""
        return "verbalizer" if single_token_verbalizers else "lm"

    def __init__(self, spec: TaskSpec, options: TaskOptions = TaskOptions()):
        """`options.verbalizers` (a recipe's eval.verbalizers) replaces the spec's, one per label in order."""
        verbalizers = options.verbalizers
        self.spec = spec
        self.name = spec.name
        self.template = spec.template
        self.label_names = [label.name for label in spec.labels]
        self.verbalizers = tuple(verbalizers or [label.verbalizer for label in spec.labels])
        if len(self.verbalizers) != len(self.label_names):
            raise TasktuneError(f"eval.verbalizers {list(self.verbalizers)} must give one word per label of "
                                f"{spec.name!r} ({self.label_names}, in that order)")
        check_verbalizers(list(self.verbalizers), "eval.verbalizers")
        self.max_new_tokens = spec.max_new_tokens
        self.metric_for_best = spec.headline or "accuracy"

    def prompt(self, example: dict) -> str:
        return self.template.format(**example["fields"])

    def target(self, example: dict) -> str:
        return self.verbalizers[example["label"]]

    def parse(self, generated: str) -> int | None:
        """The label whose verbalizer words open the first line of the generation, else None."""
        first = words(generated.strip().split("\n", 1)[0])
        for index, verbalizer in enumerate(self.verbalizers):
            expected = words(verbalizer)
            if first[: len(expected)] == expected:
                return index
        return None

    def verbalizer_tokens(self, builder, example: dict) -> list[list[int]]:
        """Each verbalizer's token ids as they follow the prompt in the final context (a chat template or a
        tokenizer's merges can change a label's first token, so it is never tokenized alone)."""
        context = builder.render(example)
        base = builder.encode(context)
        sequences = []
        for verbalizer in self.verbalizers:
            full = builder.encode(context + verbalizer)
            if full[: len(base)] != base or len(full) == len(base):
                pieces = builder.tokenizer.convert_ids_to_tokens(full[max(len(base) - 1, 0):])
                raise TasktuneError(f"{self.spec.source}: verbalizer {verbalizer!r} does not extend the prompt's tokens for this tokenizer "
                                    f"(the prompt's last token merges with it: {pieces}); start it with a space")
            sequences.append(full[len(base):])
        if len({tuple(s) for s in sequences}) != len(sequences):
            raise TasktuneError(f"{self.spec.source}: verbalizers {list(self.verbalizers)} tokenize to the same tokens {sequences}: the "
                                "labels cannot be told apart")
        return sequences

    def label_token_ids(self, builder, example: dict) -> list[int] | None:
        """One token per label when every verbalizer is a single token (the fast objectives need it), else None."""
        sequences = self.verbalizer_tokens(builder, example)
        return [s[0] for s in sequences] if all(len(s) == 1 for s in sequences) else None

    def generation_tokens(self, builder, example: dict) -> int:
        return self.max_new_tokens or max(len(s) for s in self.verbalizer_tokens(builder, example)) + 1

    # --- data -------------------------------------------------------------------------------------
    def load(self, path: str | None) -> tuple[list[dict], str]:
        return table.load(self.spec, path)

    def split(self, rows: list[dict], data_cfg) -> dict[str, list[int]]:
        """Train/test, then a validation slice of the training part, stratified by label. `sentence` (the
        default) splits whole sentences so that no test or validation row occurs inside a training row
        (GLUE's file holds every phrase of a sentence as a row); `row` is the seed's row-level split."""
        labels = [r["label"] for r in rows]
        texts = [r["text"] for r in rows]
        by_sentence = self.split_policy(data_cfg) == "sentence"

        def two_way(positions: list[int], fraction: float, key: str) -> tuple[list[int], list[int]]:
            part_labels = [labels[i] for i in positions]
            with split_errors(key, len(positions)):
                if by_sentence:
                    a, b = containment_split([texts[i] for i in positions], part_labels, fraction, data_cfg.seed)
                else:
                    a, b = stratified_split(part_labels, fraction, data_cfg.seed)
            return [positions[i] for i in a], [positions[i] for i in b]

        if by_sentence:  # which rows are whole sentences (the headline) and which are phrases of one
            for row, whole in zip(rows, whole_sentences(texts)):
                row["sentence"] = whole
        train, test = two_way(list(range(len(rows))), data_cfg.test_size, "data.test_size")
        fit, val = two_way(train, validation_size(data_cfg.val_size, len(train)) / len(train), "data.val_size")
        ids = [r["id"] for r in rows]  # positions → row ids, which is what the run directory records
        return {"train": [ids[i] for i in fit], "validation": [ids[i] for i in val], "test": [ids[i] for i in test]}


    def overlap(self, train: list[dict], test: list[dict]) -> dict:
        """How much of the test set the training part (training and validation rows) has seen."""
        return text_overlap([r["text"] for r in test], [r["text"] for r in train])


    # --- sampling: whole sentences first ------------------------------------------------------------
    def sampled_first(self, row: dict) -> bool:
        """Validation and test samples take every whole sentence first: the headline is measured on them."""
        return is_whole_sentence(row)

    def training_sample(self, rows: list[dict], data_cfg) -> list[dict]:
        """The training rows a run uses: data.limit_train of them (seeded), and with data.train_sentences that share
        of them whole sentences, the rest phrases. SST-2's file is nine phrases to a sentence, so a uniform sample
        trains mostly on fragments while the headline is whole sentences. Where one kind runs out, the sample
        shrinks to keep the share exact (and says so, when data.limit_train asked for more) rather than drifting
        back toward the file's mix."""
        share = data_cfg.train_sentences
        if share is None or not any("sentence" in r for r in rows):  # no share asked, or no flags to take it by
            return super().training_sample(rows, data_cfg)
        sentences = [r for r in rows if is_whole_sentence(r)]
        phrases = [r for r in rows if not is_whole_sentence(r)]
        wanted = len(rows) if data_cfg.limit_train is None else min(data_cfg.limit_train, len(rows))
        size = wanted  # the largest sample at exactly this share that the rows allow
        if share > 0:
            size = min(size, int(len(sentences) / share))
        if share < 1:
            size = min(size, int(len(phrases) / (1 - share)))
        if size == 0:
            raise TasktuneError(f"data.train_sentences={share}: the training part has {len(sentences)} whole sentences "
                                f"and {len(phrases)} phrases, so no sample has that share")
        n_sentences = min(len(sentences), round(share * size))
        n_phrases = min(len(phrases), size - n_sentences)
        if data_cfg.limit_train is not None and n_sentences + n_phrases < wanted:  # unset: as many as the share allows
            print(f"[tasktune] data.train_sentences={share}: {len(sentences)} whole sentences and {len(phrases)} "
                  f"phrases give {n_sentences + n_phrases} training rows at that share, not {wanted}")
        chosen = {r["id"] for r in sample(sentences, n_sentences, data_cfg.seed)
                  + sample(phrases, n_phrases, data_cfg.seed)}
        return [r for r in rows if r["id"] in chosen]

    # --- training ---------------------------------------------------------------------------------
    def train_features(self, builder, examples: list[dict], objective, max_length: int,
                       label_token_ids: list[int] | None, questions_per_context: int = 1) -> list[dict]:
        if questions_per_context != 1:  # refused in the recipe check (config.validate) already
            raise TasktuneError("train.questions_per_context applies to extractive QA only")

        tokens = objective.labels == "tokens"
        targets = self.verbalizer_tokens(builder, examples[0]) if tokens else None
        longest = max(len(t) for t in targets) if targets else 1
        if max_length < longest + 8:  # a slice of [-0:] or less would keep the whole prompt, not cut it
            raise TasktuneError(f"train.max_length={max_length} leaves no room for a prompt before the "
                                f"{longest}-token answer: expected at least {longest + 8}")
        features = []
        for ex in examples:
            if tokens:  # causal-LM loss on the verbalizer's tokens
                target = targets[ex["label"]]
                ids = builder.encode(builder.render(ex))[-(max_length - len(target)):]  # keep the prompt's end
                features.append({"input_ids": ids + target, "labels": [-100] * len(ids) + target})
                continue
            ids = builder.encode(builder.render(ex))[-(max_length - 1):]  # keep the question and "Answer:"
            features.append({"input_ids": ids, "labels": ex["label"]})  # one class id per row
        return features

    # --- evaluation: requests for the runner, and records from its results -----------------------------
    sampled_protocols = ("generate",)  # eval.limit_generate applies to these
    calibration_protocol = None  # argmax decides: no threshold to choose on the validation slice

    def protocols(self, requested: list[str], head: str = "causal_lm") -> list[str]:
        return ["classifier"] if head == "seqcls" else list(requested)

    def validation_protocol(self, head: str = "causal_lm") -> str:
        """Early stopping reads `score`-protocol accuracy (the classifier head's for seqcls)."""
        return "classifier" if head == "seqcls" else "score"

    def new_records(self, examples: list[dict]) -> list[dict]:
        return [{"id": ex["id"], "text": ex["text"], "label": ex["label"],
                 **({"sentence": ex["sentence"]} if "sentence" in ex else {})} for ex in examples]

    def requests(self, builder, examples: list[dict], protocol: str) -> tuple[list, list[dict]]:
        """One request per example for `protocol`, and nothing extra to record."""
        encoded = [tuple(builder.encode(builder.render(ex))) for ex in examples]
        if protocol == "classifier":
            requests = [req.Classify(ids) for ids in encoded]
        elif protocol == "score":
            continuations = tuple(tuple(s) for s in self.verbalizer_tokens(builder, examples[0]))
            requests = [req.Score(ids, continuations) for ids in encoded]
        else:
            new_tokens = self.generation_tokens(builder, examples[0])
            requests = [req.Generate(ids, new_tokens) for ids in encoded]
        return requests, [{} for _ in examples]

    def read_results(self, records: list[dict], protocol: str, results: list) -> None:
        for rec, result in zip(records, results):
            if protocol == "generate":
                rec["generate_text"], rec["generate_pred"] = result.text, self.parse(result.text)
                continue
            rec[f"{protocol}_pred"] = max(range(len(result)), key=result.__getitem__)
            if protocol == "score":
                rec["score_logprobs"] = [round(x, 5) for x in result]

    def validation_metrics(self, records: list[dict]) -> dict:
        metrics = self.score(records)
        protocol = "classifier" if "classifier" in metrics else "score"
        return {self.metric_for_best: metrics[protocol][self.metric_for_best]}

    def score(self, records: list[dict], seconds: dict | None = None) -> dict:
        """Metrics per protocol from prediction records (which may come from several processes)."""
        metrics = {}
        for protocol in ("classifier", "score", "generate"):
            scored = [r for r in records if f"{protocol}_pred" in r]
            if not scored:
                continue
            golds, preds = [r["label"] for r in scored], [r[f"{protocol}_pred"] for r in scored]
            metrics[protocol] = classification_metrics(golds, preds, self.label_names)
            metrics[protocol]["ci95"] = classification_intervals(golds, preds, len(self.verbalizers),
                                                                 bootstrap_weights(len(scored)))
            if seconds and protocol in seconds:
                metrics[protocol]["seconds"] = round(seconds[protocol], 3)
                metrics[protocol]["examples_per_second"] = round(len(scored) / seconds[protocol], 2)
        # Whole sentences apart from phrases (a sentence-split classification test set): the sentences are the
        # headline, since they are what users mean by the task; the phrases are reported beside them.
        flags = {r.get("sentence") for r in records}
        if flags == {True, False}:
            for protocol in [p for p in ("classifier", "score", "generate") if p in metrics]:
                for part, keep in (("sentences", True), ("phrases", False)):
                    subset = [r for r in records if f"{protocol}_pred" in r and r["sentence"] is keep]
                    if subset:
                        golds, preds = [r["label"] for r in subset], [r[f"{protocol}_pred"] for r in subset]
                        values = classification_metrics(golds, preds, self.label_names)
                        values["ci95"] = classification_intervals(golds, preds, len(self.verbalizers),
                                                                  bootstrap_weights(len(subset)))
                        metrics[f"{protocol}_{part}"] = values
        return metrics

    def paired(self, before: list[dict], after: list[dict]) -> dict:
        """Zero-shot vs fine-tuned on the same test examples, per protocol: the accuracy gain with its paired
        bootstrap interval, and the exact McNemar test on the per-example outcomes."""
        out = {}
        after_by_id = {r["id"]: r for r in after}
        parts = [("", None)] + ([("_sentences", True), ("_phrases", False)]
                                if {r.get("sentence") for r in before} == {True, False} else [])
        for part, keep in parts:
            for protocol in ("score", "generate", "classifier"):
                key_after = "classifier_pred" if protocol == "classifier" else f"{protocol}_pred"
                key_before = "score_pred" if protocol == "classifier" else key_after  # seqcls: vs zero-shot score
                pairs = [(b, after_by_id[b["id"]]) for b in before
                         if key_before in b and b["id"] in after_by_id and key_after in after_by_id[b["id"]]
                         and (keep is None or b.get("sentence") is keep)]
                if not pairs:
                    continue
                was = [b[key_before] == b["label"] for b, _ in pairs]
                now = [a[key_after] == a["label"] for _, a in pairs]
                out[protocol + part] = {"n": len(pairs), "metric": "accuracy", "mcnemar": mcnemar_exact(was, now),
                                        "gain": paired_difference(was, now, bootstrap_weights(len(pairs)))}
        return out

    # --- reporting --------------------------------------------------------------------------------
    report_rows = ("accuracy", "precision", "recall", "f1", "f1_macro", "none_rate", "n")

    def report_columns(self, metrics: dict) -> list[tuple[str, dict]]:
        """Whole sentences first (the headline), then every test row per protocol, then the phrases."""
        columns = [(name, values) for name, values in metrics.items()
                   if isinstance(values, dict) and "accuracy" in values]
        rank = {"sentences": 0, "phrases": 2}
        return sorted(columns, key=lambda c: rank.get(c[0].rsplit("_", 1)[-1], 1))

    def protocol_notes(self, proto: dict) -> list[str]:
        pairs = ", ".join(f"{name} → {v!r}" for name, v in zip(self.label_names, self.verbalizers))
        ids = proto.get("label_token_ids")
        return [f"- labels and verbalizers: {pairs}; " + (f"token ids {ids}" if ids else
                                                        "several tokens each (log-probabilities summed)"),
                "- `score`: log-likelihood of each verbalizer after the prompt (summed over its tokens), argmax "
                "(never None).",
                "- `generate`: greedy generation; the label whose verbalizer opens the first line, else None (wrong)."]

    def changed_example(self, old: dict, new: dict):
        key = "score_pred" if "score_pred" in new else "classifier_pred"
        if "score_pred" not in old or key not in new:
            return None
        names = self.label_names
        return (old["score_pred"] == old["label"], new[key] == new["label"],
                {"text": new["text"], "gold": names[new["label"]], "zero-shot": names[old["score_pred"]],
                 "fine-tuned": names[new[key]]})

    def report_plots(self, zeroshot, finetuned, columns, out):
        from tasktune import plots

        return [("Confusion matrices", plots.confusion_matrices(zeroshot, finetuned, "score", self.label_names,
                                                                out / "confusion_score.png")),
                ("Zero-shot vs fine-tuned", plots.metric_bars(columns, ["accuracy", "f1", "f1_macro", "none_rate"],
                                                             f"{self.name} test metrics", out / "metrics.png"))]

    def hub_eval_rows(self, finetuned: dict) -> list[tuple[str, float, str]]:
        protocol = "score" if "score" in finetuned else "classifier"
        rows = []
        for column in (f"{protocol}_sentences", protocol, f"{protocol}_phrases"):
            rows_of = {f"{protocol}_sentences": "whole sentences of the test split",
                       f"{protocol}_phrases": "phrase rows of the test split"}.get(column, "test split")
            for key in ("accuracy", "f1", "precision", "recall"):
                if key in finetuned.get(column, {}):
                    kind = rows_of if key == "accuracy" else f"weighted, {rows_of}"
                    rows.append((key, round(finetuned[column][key], 4), f"{key} ({protocol} protocol, {kind})"))
        return rows

    def compare_figures(self, metrics: dict) -> dict:
        protocol = "score" if "score" in metrics else "classifier"
        out = {}
        for column, suffix in ((f"{protocol}_sentences", "_sentences"), (protocol, "")):
            for key in ("accuracy", "f1", "f1_macro"):
                if key in metrics.get(column, {}):
                    out[f"{key}{suffix}"] = metrics[column][key]
        return out

    def summary(self, metrics: dict) -> str:
        return " | ".join(f"{name} accuracy {m['accuracy']:.4f} f1 {m['f1']:.4f} none {m['none_rate']:.3f} "
                          f"n {m['n']}" for name, m in self.report_columns(metrics))
