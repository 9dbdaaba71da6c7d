"""GPU throughput and memory check with randomly initialised Llama-3.2-1B- and Gemma-2-2B-shaped models.

Nothing is downloaded. Two parts:
1. Throughput: a few LoRA training steps with tasktune's training step (its objective, the bf16 base with the
   adapter under autocast) and with the usual script's step (full-vocabulary LM loss through the model's own
   forward, peft's fp32 adapter), on full rows of --seq-len tokens. Reports tokens/s, model FLOP utilisation
   (bench/flops.py: LoRA-aware, against --peak-tflops) and peak CUDA memory.
   The same for each method (`--methods`, default lora,dora,full): full fine-tuning with fp32 master weights
   under bf16 autocast, its FLOPs with the base weights' gradients counted.
2. Memory of the GPU recipes: two training steps at each recipe's batch and maximum length (the worst batch),
   with and without gradient checkpointing, measured with torch.cuda.max_memory_allocated, beside the CPU
   estimate of bench/gpu_memory.py for the same configuration.
3. A 16 GB T4 on the lent card: each -16gb recipe's two steps as `dtype: auto` runs them on a T4 (fp16 weights,
   fp32 adapter weights, fp16 autocast with a gradient scaler), the process capped at 15 GiB with
   torch.cuda.set_per_process_memory_fraction: it fits, or the out-of-memory error is the finding.
Usage: python bench/gpu_check.py [--steps 10] [--batch 16] [--seq-len 256] [--peak-tflops 989] [--tiny]
       [--methods lora,dora,full]
  --tiny: hidden 64, 2 layers, on CPU: a smoke test of this script (no RESULTS.md entry).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from flops import decoder_linear_params, lora_training_flops  # noqa: E402

# The published configs, written out so nothing is downloaded.
from model_shapes import CONFIGS, RECIPES  # noqa: E402 (shared with gpu_memory.py)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, head_dim=16)
ANSWER_TOKENS = 8  # as bench/gpu_memory.py: the answer loss covers the last tokens of the row


T4_CAP_GIB = 15.0  # what a 16 GB T4 offers a process (15.0 GiB usable of 16 GB)


def build(name: str, train_cfg, device: str, tiny: bool, dtype=None):
    """The model as the method trains it: peft-wrapped on a bf16 (or `dtype`) base, or for `full` every weight
    trainable in fp32 (the master weights; the step then runs under autocast)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from tasktune.train import add_lora

    cls_name, kwargs = CONFIGS[name]
    kwargs = dict(copy.deepcopy(kwargs), **TINY) if tiny else kwargs
    config = getattr(transformers, cls_name)(**kwargs)
    attn = "eager" if cls_name == "Gemma2Config" else "sdpa"  # as tasktune loads them
    full = train_cfg.method == "full"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if full else dtype or torch.bfloat16,
                                                 attn_implementation=attn)
    if full:
        return model.requires_grad_(True), config
    model = add_lora(model, train_cfg, train_cfg.objective)
    for param in model.parameters():  # fp32 adapter weights, as tasktune.train.fit keeps them on an fp16 base
        if param.requires_grad and param.dtype == torch.float16:
            param.data = param.data.float()
    return model, config


def batch_inputs(config, objective: str, batch: int, seq_len: int, device: str) -> dict:
    import torch

    ids = torch.randint(10, config.vocab_size, (batch, seq_len), device=device)
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": mask.cumsum(-1) - 1}
    if objective == "answer":
        labels = torch.full_like(ids, -100)
        labels[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
    elif objective == "lm":  # the usual script: LM loss on the last token, through the model's own forward
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
    else:
        labels = torch.randint(0, 2, (batch,), device=device)
    inputs["labels"] = labels
    return inputs


def train_steps(model, inputs: dict, objective: str, steps: int, sync, autocast=None) -> float:
    """Seconds for `steps` optimizer steps after two untimed ones. `autocast`: the Trainer's mixed precision
    (full fine-tuning's bf16; fp16, with a gradient scaler, for the T4 case)."""
    import contextlib

    import torch

    from tasktune.losses import adapter_autocast, adapter_input_casting_off, objective_loss

    device = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device) if autocast == torch.float16 else None

    def loss_of():
        mixed = torch.autocast(device, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        if objective == "lm":  # peft's own fp32 adapter path, as a hand-written script runs it
            with mixed:
                return objective_loss(model, inputs, "lm")
        with adapter_input_casting_off(model), mixed:
            with adapter_autocast(model):
                return objective_loss(model, inputs, objective, [11, 12])

    return common.timed_steps(model, loss_of, steps, sync, scaler)


def throughput(name: str, objective: str, args, device: str, method: str = "lora") -> list:
    import torch

    from tasktune.config import TrainConfig

    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train_cfg = TrainConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0, objective=objective, method=method)
    model, config = build(name, train_cfg, device, args.tiny)
    full = method == "full"
    # Full fine-tuning also computes the base weights' gradients: bench/flops.py's adapter term with every
    # decoder weight as "trainable" is exactly that.
    trained = decoder_linear_params(config) if full else sum(p.numel() for p in model.parameters() if p.requires_grad)
    inputs = batch_inputs(config, objective, args.batch, args.seq_len, device)
    seconds = train_steps(model, inputs, objective, args.steps, torch.cuda.synchronize if cuda else lambda: None,
                          autocast=torch.bfloat16 if full else None)
    head_positions = args.seq_len if objective == "lm" else 1
    flops = lora_training_flops(config, args.batch, args.seq_len, head_positions, trained) * args.steps
    tokens = args.batch * args.seq_len * args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else common.peak_rss_mib() / 1024
    del model
    return [name, method, objective, tokens / seconds, flops / seconds / 1e12,
            flops / seconds / (args.peak_tflops * 1e12), peak]


def t4_emulated(recipe: str, model_name: str, args, device: str) -> list:
    """Two steps of a -16gb recipe as a T4 runs it, in a process capped at T4_CAP_GIB (see part 3)."""
    import torch

    from tasktune.config import load_recipe

    train_cfg = load_recipe(recipe).train
    batch, seq_len = (2, 16) if args.tiny else (train_cfg.batch_size, train_cfg.max_length)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.set_per_process_memory_fraction(T4_CAP_GIB * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    fits, peak = True, 0.0
    try:
        model, config = build(model_name, train_cfg, device, args.tiny, dtype=torch.float16)
        if train_cfg.gradient_checkpointing:
            model.activation_checkpointing_enable()
        inputs = batch_inputs(config, train_cfg.objective, batch, seq_len, device)
        train_steps(model, inputs, train_cfg.objective, 0, torch.cuda.synchronize if cuda else lambda: None,
                    autocast=torch.float16)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        del model
    except torch.OutOfMemoryError:
        fits = False
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0)
    return [recipe, batch, seq_len, train_cfg.gradient_checkpointing, peak, "yes" if fits else "no (out of memory)"]


def recipe_memory(recipe: str, model_name: str, checkpointing: bool, args, device: str) -> list:
    import torch

    from tasktune.config import load_recipe

    train_cfg = load_recipe(recipe).train
    train_cfg.lora_dropout = 0.0
    train_cfg.gradient_checkpointing = checkpointing
    batch, seq_len = (2, 16) if args.tiny else (train_cfg.batch_size, train_cfg.max_length)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, config = build(model_name, train_cfg, device, args.tiny)
    if checkpointing:
        model.activation_checkpointing_enable()  # as the Trainer does for train.gradient_checkpointing
    weights = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    inputs = batch_inputs(config, train_cfg.objective, batch, seq_len, device)
    train_steps(model, inputs, train_cfg.objective, 0, torch.cuda.synchronize if cuda else lambda: None)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    reserved = torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0
    del model
    return [recipe, train_cfg.objective, batch, seq_len, "on" if checkpointing else "off", weights, peak - weights,
            peak, reserved]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: a smoke test, no RESULTS.md entry")
    parser.add_argument("--methods", default="lora,dora,full")
    args = parser.parse_args()
    if args.tiny:
        device, args.steps, args.batch, args.seq_len = "cpu", 2, 2, 16
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        raise SystemExit("gpu_check needs a CUDA device (or --tiny for a CPU smoke test)")
    rows = [throughput(name, objective, args, device)
            for name in CONFIGS for objective in ("lm", "verbalizer", "label_lm", "answer")]
    rows += [throughput(name, "label_lm", args, device, method)
             for name in CONFIGS for method in args.methods.split(",") if method != "lora"]
    speed = common.table(["model", "method", "objective", "tokens/s", "model TFLOP/s",
                          f"MFU (of {args.peak_tflops:g})", "peak GiB"], rows)
    speed += (f"\n\nBatch {args.batch} x {args.seq_len} tokens, {args.steps} timed steps after 2 untimed, bf16 base, "
              "LoRA r16 on the attention and MLP projections. `lm`: the usual script (full-vocabulary LM loss "
              "through the model's forward, peft's fp32 adapter); the others: tasktune's training step. MFU counts "
              "the FLOPs of bench/flops.py (LoRA-aware: no base weight gradients).")

    memory_rows = [recipe_memory(recipe, model_name, checkpointing, args, device)
                   for recipe, model_name in RECIPES.items() for checkpointing in (False, True)]
    memory = common.table(["recipe", "objective", "batch", "max length", "grad. checkpointing", "weights GiB",
                           "step adds GiB", "peak allocated GiB", "peak reserved GiB"], memory_rows)
    memory += ("\n\nTwo training steps (AdamW state live in the second) with every row at the recipe's maximum "
               "length. Compare `step adds` with bench/gpu_memory.py's `step peak (live tensors)` estimate.")
    t4_rows = [t4_emulated(Path(recipe).stem + "-16gb", model_name, args, device)
               for recipe, model_name in RECIPES.items()]
    t4 = common.table(["recipe", "batch", "max length", "grad. checkpointing", "peak allocated GiB",
                       f"fits {T4_CAP_GIB:g} GiB"], t4_rows)
    t4 += ("\n\nThe 16 GB recipes as a T4 runs them (fp16 weights, fp32 adapter weights, fp16 autocast and a "
           f"gradient scaler), two steps at the recipe's batch with every row at max length, in a process capped at "
           f"{T4_CAP_GIB:g} GiB on the lent card (a T4's speed is not emulated, only its memory and dtype).")
    print(speed, memory, t4, sep="\n\n")
    if not args.tiny:
        facts = common.machine()
        common.record_results("GPU check: training throughput and MFU", "python bench/gpu_check.py "
                              + " ".join(sys.argv[1:]), speed, facts)
        common.record_results("GPU check: recipe memory measured", "python bench/gpu_check.py", memory, facts)
        common.record_results("GPU check: the 16 GB recipes on an emulated T4", "python bench/gpu_check.py", t4, facts)


if __name__ == "__main__":
    main()
