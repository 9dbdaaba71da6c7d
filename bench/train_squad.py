"""SQuAD v2 training throughput, memory and MFU: the strongest standard Trainer+peft script vs tasktune.

baseline   THE BASELINE (headline ratios are against it): HF Trainer + peft LoRA, model(labels=...) over the full
           vocabulary with prompt tokens masked, dynamic padding (DataCollatorForSeq2Seq), group_by_length, bf16
           weights with the Trainer's bf16 autocast
padded     the tutorial version: every row padded to max_length, no length grouping (extra row)
answer     tasktune: LM head applied only at the answer positions, dynamic left padding, length grouping
answer+compile  the same with `train.compile` (decoder layers compiled inside the training steps); not in the
           default set: its compile time lands in the warm-up steps (reported as "warm-up s"), and each new
           batch length until dynamo marks the length dynamic compiles again, so give it --warmup 3

Same model, questions, tokenized rows (tasktune's prompts with the answer), batch, max length, dtype, LoRA config,
sampler seed and steps. Reported as in bench/train_sst2.py (tokens/s, MFU, peak RSS and what training adds).
Usage: python bench/train_squad.py [--quick] [--repeats 3] [--steps 4] [--warmup 1] [--configs answer,answer+compile]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from train_sst2 import common_args, lora_parameters, report, timer_callback  # noqa: E402

CONFIGS = ["baseline", "padded", "answer"]  # the default set
KNOWN = [*CONFIGS, "answer+compile"]


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
    from tasktune.losses import get_objective

    features = task.train_features(builder, rows, get_objective("answer"), max_length)
    if pad_to:  # the tutorial: right-pad everything to max_length
        pad = lm.tokenizer.pad_token_id
        features = [{"input_ids": f["input_ids"] + [pad] * (pad_to - len(f["input_ids"])),
                     "attention_mask": [1] * len(f["input_ids"]) + [0] * (pad_to - len(f["input_ids"])),
                     "labels": f["labels"] + [-100] * (pad_to - len(f["labels"]))} for f in features]
    return lm, features


def worker(config: str, model: str, batch: int, steps: int, warmup: int, max_length: int, quick: bool) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, default_data_collator

    from flops import lora_training_flops
    from tasktune.config import TrainConfig
    from tasktune.losses import get_objective
    from tasktune.train import CompiledLayers, LeftPadCollator, TaskTrainer, add_lora

    rows = squad_rows(batch * (steps + warmup), quick)
    lm, features = features_for(model, rows, max_length, max_length if config == "padded" else None)
    loaded = common.rss_mib()
    pad = lm.tokenizer.pad_token_id
    real = [sum(t != pad for t in f["input_ids"]) for f in features]
    answers = [sum(t != -100 for t in f["labels"]) for f in features]
    peft_model = add_lora(lm.model, TrainConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0), "answer")
    timer = timer_callback(warmup)
    with tempfile.TemporaryDirectory() as out:
        args = common_args(out, steps + warmup, batch)
        if config.startswith("answer"):
            args.train_sampling_strategy = "group_by_length"
            trainer = TaskTrainer(model=peft_model, args=args, train_dataset=features,
                                  data_collator=LeftPadCollator(pad), callbacks=[timer],
                                  objective=get_objective("answer"), validate=None)
            if config == "answer+compile":
                trainer.compiled = CompiledLayers(peft_model)
        else:
            if config == "baseline":
                args.train_sampling_strategy = "group_by_length"
                args.bf16 = lm.dtype == __import__("torch").bfloat16  # the Trainer's autocast
                tokenizer = lm.tokenizer
                tokenizer.padding_side = "right"
                collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
                features = [dict(f, attention_mask=[1] * len(f["input_ids"])) for f in features]
            else:
                collator = default_data_collator
            trainer = Trainer(model=peft_model, args=args, train_dataset=features, data_collator=collator,
                              callbacks=[timer])
        trainer.train()
    seconds = timer.end - timer.start
    tokens, answer_tokens = sum(real) / len(real), sum(answers) / len(answers)
    config_ = lm.model.config
    flops = lora_training_flops(config_, batch, round(tokens), round(answer_tokens), lora_parameters(config_)) * steps
    peak = common.peak_memory_mib()
    return {"config": config, "batch": batch, "examples_per_s": batch * steps / seconds, "s_per_step": seconds / steps,
            "warmup_s": timer.start - timer.began, "tokens_per_s": batch * steps * tokens / seconds,
            "model_tflops": flops / seconds / 1e12,
            "real_tokens_per_example": tokens, "peak_mib": peak, "added_mib": peak - loaded}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 1 repeat, no RESULTS.md entry")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=416)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="a subset to run (the baseline is always run)")
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
    before = common.matmul_peak_tflops(seconds=0.2 if args.quick else 2.0)
    unknown = [c for c in args.configs.split(",") if c not in KNOWN]
    if unknown:
        raise SystemExit(f"--configs: unknown {', '.join(unknown)}; expected some of {', '.join(KNOWN)}")
    configs = ["baseline"] + [c for c in args.configs.split(",") if c != "baseline"]
    results = common.interleaved(Path(__file__), configs, worker_args, args.repeats, in_process=(
        (lambda c: worker(c, args.model, args.batch, args.steps, args.warmup, args.max_length, True)) if args.quick
        else None))
    # This machine's matmul rate drifts (a shared VM): MFU is against the faster of two measurements.
    after = common.matmul_peak_tflops(seconds=0.2 if args.quick else 2.0)
    peak = max(before, after)
    body = report(results, configs, peak).replace("prompt tokens/s", "real tokens/s")
    body += (f"\n\nbatch {args.batch}, max length {args.max_length} (rows hold "
             f"{common.median([r['real_tokens_per_example'] for r in results['baseline']]):.0f} real tokens on "
             f"average), {args.steps} timed steps after {args.warmup} warm-up, {args.repeats} repeats interleaved. "
             "Ratios: median / median of the baseline, with the min–max of the per-repeat ratios. MFU against "
             f"{peak:.2f} TFLOP/s, the faster of two bf16 2048² matmul measurements before and after the configs "
             f"({before:.2f} and {after:.2f}).")
    print(body)
    if not args.quick:
        common.record_results("SQuAD v2 training", "python bench/train_squad.py " + " ".join(sys.argv[1:]), body,
                              common.machine())


if __name__ == "__main__":
    main()
