"""A few data-parallel LoRA steps of a randomly initialised Llama-3.2-1B-shaped model, under accelerate.

  accelerate launch --config_file src/tasktune/recipes/accelerate/ddp.yaml  bench/gpu_ddp_check.py
  accelerate launch --config_file src/tasktune/recipes/accelerate/fsdp.yaml bench/gpu_ddp_check.py
  accelerate launch --multi_gpu --num_processes 2 bench/gpu_ddp_check.py --tiny   # CPU smoke test (gloo)

Runs tasktune's TaskTrainer (verbalizer objective) for --steps steps on random token ids and prints, on the
main process, tokens/s over all processes and peak memory per process. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from gpu_check import CONFIGS  # noqa: E402


def main() -> None:
    import torch
    import transformers
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, TrainingArguments

    from tasktune.config import TrainConfig
    from tasktune.losses import get_objective
    from tasktune.train import LeftPadCollator, TaskTrainer, add_lora

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8, help="per process")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="hidden 64, 2 layers: a CPU smoke test")
    args = parser.parse_args()
    state = PartialState(cpu=not torch.cuda.is_available())
    cls_name, kwargs = CONFIGS["llama-3.2-1b"]
    if args.tiny:
        kwargs = dict(kwargs, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512)
        args.seq_len = min(args.seq_len, 32)
    config = getattr(transformers, cls_name)(**kwargs)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_config(config, dtype=dtype), TrainConfig(lora_dropout=0.0), "verbalizer")
    generator = torch.Generator().manual_seed(0)
    n = args.batch * state.num_processes * (args.steps + 1)
    features = [{"input_ids": torch.randint(10, config.vocab_size, (args.seq_len,), generator=generator).tolist(),
                 "labels": i % 2} for i in range(n)]
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, max_steps=args.steps + 1, per_device_train_batch_size=args.batch,
                                     learning_rate=1e-4, save_strategy="no", report_to="none", logging_steps=1000,
                                     use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
                                     bf16=torch.cuda.is_available(), disable_tqdm=True)
        trainer = TaskTrainer(model=model, args=training, train_dataset=features, data_collator=LeftPadCollator(0),
                              objective=get_objective("verbalizer"), label_token_ids=[11, 12], validate=None)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    tokens = args.batch * state.num_processes * (args.steps + 1) * args.seq_len
    memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else common.peak_rss_mib() / 1024
    if state.is_main_process:
        print(f"processes {state.num_processes} ({state.distributed_type}), {tokens / seconds:,.0f} tokens/s "
              f"(incl. the first step), peak memory of the main process {memory:.2f} GiB")


if __name__ == "__main__":
    main()
