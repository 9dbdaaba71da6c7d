"""SST-2: binary sentiment, scored by verbalizer log-likelihood or by parsing a greedy generation."""

from __future__ import annotations

import re
import time

from tasktune import infer
from tasktune.data import sst2 as sst2_data
from tasktune.data.split import containment_split, stratified_split, text_overlap
from tasktune.metrics.classification import classification_metrics
from tasktune.metrics.intervals import bootstrap_weights, classification_intervals, mcnemar_exact, paired_difference

from tasktune.errors import TasktuneError


class SST2Task:
    name = "sst2"
    # The lm-evaluation-harness prompt and verbalizers.
    template = "{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    verbalizers = (" negative", " positive")
    max_new_tokens = 3  # enough for " positive" plus a newline in any tokenizer we have met

    def prompt(self, example: dict) -> str:
        return self.template.format(sentence=example["sentence"])

    def target(self, example: dict) -> str:
        return self.verbalizers[example["label"]]

    def __init__(self, verbalizers: list[str] | None = None):
        if verbalizers:
            self.verbalizers = tuple(verbalizers)

    def parse(self, generated: str) -> int | None:
        """The label whose verbalizer is the first word of the first line, else None."""
        names = [v.strip().lower() for v in self.verbalizers]
        words = re.findall(r"\w+", generated.strip().split("\n", 1)[0].lower())
        if words and words[0] in names:
            return names.index(words[0])
        return None

    def label_token_ids(self, builder, example: dict) -> list[int]:
        """Token id of each verbalizer in the final context; each must be exactly one token."""
        context = builder.render(example)
        base = builder.encode(context)
        ids = []
        for verbalizer in self.verbalizers:
            full = builder.encode(context + verbalizer)
            if len(full) != len(base) + 1 or full[: len(base)] != base:
                pieces = builder.tokenizer.convert_ids_to_tokens(full[len(base) - 1:])
                raise TasktuneError(
                    f"verbalizer {verbalizer!r} is not a single token after the prompt for this tokenizer "
                    f"(it tokenizes as {pieces}); choose verbalizers that are one token each")
            ids.append(full[-1])
        if len(set(ids)) != len(ids):
            raise TasktuneError(f"verbalizers {self.verbalizers} map to the same token id {ids}")
        return ids

    # --- data -------------------------------------------------------------------------------------
    def load(self, path: str | None) -> tuple[list[dict], str]:
        return sst2_data.load(path)

    def split(self, rows: list[dict], data_cfg) -> dict[str, list[int]]:
        """Train/test, then a validation slice of the training part, stratified by label. `sentence` (the
        default) splits whole sentences so that no test or validation row occurs inside a training row
        (GLUE's file holds every phrase of a sentence as a row); `row` is the seed's row-level split."""
        labels = [r["label"] for r in rows]
        texts = [r["sentence"] for r in rows]
        by_sentence = self.split_policy(data_cfg) == "sentence"

        def two_way(positions: list[int], fraction: float) -> tuple[list[int], list[int]]:
            part_labels = [labels[i] for i in positions]
            if by_sentence:
                a, b = containment_split([texts[i] for i in positions], part_labels, fraction, data_cfg.seed)
            else:
                a, b = stratified_split(part_labels, fraction, data_cfg.seed)
            return [positions[i] for i in a], [positions[i] for i in b]

        train, test = two_way(list(range(len(rows))), data_cfg.test_size)
        fit, val = two_way(train, min(data_cfg.val_size, len(train) // 2) / len(train))
        ids = [r["id"] for r in rows]  # positions → row ids, which is what the run directory records
        return {"train": [ids[i] for i in fit], "validation": [ids[i] for i in val], "test": [ids[i] for i in test]}

    @staticmethod
    def split_policy(data_cfg) -> str:
        return data_cfg.split_by or "sentence"

    def overlap(self, train: list[dict], test: list[dict]) -> dict:
        """How much of the test set the training part (training and validation rows) has seen."""
        return text_overlap([r["sentence"] for r in test], [r["sentence"] for r in train])

    # --- training ---------------------------------------------------------------------------------
    metric_for_best = "accuracy"

    def train_features(self, builder, examples: list[dict], objective: str, max_length: int,
                       label_token_ids: list[int] | None) -> list[dict]:
        features = []
        for ex in examples:
            ids = builder.encode(builder.render(ex))[-(max_length - 1):]  # keep the question and "Answer:"
            if objective == "lm":
                target = label_token_ids[ex["label"]]
                features.append({"input_ids": ids + [target], "labels": [-100] * len(ids) + [target]})
            else:  # verbalizer, label_lm and seqcls: one class id per row
                features.append({"input_ids": ids, "labels": ex["label"]})
        return features

    def validation_metrics(self, model, builder, examples: list[dict], batch_size: int,
                           head: str = "causal_lm") -> dict:
        """Early-stopping metric: `score`-protocol accuracy (classifier head for seqcls)."""
        metrics, _ = self.evaluate(model, builder, examples, ["score"], batch_size, head=head)
        protocol = "classifier" if head == "seqcls" else "score"
        return {"accuracy": metrics[protocol]["accuracy"]}

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self, model, builder, examples: list[dict], protocols: list[str], batch_size: int,
                 head: str = "causal_lm", generate_ids: set[int] | None = None) -> tuple[dict, list[dict]]:
        """Metrics per protocol and one prediction record per example."""
        records, seconds = self.predict(model, builder, examples, protocols, batch_size, head, generate_ids)
        return self.score(records, seconds), records

    def predict(self, model, builder, examples: list[dict], protocols: list[str], batch_size: int,
                head: str = "causal_lm", generate_ids: set[int] | None = None) -> tuple[list[dict], dict]:
        """One prediction record per example, and the seconds each protocol took.

        `generate_ids` restricts the (slower) generate protocol to those example ids.
        """
        tok = builder.tokenizer
        encoded = [builder.encode(builder.render(ex)) for ex in examples]
        records = [{"id": ex["id"], "sentence": ex["sentence"], "label": ex["label"]} for ex in examples]
        seconds: dict = {}
        if head == "seqcls":
            protocols = ["classifier"]
        for protocol in protocols:
            start = time.perf_counter()
            if protocol == "classifier":
                preds = infer.classify(model, encoded, tok.pad_token_id, batch_size).argmax(-1).tolist()
                for rec, p in zip(records, preds):
                    rec["classifier_pred"] = p
            elif protocol == "score":
                token_ids = self.label_token_ids(builder, examples[0])
                logprobs = infer.score_tokens(model, encoded, token_ids, tok.pad_token_id, batch_size)
                for rec, pred, lp in zip(records, logprobs.argmax(-1).tolist(), logprobs.tolist()):
                    rec["score_pred"], rec["score_logprobs"] = pred, [round(x, 5) for x in lp]
            else:
                subset = [i for i, ex in enumerate(examples) if generate_ids is None or ex["id"] in generate_ids]
                texts = infer.generate(model, tok, [encoded[i] for i in subset], self.max_new_tokens,
                                       batch_size).texts
                for i, text in zip(subset, texts):
                    records[i]["generate_text"], records[i]["generate_pred"] = text, self.parse(text)
            seconds[protocol] = time.perf_counter() - start
        return records, seconds

    def score(self, records: list[dict], seconds: dict | None = None) -> dict:
        """Metrics per protocol from prediction records (which may come from several processes)."""
        metrics = {}
        for protocol in ("classifier", "score", "generate"):
            scored = [r for r in records if f"{protocol}_pred" in r]
            if not scored:
                continue
            golds, preds = [r["label"] for r in scored], [r[f"{protocol}_pred"] for r in scored]
            metrics[protocol] = classification_metrics(golds, preds)
            metrics[protocol]["ci95"] = classification_intervals(golds, preds, len(self.verbalizers),
                                                                 bootstrap_weights(len(scored)))
            if seconds and protocol in seconds:
                metrics[protocol]["seconds"] = round(seconds[protocol], 3)
                metrics[protocol]["examples_per_second"] = round(len(scored) / seconds[protocol], 2)
        return metrics

    def paired(self, before: list[dict], after: list[dict]) -> dict:
        """Zero-shot vs fine-tuned on the same test examples, per protocol: the accuracy gain with its paired
        bootstrap interval, and the exact McNemar test on the per-example outcomes."""
        out = {}
        after_by_id = {r["id"]: r for r in after}
        for protocol in ("score", "generate", "classifier"):
            key_after = "classifier_pred" if protocol == "classifier" else f"{protocol}_pred"
            key_before = "score_pred" if protocol == "classifier" else key_after  # seqcls: vs zero-shot score
            pairs = [(b, after_by_id[b["id"]]) for b in before
                     if key_before in b and b["id"] in after_by_id and key_after in after_by_id[b["id"]]]
            if not pairs:
                continue
            was = [b[key_before] == b["label"] for b, _ in pairs]
            now = [a[key_after] == a["label"] for _, a in pairs]
            out[protocol] = {"n": len(pairs), "metric": "accuracy", "mcnemar": mcnemar_exact(was, now),
                             "gain": paired_difference(was, now, bootstrap_weights(len(pairs)))}
        return out

    # --- reporting --------------------------------------------------------------------------------
    report_rows = ("accuracy", "precision", "recall", "f1", "f1_macro", "none_rate", "n")

    def report_columns(self, metrics: dict) -> list[tuple[str, dict]]:
        return [(protocol, values) for protocol, values in metrics.items()
                if isinstance(values, dict) and "accuracy" in values]

    def protocol_notes(self, proto: dict) -> list[str]:
        return [f"- verbalizers {list(self.verbalizers)} → token ids {proto.get('label_token_ids')}",
                "- `score`: log-likelihood of each verbalizer after the prompt, argmax (never None).",
                "- `generate`: greedy generation, first word parsed; anything else counts as None (wrong)."]

    def summary(self, metrics: dict) -> str:
        return " | ".join(f"{name} accuracy {m['accuracy']:.4f} f1 {m['f1']:.4f} none {m['none_rate']:.3f} "
                          f"n {m['n']}" for name, m in self.report_columns(metrics))
