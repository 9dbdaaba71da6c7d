"""A user's own task with multi-token label names, trained with `train.objective: lm`: step time and memory.

The task, as a new user would declare it: which Wikipedia article a paragraph comes from, 4 classes whose names
are several tokens each (the 4 embedded SQuAD v2 articles with the most paragraphs), passages of ~120 words,
batch 8. Multi-token verbalizers allow only the `lm` objective.

full_logits  THE BASELINE: the model's own forward with `labels` (full-vocabulary logits at every position,
             262,144 per position for Gemma 3), what the tutorials write and what `lm` ran before 2026-12-02
             (registered here as a plug-in objective, so everything else is tasktune's own trainer)
lm           tasktune's `lm`: the same loss value, the LM head applied at the labelled positions only

Same model, rows, order, batch, LoRA config and steps for both; each config runs in its own process, repeats
interleaved. Reported: s/step, examples/s, peak RSS and what training adds to the loaded model's RSS.
Usage: python bench/train_custom_lm.py [--quick] [--repeats 3] [--steps 5] (writes its entry in RESULTS.md)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIGS = ["full_logits", "lm"]


def topic_rows() -> tuple[list[dict], list[str]]:
    """(rows of {"text", "label"}, the 4 label names): paragraphs of the 4 articles with the most paragraphs."""
    from tasktune.data import squad
    from tasktune.tasks.spec import load_spec

    rows, _ = squad.load(load_spec("squad_v2"), None)
    paragraphs = {r["context"]: r["title"].replace("_", " ") for r in rows}
    names = [t for t, _ in Counter(paragraphs.values()).most_common(4)]
    out = [{"text": " ".join(c.split()), "label": t} for c, t in paragraphs.items() if t in names]
    out.sort(key=lambda r: (r["label"], r["text"]))
    return out, names


def write_task(folder: Path, names: list[str]) -> Path:
    import yaml

    spec = {"name": "wiki_topic", "type": "classification",
            "description": "Which Wikipedia article a paragraph comes from (4 articles).",
            "template": "{text}\nQuestion: Which article is this paragraph from?\nAnswer:",
            "labels": [{"name": n, "verbalizer": f" {n}", "values": [n]} for n in names],
            "max_new_tokens": 12, "headline": "accuracy",
            "data": {"files": ["train.tsv"], "text_column": ["text"], "label_column": ["label"]}}
    path = folder / "wiki_topic.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def register_full_logits() -> None:
    from tasktune.losses import Objective, model_loss, register_objective

    register_objective(Objective("full_logits", model_loss, labels="tokens",
                                 description="the model's own forward and loss (bench baseline)"),
                       task_types=("classification",))


def worker(config: str, model: str, batch: int, steps: int, warmup: int, seq_len: int, quick: bool) -> dict:
    import random

    from tasktune.config import TrainConfig
    from tasktune.models import load_model
    from tasktune.tasks import PromptBuilder, get_task
    from tasktune.train import LeftPadCollator, TaskTrainer, add_lora
    from train_sst2 import common_args, timer_callback

    register_full_logits()
    rows, names = topic_rows()
    if quick:  # the tiny test tokenizer knows a few words only: two-word label names it can tell apart
        tiny = ["good film", "bad story", "great fun", "dull news"]
        rows = [{**r, "label": tiny[names.index(r["label"])]} for r in rows]
        names = tiny
    with tempfile.TemporaryDirectory() as tmp:
        task = get_task(str(write_task(Path(tmp), names)))
        lm = load_model(model, "auto")
        loaded_rss = common.rss_mib()
        builder = PromptBuilder(task, lm.tokenizer)
        examples = [{"id": i, "text": r["text"], "label": names.index(r["label"]), "fields": {"text": r["text"]}}
                    for i, r in enumerate(rows)]
        random.Random(0).shuffle(examples)
        examples = examples[: batch * (steps + warmup)]
        # Both configs train on the same features: token labels on the verbalizer's tokens only.
        from tasktune.losses import get_objective

        features = task.train_features(builder, examples, get_objective("lm"), seq_len, None)
        model_ = add_lora(lm.model, TrainConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0), "lm")
        timer = timer_callback(warmup)
        args = common_args(tmp + "/out", steps + warmup, batch)
        args.train_sampling_strategy = "sequential"  # the same rows in the same order for both configs
        trainer = TaskTrainer(model=model_, args=args, train_dataset=features,
                              data_collator=LeftPadCollator(lm.tokenizer.pad_token_id, 32), callbacks=[timer],
                              objective=get_objective(config), label_token_ids=None, validate=None)
        started = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - started
    seconds = timer.end - timer.start
    tokens = sum(len(f["input_ids"]) for f in features) / len(features)
    label_tokens = sum(sum(t != -100 for t in f["labels"]) for f in features) / len(features)
    peak = common.peak_rss_mib()
    return {"config": config, "batch": batch, "s_per_step": seconds / steps, "examples_per_s": batch * steps / seconds,
            "tokens_per_row": round(tokens, 1), "label_tokens_per_row": round(label_tokens, 2),
            "train_s_with_warmup": round(total, 1), "peak_mib": peak, "added_mib": peak - loaded_rss,
            "vocab": lm.model.config.vocab_size, "labels": names}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--quick", action="store_true", help="the tiny test model, 2 steps: CI checks it runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=320)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.model, args.batch, args.steps, args.warmup, args.seq_len, args.quick)
        print(json.dumps(result))
        return
    if args.quick:
        args.model = str(common.tiny_model(Path(tempfile.mkdtemp())))
        args.repeats, args.steps, args.warmup = 1, 2, 1
    worker_args = ["--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len)] + (["--quick"] if args.quick else [])
    results = common.interleaved(Path(__file__), CONFIGS, worker_args, args.repeats, in_process=(
        (lambda c: worker(c, args.model, args.batch, args.steps, args.warmup, args.seq_len, True)) if args.quick
        else None))
    facts = common.machine()
    first = results["lm"][0]
    lines = [f"Model {Path(args.model).name} "
             f"(vocabulary {first['vocab']:,}); {args.repeats} repeats × {args.steps} timed steps after {args.warmup} "
             f"warm-up, batch {args.batch}, {first['tokens_per_row']} tokens per row of which "
             f"{first['label_tokens_per_row']} labelled; labels {first['labels']}.", "",
             "| config | s/step (median, min–max) | examples/s | speed × baseline | peak RSS MiB | added by training MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for config in CONFIGS:
        rs = results[config]
        steps = [r["s_per_step"] for r in rs]
        lines.append(f"| {config} | {common.median(steps):.2f} ({min(steps):.2f}–{max(steps):.2f}) | "
                     f"{common.median([r['examples_per_s'] for r in rs]):.2f} | "
                     f"{common.ratio_of_medians(results, config, 'examples_per_s', 'full_logits')} | "
                     f"{common.median([r['peak_mib'] for r in rs]):,.0f} | "
                     f"{common.median([r['added_mib'] for r in rs]):,.0f} |")
    lines += ["", f"lm vs full_logits, ratio of medians (min–max of paired repeats): speed "
              f"{common.ratio_of_medians(results, 'lm', 'examples_per_s', 'full_logits')}, peak RSS "
              f"{common.ratio_of_medians(results, 'lm', 'peak_mib', 'full_logits')}."]
    print("\n".join(lines))
    if not args.quick:
        common.record_results("A user's task with multi-token labels, `lm` objective",
                              "python bench/train_custom_lm.py " + " ".join(sys.argv[1:]), "\n".join(lines), facts)


if __name__ == "__main__":
    main()
