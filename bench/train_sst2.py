"""SST-2 training throughput, memory and MFU: the strongest standard Trainer+peft script vs tasktune.

baseline   THE BASELINE (headline ratios are against it): HF Trainer + peft LoRA, causal-LM loss over the full
           vocabulary with labels masked to the answer token, dynamic padding (DataCollatorForSeq2Seq),
           group_by_length, bf16 weights with the Trainer's bf16 autocast: what a competent user writes
padded     the tutorial version: the same, every row padded to max_length, no length grouping (extra row)
verbalizer tasktune: last hidden state × the labels' LM-head rows, dynamic left padding, length grouping
label_lm   tasktune (the CPU recipe's objective): the baseline's loss with the LM head at one position
lm/seqcls  tasktune's other objectives, for reference
Variants, for the MFU work: `CONFIG+bN` runs CONFIG with micro-batch N (`label_lm+b64`, `baseline+b64`), and
`CONFIG+compile` with every decoder layer compiled in place (`torch.compile`, as torchtune compiles per layer; the
Trainer's `torch_compile` flag would wrap the whole model, which tasktune's losses bypass by calling the backbone
directly). The compile time lands in the untimed warm-up steps and is reported on its own as "warm-up s".

Same model, rows, batch size, max length, dtype, LoRA config, sampler seed and steps for all; length-grouped
configs see the same rows in the same order (their lengths differ by the one answer token). Reported per
config: examples/s and real (unpadded) tokens/s, model FLOP utilisation (bench/flops.py, the same FLOPs per
token for every config, against a bf16 matmul measured on this machine in the same run), and memory twice:
peak RSS, and peak minus the RSS after the model is loaded (what training adds).
Usage: python bench/train_sst2.py [--quick] [--repeats 3] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIGS = ["baseline", "padded", "verbalizer", "label_lm", "lm", "seqcls"]


def rows_for(n: int, quick: bool) -> list[dict]:
    if quick:
        sys.path.insert(0, str(common.ROOT / "tests"))
        from tiny import sentiment_rows

        return [{"id": i, "text": s, "label": l, "fields": {"text": s}} for i, (s, l) in enumerate(sentiment_rows(n))]
    from tasktune.tasks import get_task

    rows, _ = get_task("sst2").load(str(common.DATA / "sst2" / "train.tsv.gz"))
    long_enough = [r for r in rows if len(r["text"].split()) >= 8]  # full sentences, not short phrases
    return long_enough[:n]


def timer_callback(warmup: int):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        start = end = began = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    return Timer()


def common_args(out: str, steps: int, batch: int, seed: int = 0):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                             lr_scheduler_type="constant", logging_steps=10_000, save_strategy="no", report_to="none",
                             use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, seed=seed,
                             dataloader_num_workers=0, disable_tqdm=True)


def compile_layers(peft_model) -> None:
    """The baseline's compile: each decoder layer (with its LoRA modules) compiled in place."""
    base = peft_model.get_base_model()
    for layer in getattr(base, base.base_model_prefix).layers:
        layer.compile()


def parse_config(config: str, batch: int) -> tuple[str, int, bool]:
    """`label_lm+b64+compile` -> ("label_lm", 64, True)."""
    name, *variants = config.split("+")
    for v in variants:
        if not (v == "compile" or (v.startswith("b") and v[1:].isdigit())):
            raise SystemExit(f"unknown variant {v!r} in config {config!r}: expected bN (micro-batch) or compile")
    sizes = [int(v[1:]) for v in variants if v.startswith("b")]
    return name, sizes[-1] if sizes else batch, "compile" in variants


def worker_baseline(model: str, rows: list[dict], batch: int, steps: int, warmup: int, seq_len: int, dynamic: bool,
                    compile: bool = False):
    """A plain transformers + peft script: the strongest standard recipe (`dynamic`), or the tutorial's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, default_data_collator

    from tasktune.models import resolve_dtype, resolve_model_path

    path = resolve_model_path(model)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "right"
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype("auto"))
    lm.config.pad_token_id = tok.pad_token_id
    loaded_rss = common.rss_mib()
    template = "{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    features = []
    for r in rows:
        prompt = tok(template.format(sentence=r["text"]))["input_ids"][: seq_len - 1]
        answer = tok(" positive" if r["label"] else " negative", add_special_tokens=False)["input_ids"][:1]
        ids = prompt + answer
        labels = [-100] * len(prompt) + answer
        if not dynamic:
            pad = seq_len - len(ids)
            ids, labels = ids + [tok.pad_token_id] * pad, labels + [-100] * pad
        features.append({"input_ids": ids, "attention_mask": [1] * (len(prompt) + 1) + [0] * (len(ids) - len(prompt) - 1),
                         "labels": labels})
    model_ = get_peft_model(lm, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]))
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100) if dynamic else default_data_collator
    timer = timer_callback(warmup)
    with tempfile.TemporaryDirectory() as out:
        args = common_args(out, steps + warmup, batch)
        if compile:
            compile_layers(model_)
        if dynamic:
            args.train_sampling_strategy = "group_by_length"
            args.bf16 = lm.dtype == torch.bfloat16  # the Trainer's autocast, as the base weights' dtype
        trainer = Trainer(model=model_, args=args, train_dataset=features, data_collator=collator, callbacks=[timer])
        trainer.train()
    prompt_tokens = sum(len(tok(template.format(sentence=r["text"]))["input_ids"][: seq_len - 1]) for r in rows)
    return timer, loaded_rss, prompt_tokens / len(rows), lm.config


def worker_tasktune(model: str, rows: list[dict], batch: int, steps: int, warmup: int, seq_len: int, objective: str,
                    compile: bool = False):
    from tasktune.config import TrainConfig
    from tasktune.models import load_model
    from tasktune.tasks import PromptBuilder
    from tasktune.tasks import get_task
    from tasktune.train import CompiledLayers, LeftPadCollator, TaskTrainer, add_lora

    lm = load_model(model, "auto", head="seqcls" if objective == "seqcls" else "causal_lm")
    loaded_rss = common.rss_mib()
    task = get_task("sst2")
    builder = PromptBuilder(task, lm.tokenizer)
    label_ids = task.label_token_ids(builder, rows[0])
    from tasktune.losses import get_objective

    features = task.train_features(builder, rows, get_objective(objective), seq_len, label_ids)
    model_ = add_lora(lm.model, TrainConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0), objective)
    timer = timer_callback(warmup)
    with tempfile.TemporaryDirectory() as out:
        args = common_args(out, steps + warmup, batch)
        args.train_sampling_strategy = "group_by_length"
        trainer = TaskTrainer(model=model_, args=args, train_dataset=features,
                              data_collator=LeftPadCollator(lm.tokenizer.pad_token_id), callbacks=[timer],
                              objective=get_objective(objective), label_token_ids=label_ids, validate=None)
        if compile:  # what `train.compile` does: the layers compiled inside the training steps
            trainer.compiled = CompiledLayers(model_)
        trainer.train()
    prompt_tokens = sum(len(builder.encode(builder.render(r))[-(seq_len - 1):]) for r in rows)
    return timer, loaded_rss, prompt_tokens / len(rows), lm.model.config


def worker(config: str, model: str, batch: int, steps: int, warmup: int, seq_len: int, quick: bool) -> dict:
    from flops import lora_training_flops

    name, batch, compile = parse_config(config, batch)
    rows = rows_for(batch * (steps + warmup), quick)
    if name in ("baseline", "padded"):
        timer, loaded, tokens, model_config = worker_baseline(model, rows, batch, steps, warmup, seq_len,
                                                              dynamic=name == "baseline", compile=compile)
    else:
        timer, loaded, tokens, model_config = worker_tasktune(model, rows, batch, steps, warmup, seq_len, name,
                                                              compile=compile)
    seconds = timer.end - timer.start
    lora = lora_parameters(model_config)
    # One definition of the work for every config: each row's prompt tokens, one predicted label token.
    flops = lora_training_flops(model_config, batch, round(tokens), 1, lora) * steps
    peak = common.peak_memory_mib()
    return {"config": config, "batch": batch, "examples_per_s": batch * steps / seconds, "s_per_step": seconds / steps,
            "warmup_s": timer.start - timer.began,
            # prompt tokens: padding and the baseline's answer token excluded
            "tokens_per_s": batch * steps * tokens / seconds, "model_tflops": flops / seconds / 1e12,
            "peak_mib": peak, "added_mib": peak - loaded}


def lora_parameters(config, r: int = 16) -> int:
    """LoRA parameters on the attention and MLP projections: r × (in + out) per adapted matrix."""
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv, ff = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim, config.intermediate_size
    per_layer = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + ff) + (ff + d)
    return r * per_layer * config.num_hidden_layers


def report(results: dict, configs: list[str], peak_tflops: float, baseline: str = "baseline") -> str:
    """One row per config: medians, ratios of medians against `baseline` with the per-repeat min–max, MFU."""
    rows = []
    for config in configs:
        runs = results[config]
        tflops = common.median([r["model_tflops"] for r in runs])
        rows.append([config, runs[0]["batch"], common.median([r["warmup_s"] for r in runs]),
                     common.median([r["examples_per_s"] for r in runs]),
                     common.median([r["tokens_per_s"] for r in runs]), tflops, f"{100 * tflops / peak_tflops:.1f}%",
                     common.median([r["peak_mib"] for r in runs]), common.median([r["added_mib"] for r in runs]),
                     common.ratio_of_medians(results, config, "examples_per_s", baseline),
                     common.ratio_of_medians(results, config, "added_mib", baseline)])
    return common.table(["config", "micro-batch", "warm-up s", "examples/s", "prompt tokens/s", "model TFLOP/s",
                         "MFU", "peak RSS MiB", "added by training MiB", "speed × baseline (min–max)",
                         "added memory × baseline (min–max)"],
                        rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 1 repeat, no RESULTS.md entry")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="a subset to run (the baseline is always run)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.batch, args.steps, args.warmup, args.seq_len, args.quick)))
        return
    tmp = tempfile.mkdtemp()
    if args.quick:
        args.model, args.repeats, args.steps, args.warmup = str(common.tiny_model(Path(tmp))), 1, 2, 1
    worker_args = ["--model", args.model, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--seq-len", str(args.seq_len)] + (["--quick"] if args.quick else [])
    before = common.matmul_peak_tflops(seconds=0.2 if args.quick else 2.0)
    configs = ["baseline"] + [c for c in args.configs.split(",") if c != "baseline"]
    for c in configs:
        if parse_config(c, args.batch)[0] not in CONFIGS:
            raise SystemExit(f"unknown config {c!r}: expected one of {', '.join(CONFIGS)}, optionally +bN / +compile")
    results = common.interleaved(Path(__file__), configs, worker_args, args.repeats, in_process=(
        (lambda c: worker(c, args.model, args.batch, args.steps, args.warmup, args.seq_len, True)) if args.quick
        else None))
    # This machine's matmul rate drifts (a shared VM): MFU is against the faster of two measurements.
    after = common.matmul_peak_tflops(seconds=0.2 if args.quick else 2.0)
    peak = max(before, after)
    body = report(results, configs, peak)
    body += (f"\n\nbatch {args.batch} (or the config's +bN), max length {args.seq_len}, {args.steps} timed steps "
             f"after {args.warmup} warm-up, {args.repeats} repeats interleaved. Ratios: median / median of the "
             f"baseline, with the min–max of the per-repeat ratios. MFU against {peak:.2f} TFLOP/s, the faster of two "
             f"bf16 2048² matmul measurements before and after the configs ({before:.2f} and {after:.2f}).")
    print(body)
    if not args.quick:
        common.record_results("SST-2 training", "python bench/train_sst2.py " + " ".join(sys.argv[1:]), body,
                              common.machine())


if __name__ == "__main__":
    main()
