"""Extractive question answering with unanswerable questions (SQuAD v2 and any dataset in its layout),
declared by a task spec (`tasks/squad_v2.yaml`): generative, and the model must say the spec's abstain word
("unanswerable") when the context has no answer.

Decisions reported:
- `raw`: greedy generation; the model abstains when its first token is the first token of " unanswerable".
- `calibrated`: abstain when the first token of " unanswerable" leads the best other first token by more than a
  margin (logits) chosen on the validation slice (best F1); otherwise answer with the best non-abstaining
  generation. The margin 0 is the raw decision, so on the validation slice `calibrated` is never below `raw`.
One generation pass gives both: the first token of " unanswerable" is suppressed at the first step, and its
probability and margin are read from that step's raw logits.
"""

from __future__ import annotations

import random

from tasktune import inference_requests as req
from tasktune.data import squad as squad_data
from tasktune.data.split import grouped_split, random_split, split_errors, validation_size
from tasktune.errors import TasktuneError
from tasktune.metrics.intervals import bootstrap_weights, paired_difference
from tasktune.metrics.squad_v2 import (best_threshold, has_answer_map, normalize_answer, raw_scores, squad_intervals,
                                        squad_v2_metrics)
from tasktune.metrics.text_overlap import text_overlap_metrics
from tasktune.tasks.base import TaskOptions, TaskType, register_task_type



@register_task_type
class ExtractiveQATask(TaskType):
    type_name = "extractive_qa"
    split_policies = ("article", "question")
    objectives = ("answer",)
    hub_task = ("question-answering", "Question Answering")
    official_predictions = True
    template_fields = ("title", "context", "question")

    @classmethod
    def check_spec(cls, spec) -> None:
        from tasktune.prompt_template import template_fields

        extra = sorted(set(template_fields(spec.template, spec.source)) - set(cls.template_fields))
        if extra:
            raise TasktuneError(f"{spec.source}: template fields {extra} are not SQuAD fields (expected title, "
                                "context, question)")
        columns = spec.data.columns
        unknown = sorted(set(columns) - set(squad_data.FIELDS))
        if unknown:
            raise TasktuneError(f"{spec.source}: data.columns {unknown} are not question fields (expected some of "
                                f"{list(squad_data.FIELDS)}, each mapped to the data's name for it)")
        if any(not column.strip() for column in columns.values()) or len(set(columns.values())) != len(columns):
            raise TasktuneError(f"{spec.source}: data.columns {columns} must map each field to a different, "
                                "non-empty column name")

    def __init__(self, spec, options: TaskOptions = TaskOptions()):
        self.spec = spec
        self.name = spec.name
        self.template = spec.template
        self.abstain_word = spec.abstain_word
        self.max_new_tokens = spec.max_new_tokens or 32
        self.metric_for_best = spec.headline or "f1"
        self.max_prompt_tokens = options.max_prompt_tokens  # the recipe's eval.max_prompt_tokens

    def prompt(self, example: dict) -> str:
        return self.template.format(title=example["title"].replace("_", " "), context=example["context"],
                                    question=example["question"])

    def target(self, example: dict) -> str:
        return " " + (example["answers"][0] if example["answers"] else self.abstain_word)

    def label_token_ids(self, builder, example: dict) -> list[int]:
        """The first token of " unanswerable" in the final context (its probability is `na_prob`)."""
        context = builder.render(example)
        base = builder.encode(context)
        full = builder.encode(context + " " + self.abstain_word)
        if full[: len(base)] != base or len(full) == len(base):
            raise TasktuneError(f"cannot find the first token of ' {self.abstain_word}' after the prompt")
        return [full[len(base)]]

    # --- data -------------------------------------------------------------------------------------
    def load(self, path: str | None) -> tuple[list[dict], str]:
        return squad_data.load(self.spec, path)

    def split(self, rows: list[dict], data_cfg) -> dict[str, list]:
        """80:20 by article (default: no context on both sides) or by question (the seed's protocol). The
        validation slice (early stopping and the abstention threshold) is drawn the same way from the
        training part, so it is as unseen as the test set."""
        ids = [r["id"] for r in rows]
        by_article = self.split_policy(data_cfg) == "article"

        def two_way(positions: list[int], fraction: float) -> tuple[list[int], list[int]]:
            if by_article:
                a, b = grouped_split([rows[i]["title"] for i in positions], fraction, data_cfg.seed)
            else:
                a, b = random_split(len(positions), fraction, data_cfg.seed)
            return [positions[i] for i in a], [positions[i] for i in b]

        with split_errors("data.test_size", len(rows)):
            train, test = two_way(list(range(len(rows))), data_cfg.test_size)
        val_n = validation_size(data_cfg.val_size, len(train))
        if by_article:
            fit, val = self._validation_articles(rows, train, val_n, data_cfg.seed)
        else:
            with split_errors("data.val_size", len(train)):
                fit, val = two_way(train, val_n / len(train))
        return {"train": [ids[i] for i in fit], "validation": [ids[i] for i in val], "test": [ids[i] for i in test]}

    @staticmethod
    def _validation_articles(rows: list[dict], train: list[int], n: int, seed: int) -> tuple[list[int], list[int]]:
        """Whole articles, drawn in a seeded order until they hold `n` questions; `n` of their questions form
        the validation slice and the rest of those articles is left out, so no validation context is trained on."""
        titles = sorted({rows[i]["title"] for i in train})
        if len(titles) < 2:
            raise TasktuneError("a by-article validation slice needs at least 2 training articles")
        chosen, held = set(), []
        for title in random.Random(seed).sample(titles, len(titles))[:-1]:  # at least one article trains
            chosen.add(title)
            held = [i for i in train if rows[i]["title"] in chosen]
            if len(held) >= n:
                break
        val = sorted(random.Random(seed).sample(held, min(n, len(held))))
        return [i for i in train if rows[i]["title"] not in chosen], val


    def overlap(self, train: list[dict], test: list[dict]) -> dict:
        """Test questions whose context, or whose exact question on the same context, the training part has."""
        contexts = {r["context"] for r in train}
        pairs = {(r["context"], r["question"]) for r in train}
        n = len(test)
        shared = sum(r["context"] in contexts for r in test)
        exact = sum((r["context"], r["question"]) in pairs for r in test)
        return {"test_rows": n, "exact_duplicates": exact, "shared_context": shared,
                "exact_rate": exact / n if n else 0.0, "shared_context_rate": shared / n if n else 0.0}

    # --- prompts under a token budget -------------------------------------------------------------
    def fit_prompt(self, builder, example: dict, budget: int, keep_answer: bool) -> tuple[list[int], bool]:
        """Encoded prompt within `budget` tokens; long contexts are cut to a window of characters
        around the answer (training) or to their beginning (evaluation, where the answer is unknown)."""
        ids = builder.encode(builder.render(example))
        if len(ids) <= budget:
            return ids, False
        context = example["context"]
        center = 0
        if keep_answer and example["answers"]:
            start = example["answer_starts"][0] if example.get("answer_starts") else -1
            found = context.find(example["answers"][0])
            center = start if start >= 0 and context[start:].startswith(example["answers"][0]) else max(found, 0)
            center += len(example["answers"][0]) // 2
        keep = len(context)
        while len(ids) > budget and keep > 0:
            keep = int(keep * budget / len(ids) * 0.95)
            lo = max(0, min(center - keep // 2, len(context) - keep)) if keep_answer else 0
            cut = dict(example, context=context[lo:lo + keep])
            ids = builder.encode(builder.render(cut))
        return ids, True

    # --- training ---------------------------------------------------------------------------------
    packs_questions = True

    @staticmethod
    def follow_up_template(template: str) -> str:
        """What a further question about the same context adds to a training row: the template's text after
        `{context}` (e.g. "Question: {question}\nAnswer:"), so the first question of a row reads exactly as it
        is evaluated and the later ones as the same prompt continued."""
        head, sep, tail = template.partition("{context}")
        tail = tail.lstrip("\n ")
        if not sep or "{question}" not in tail or "{title}" in tail or "{question}" in head:
            raise TasktuneError(f"train.questions_per_context > 1 needs a template with {{question}} after "
                                f"{{context}} and nothing but the question after it; got {template!r}")
        return tail

    def train_features(self, builder, examples: list[dict], objective, max_length: int,
                       label_token_ids=None, questions_per_context: int = 1) -> list[dict]:
        """One row per question, or with `questions_per_context` > 1 up to that many questions about one context
        in one row (the context read once, each answer trained on): SQuAD has ~8 questions to a paragraph, and
        rows of up to 4 hold its questions in ~40% of the tokens. A paragraph's questions are shuffled first
        (seeded by the paragraph): SQuAD v2 lists the unanswerable ones last, and only a row's first question
        reads as evaluated, so in file order the evaluated position would see too few of them (on 2026-12-04,
        20.9% of first questions against 27.3% of all). Four to a row trained abstention worse even shuffled,
        and two to a row bought no F1 (the SQuAD CPU recipe; docs/results.md), so the shipped recipe keeps one
        question to a row."""
        if questions_per_context == 1:
            return [self._one_question(builder, ex, max_length) for ex in examples]
        if builder.format == "chat":
            raise TasktuneError("train.questions_per_context > 1 needs prompt_format plain (a chat template "
                                "wraps one question per turn)")
        follow_up = self.follow_up_template(self.template)
        by_context: dict[tuple[str, str], list[dict]] = {}
        for ex in examples:
            by_context.setdefault((ex["title"], ex["context"]), []).append(ex)
        features = []
        for (title, context), group in by_context.items():
            group = random.Random(f"{title}\n{context}").sample(group, len(group))
            for start in range(0, len(group), questions_per_context):
                features += self._packed(builder, group[start:start + questions_per_context], follow_up,
                                         max_length)
        return features

    def _answer_tokens(self, builder, ex: dict) -> list[int]:
        # The newline teaches the model to stop right after a short answer.
        return builder.tokenizer(self.target(ex) + "\n", add_special_tokens=False)["input_ids"]

    def _one_question(self, builder, ex: dict, max_length: int) -> dict:
        target = self._answer_tokens(builder, ex)
        prompt, _ = self.fit_prompt(builder, ex, max_length - len(target), keep_answer=True)
        return self._labelled(prompt, target)

    @staticmethod
    def _labelled(prompt: list[int], target: list[int]) -> dict:
        return {"input_ids": prompt + target, "labels": [-100] * len(prompt) + target}

    def _packed(self, builder, group: list[dict], follow_up: str, max_length: int) -> list[dict]:
        """Rows for questions about one context: each row opens with the evaluated prompt of its first question
        and continues with further questions while it fits `max_length`; a question whose own prompt does not
        fit gets a row of its own with the context cut around its answer."""
        rows, ids, labels = [], [], []
        for ex in group:
            target = self._answer_tokens(builder, ex)
            if ids:
                more = builder.tokenizer(follow_up.format(question=ex["question"]), add_special_tokens=False)[
                    "input_ids"]
                if len(ids) + len(more) + len(target) <= max_length:
                    ids, labels = ids + more + target, labels + [-100] * len(more) + target
                    continue
                rows.append({"input_ids": ids, "labels": labels})
                ids, labels = [], []
            prompt, cut = self.fit_prompt(builder, ex, max_length - len(target), keep_answer=True)
            row = self._labelled(prompt, target)
            if cut:  # its context is cut around its own answer, so it is a row of its own
                rows.append(row)
            else:
                ids, labels = row["input_ids"], row["labels"]
        if ids:
            rows.append({"input_ids": ids, "labels": labels})
        return rows

    # --- evaluation: requests for the runner, and records from its results -----------------------------
    sampled_protocols = ()  # every test question is generated
    calibration_protocol = "generate"  # the abstention threshold is chosen on the validation slice

    def protocols(self, requested: list[str], head: str = "causal_lm") -> list[str]:
        return ["generate"]

    def validation_protocol(self, head: str = "causal_lm") -> str:
        return "generate"

    def new_records(self, examples: list[dict]) -> list[dict]:
        return [{"id": ex["id"], "question": ex["question"], "golds": ex["answers"]} for ex in examples]

    def requests(self, builder, examples: list[dict], protocol: str) -> tuple[list, list[dict]]:
        """One generation per question, stopping at a newline, watching the abstain token (suppressed as the first
        token, so the text is the best non-abstaining answer); records note whether the context was cut."""
        fitted = [self.fit_prompt(builder, ex, self.max_prompt_tokens, keep_answer=False) for ex in examples]
        abstain_id = self.label_token_ids(builder, examples[0])[0]
        requests = [req.Generate(tuple(ids), self.max_new_tokens, stop_at_newline=True, watch_token=abstain_id,
                                    suppress_watch_token=True) for ids, _ in fitted]
        return requests, [{"truncated": truncated} for _, truncated in fitted]

    def read_results(self, records: list[dict], protocol: str, results: list) -> None:
        """The raw decision (abstain when greedy decoding would start with the abstain token), the best
        non-abstaining answer, and na_prob."""
        for rec, result in zip(records, results):
            answer, top = result.text.strip(), result.watch_is_top
            if normalize_answer(answer) == normalize_answer(self.abstain_word):  # said in words after another first token
                answer, top = "", True
            rec.update(prediction="" if top else answer, answer=answer, na_prob=result.watch_prob,
                       na_margin=result.watch_margin)

    def validation_metrics(self, records: list[dict]) -> dict:
        metrics = self.score(records, with_text_metrics=False)
        return {"f1": metrics["f1"], "exact": metrics["exact"], "HasAns_f1": metrics.get("HasAns_f1", 0.0),
                "NoAns_f1": metrics.get("NoAns_f1", 0.0)}

    def choose_threshold(self, records: list[dict]) -> float:
        """The abstention margin that maximises F1 on `records` (the validation slice's), by the official search.

        The search runs on `na_margin`, not on `na_prob`: the raw decision abstains exactly where the margin is
        above 0, so it is one of the candidates. A threshold on `na_prob` cannot express it (a 0.4 abstention can
        be greedy's choice and a 0.45 one not), and on 96 validation questions it chose rules that abstained on
        59-86% of the test questions (docs/results.md)."""
        answers = {r["id"]: r["answer"] for r in records}
        golds = {r["id"]: r["golds"] for r in records}
        margins = {r["id"]: r["na_margin"] for r in records}
        _, f1 = raw_scores(golds, answers)
        below_all = min(margins.values()) - 1.0  # the threshold that abstains on every question
        return best_threshold(answers, f1, margins, has_answer_map(golds), abstain_all=below_all)[1]

    def score(self, records: list[dict], seconds: dict | None = None, na_threshold: float | None = None,
              with_text_metrics: bool = True) -> dict:
        """The SQuAD v2 metric (raw decision, and calibrated when a threshold is given) and text overlap."""
        golds = {r["id"]: r["golds"] for r in records}
        raw = {r["id"]: r["prediction"] for r in records}
        na = {r["id"]: r["na_prob"] for r in records}
        metrics = squad_v2_metrics(golds, raw, na)
        exact, f1 = raw_scores(golds, raw)
        for rec in records:
            rec["em"], rec["f1"] = exact[rec["id"]], round(f1[rec["id"]], 4)
        weights = bootstrap_weights(len(records))
        metrics["ci95"] = squad_intervals(golds, raw, weights)
        metrics["abstain_rate"] = sum(not v for v in raw.values()) / len(raw)
        metrics["truncated_prompts"] = sum(r["truncated"] for r in records)
        if with_text_metrics:
            # Text overlap compares the words produced: an abstention is the word "unanswerable".
            preds = [r["prediction"] or self.abstain_word for r in records]
            refs = [list(dict.fromkeys(r["golds"])) or [self.abstain_word] for r in records]
            metrics.update(text_overlap_metrics(preds, refs))
        if na_threshold is not None:
            calibrated = {r["id"]: "" if r["na_margin"] > na_threshold else r["answer"] for r in records}
            cal = squad_v2_metrics(golds, calibrated, na)
            metrics["calibrated"] = {"threshold": na_threshold, **{k: v for k, v in cal.items()
                                                                    if not k.startswith("best_")},
                                     "abstain_rate": sum(not v for v in calibrated.values()) / len(calibrated),
                                     "ci95": squad_intervals(golds, calibrated, weights)}
            _, cal_f1 = raw_scores(golds, calibrated)
            for rec in records:
                rec["calibrated_prediction"] = calibrated[rec["id"]]
                rec["calibrated_f1"] = round(cal_f1[rec["id"]], 4)
        metrics["n"] = len(records)
        if seconds:
            metrics["seconds"] = round(sum(seconds.values()), 3)
        return metrics

    def paired(self, before: list[dict], after: list[dict]) -> dict:
        """Zero-shot vs fine-tuned on the same questions: the F1 gain (points) with a paired bootstrap
        interval and p-value, for the raw and the calibrated decision."""
        out = {}
        after_by_id = {r["id"]: r for r in after}
        for decision, key in (("raw", "f1"), ("calibrated", "calibrated_f1")):
            pairs = [(b, after_by_id[b["id"]]) for b in before if key in b and key in after_by_id.get(b["id"], {})]
            if pairs:
                gain = paired_difference([100 * b[key] for b, _ in pairs], [100 * a[key] for _, a in pairs],
                                         bootstrap_weights(len(pairs)))
                out[decision] = {"n": len(pairs), "metric": "f1", "gain": gain}
        return out

    # --- reporting --------------------------------------------------------------------------------
    report_rows = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact",
                   "best_exact_thresh", "best_f1", "best_f1_thresh", "abstain_rate", "bleu", "bleu_smoothed",
                   "meteor", "meteor_exact_stem", "rouge1", "rouge2", "rougeL", "threshold", "truncated_prompts",
                   "total")

    def report_columns(self, metrics: dict) -> list[tuple[str, dict]]:
        columns = [("raw", metrics)]
        if "calibrated" in metrics:
            columns.append(("calibrated", metrics["calibrated"]))
        return columns

    def decision_key(self, column: str) -> str:
        return "calibrated_prediction" if column == "calibrated" else "prediction"  # "": abstains

    def protocol_notes(self, proto: dict) -> list[str]:
        return [f"- greedy generation, stop at newline, ≤ {self.max_new_tokens} new tokens; prompts ≤ "
                f"{self.max_prompt_tokens} tokens (longer contexts cut, counted in `truncated_prompts`)",
                f"- `raw`: abstains when the first generated token is the first token of ' {self.abstain_word}' "
                f"(id {proto.get('label_token_ids')}); scored with the official SQuAD v2 semantics",
                "- `calibrated`: abstains when that token's first-step logit leads the best other token's by more "
                "than the margin (`threshold`; 0 is `raw`) that maximised F1 on the validation slice; otherwise "
                "gives the best other answer",
                "- `best_*`: the official script's oracle threshold search on the test set (for reference)",
                "- `bleu`: corpus BLEU-4, no smoothing; `bleu_smoothed`: mean sentence BLEU, exp smoothing "
                "(sacrebleu); ROUGE F-measure with stemming (best reference); METEOR (nltk, WordNet)"]

    def changed_example(self, old: dict, new: dict):
        return (old["f1"] >= 0.5, new["f1"] >= 0.5,
                {"text": new["question"], "gold": " | ".join(new["golds"]) or "(unanswerable)",
                 "zero-shot": old["prediction"] or "(abstains)", "fine-tuned": new["prediction"] or "(abstains)"})

    def report_plots(self, zeroshot, finetuned, columns, out):
        from tasktune import plots

        return [("Zero-shot vs fine-tuned", plots.metric_bars(columns, ["exact", "f1", "HasAns_f1", "NoAns_f1"],
                                                             f"{self.name} test metrics (HasAns / NoAns)",
                                                             out / "metrics.png"))]

    def hub_eval_rows(self, finetuned: dict) -> list[tuple[str, float, str]]:
        return [(key, round(finetuned[key], 2), f"{self.name} {key} (greedy, raw decision)")
                for key in ("exact", "f1", "HasAns_f1", "NoAns_f1") if key in finetuned]

    def compare_figures(self, metrics: dict) -> dict:
        return {key: metrics[key] for key in ("exact", "f1", "HasAns_f1", "NoAns_f1") if key in metrics}

    def summary(self, metrics: dict) -> str:
        return " | ".join(f"{name} EM {m['exact']:.2f} F1 {m['f1']:.2f} HasAns F1 {m.get('HasAns_f1', 0):.2f} "
                          f"NoAns F1 {m.get('NoAns_f1', 0):.2f} abstain {m['abstain_rate']:.2f}"
                          for name, m in self.report_columns(metrics))
