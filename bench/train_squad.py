"""SQuAD v2 training throughput: full-vocabulary LM loss (baseline) vs tasktune's answer-position loss.

baseline   HF Trainer + peft LoRA, model(labels=...) over the full vocabulary with prompt tokens masked,
           padded to max_length (the tutorial recipe)
answer     tasktune: LM head applied only at answer positions, dynamic left padding, length grouping

Same model, questions, batch, max length (prompt ≤ 384 tokens), dtype, LoRA config and steps.
Usage: python bench/train_squad.py [--quick] [--repeats 3] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from train_sst2 import common_args, timer_callback  # noqa: E402

CONFIGS = ["baseline", "answer"]


def squad_rows(n: int, quick: bool) -> list[dict]:
    from tasktune.tasks import get_task

    squad_v2 = get_task("squad_v2")

    if quick:
        sys.path.insert(0, str(common.ROOT / "tests"))
        from tiny import write_squad_json

        path = write_squad_json(Path(tempfile.mkdtemp()) / "d.json", n_articles=max(1, n // 3 + 1))
        rows, _ = squad_v2.load(str(path))
    else:
        rows, _ = squad_v2.load(str(common.DATA / "squad_v2" / "train-v2.0.subset.json.gz"))
    return rows[:n]


def features_for(model: str, rows: list[dict], max_length: int, pad_to: int | None):
    from tasktune.models import load_model
    from tasktune.tasks import PromptBuilder
    from tasktune.tasks import get_task

    lm = load_model(model, "auto")
    task = get_task("squad_v2")
    builder = PromptBuilder(task, lm.tokenizer)
    features = task.train_features(builder, rows, "answer", max_length)
    if pad_to:  # the tutorial: right-pad everything to max_length
        pad = lm.tokenizer.pad_token_id
        features = [{"input_ids": f["input_ids"] + [pad] * (pad_to - len(f["input_ids"])),
                     "attention_mask": [1] * len(f["input_ids"]) + [0] * (pad_to - len(f["input_ids"])),
                     "labels": f["labels"] + [-100] * (pad_to - len(f["labels"]))} for f in features]
    return lm, features


def worker(config: str, model: str, batch: int, steps: int, warmup: int, max_length: int, quick: bool) -> dict:
    from transformers import Trainer, default_data_collator

    from tasktune.config import TrainConfig
    from tasktune.train import LeftPadCollator, TaskTrainer, add_lora

    rows = squad_rows(batch * (steps + warmup), quick)
    lm, features = features_for(model, rows, max_length, max_length if config == "baseline" else None)
    peft_model = add_lora(lm.model, TrainConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0), "answer")
    timer = timer_callback(warmup)
    with tempfile.TemporaryDirectory() as out:
        args = common_args(out, steps + warmup, batch)
        if config == "baseline":
            trainer = Trainer(model=peft_model, args=args, train_dataset=features, data_collator=default_data_collator,
                              callbacks=[timer])
        else:
            args.train_sampling_strategy = "group_by_length"
            trainer = TaskTrainer(model=peft_model, args=args, train_dataset=features,
                                  data_collator=LeftPadCollator(lm.tokenizer.pad_token_id), callbacks=[timer],
                                  objective="answer", validate=None)
        trainer.train()
    tokens = sum(len([t for t in f["input_ids"] if t != lm.tokenizer.pad_token_id]) for f in features)
    seconds = timer.end - timer.start
    return {"config": config, "examples_per_s": batch * steps / seconds, "s_per_step": seconds / steps,
            "real_tokens_per_example": tokens / len(features), "peak_mib": common.peak_memory_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 1 repeat, no RESULTS.md entry")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=416)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.batch, args.steps, args.warmup, args.max_length,
                                args.quick)))
        return
    if args.quick:
        args.model, args.repeats, args.steps, args.warmup = str(common.tiny_model(Path(tempfile.mkdtemp()))), 1, 2, 1
        args.max_length = 96
    worker_args = ["--model", args.model, "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--max-length", str(args.max_length)] + (["--quick"] if args.quick else [])
    results = common.interleaved(Path(__file__), CONFIGS, worker_args, args.repeats)
    rows = []
    for config in CONFIGS:
        rows.append([config, common.median([r["examples_per_s"] for r in results[config]]),
                     common.median([r["s_per_step"] for r in results[config]]),
                     common.median([r["peak_mib"] for r in results[config]]), common.ratio(results, config, "examples_per_s"),
                     common.ratio(results, config, "peak_mib")])
    body = common.table(["config", "examples/s (median)", "s/step", "peak memory MiB", "speed × baseline",
                         "memory × baseline"], rows)
    body += (f"\n\nbatch {args.batch}, max length {args.max_length}, {args.steps} timed steps after {args.warmup} "
             f"warm-up, {args.repeats} repeats interleaved; ratios are medians of per-repeat pairs.")
    print(body)
    if not args.quick:
        common.append_results("SQuAD v2 training", "python bench/train_squad.py " + " ".join(sys.argv[1:]), body,
                              common.machine())


if __name__ == "__main__":
    main()
