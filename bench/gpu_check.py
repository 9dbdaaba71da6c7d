"""GPU throughput check with randomly initialised Llama-3.2-1B- and Gemma-2-2B-shaped models (no download).

For each model: a few LoRA training steps with tasktune's verbalizer objective and with the full-vocabulary
LM loss, reporting tokens/s, model FLOPs utilisation (6·N·tokens per step against the card's peak bf16
FLOP/s, passed with --peak-tflops) and peak CUDA memory. Finishes in well under 5 minutes on one H100.
Usage: python bench/gpu_check.py [--steps 10] [--batch 16] [--seq-len 256] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# The published configs, written out so nothing is downloaded.
CONFIGS = {
    "llama-3.2-1b": ("LlamaConfig", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                          num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                          max_position_embeddings=131072, rope_theta=500000.0,
                                          tie_word_embeddings=True)),
    "gemma-2-2b": ("Gemma2Config", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                         num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                         head_dim=256, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                                         sliding_window=4096, query_pre_attn_scalar=256)),
}


def measure(name: str, objective: str, steps: int, batch: int, seq_len: int, peak_tflops: float) -> list:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from tasktune.config import TrainConfig
    from tasktune.train import adapter_autocast, adapter_input_casting_off, add_lora, objective_loss

    cls_name, kwargs = CONFIGS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    attn = "eager" if cls_name == "Gemma2Config" else "sdpa"
    torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    model = add_lora(model, TrainConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0), "verbalizer")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(10, config.vocab_size, (batch, seq_len), device="cuda")
    mask = torch.ones_like(ids)
    positions = mask.cumsum(-1) - 1
    labels = torch.randint(0, 2, (batch,), device="cuda")
    rows = [11, 12]
    for step in range(steps + 2):
        if step == 2:
            torch.cuda.synchronize()
            start = time.perf_counter()
        if objective == "verbalizer":  # tasktune's training step: its loss, the adapter in bf16 mixed precision
            with adapter_input_casting_off(model):
                with adapter_autocast(model):
                    loss = objective_loss(model, {"input_ids": ids, "attention_mask": mask,
                                                  "position_ids": positions, "labels": labels}, "verbalizer", rows)
                loss.backward()
        else:  # the usual script: full-vocabulary LM loss, peft's fp32 adapter
            target = torch.full_like(ids, -100)
            target[:, -1] = ids[:, -1]
            loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = batch * seq_len * steps
    mfu = 6 * n_params * tokens / seconds / (peak_tflops * 1e12)
    return [name, objective, tokens / seconds, mfu, torch.cuda.max_memory_allocated() / 2**30]


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device")
    rows = [measure(name, objective, args.steps, args.batch, args.seq_len, args.peak_tflops)
            for name in CONFIGS for objective in ("lm", "verbalizer")]
    body = common.table(["model", "objective", "tokens/s", "MFU (6N·tokens)", "peak GiB"], rows)
    print(body)
    common.append_results("GPU check", "python bench/gpu_check.py " + " ".join(sys.argv[1:]), body, common.machine())


if __name__ == "__main__":
    main()
