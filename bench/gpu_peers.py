"""Side by side on one GPU: the strongest standard LoRA recipe, Liger-Kernel, Unsloth and tasktune, same job.

Every config trains LoRA r16 (alpha 32, no dropout, the seven projections) on a randomly initialised
Llama-3.2-1B- or Gemma-2-2B-shaped model (bench/model_shapes.py; nothing is downloaded) with AdamW, bf16 weights,
the same batch of token rows and the same steps, each in a fresh process:

hf          THE BASELINE: transformers + peft, SDPA attention (FlashAttention-2 when `flash_attn` is installed),
            the model's own forward with labels on the answer tokens (full-vocabulary cross-entropy), the
            Trainer's bf16 autocast: the strongest standard recipe
hf+liger    the same with Liger-Kernel's fused RMSNorm / SwiGLU / RoPE and fused linear cross-entropy
            (`liger_kernel.transformers.apply_liger_kernel_to_*`)
unsloth     Unsloth's own recipe: `FastLanguageModel.from_pretrained` on the saved random model and
            `FastLanguageModel.get_peft_model`, its fused kernels and its forward with labels
tasktune    tasktune's step (`answer` objective: the LM head only at the answer tokens; bf16 adapter under
            autocast), and `tasktune+compile` with `train.compile`'s compiled decoder layers

Rows are --seq-len tokens (default 256), the loss on the last 8 (an answer), as SQuAD v2 rows are trained; the
rows are the same random ids for every config. Reported: tokens/s, MFU (bench/flops.py, LoRA-aware, against
--peak-tflops), peak CUDA memory, and each config's ratio to the baseline and to Unsloth (medians over
--repeats interleaved runs, with the min-max of the per-repeat ratios). A peer that cannot be imported
(Unsloth and Liger need a CUDA GPU and Triton; the device machine has no network, so the wheels must be there)
is reported as not run, with its error, never left out silently.
Usage: python bench/gpu_peers.py [--models llama-3.2-1b,gemma-2-2b] [--configs ...] [--steps 10] [--batch 16]
       [--seq-len 256] [--repeats 3] [--peak-tflops 989]
       python bench/gpu_peers.py --tiny   (hidden 64, 2 layers, CPU: the script's own test; no RESULTS.md entry)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from flops import lora_training_flops  # noqa: E402
from model_shapes import CONFIGS  # noqa: E402

CONFIG_NAMES = ("hf", "hf+liger", "unsloth", "tasktune", "tasktune+compile")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ANSWER_TOKENS = 8
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, head_dim=16)


def save_random_model(name: str, out: Path, tiny: bool) -> Path:
    """The model's shapes with random weights, saved with a word-level tokenizer (Unsloth loads from a folder)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    cls_name, kwargs = CONFIGS[name]
    kwargs = dict(copy.deepcopy(kwargs), **TINY) if tiny else kwargs
    config = getattr(transformers, cls_name)(**kwargs, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    vocab = {f"w{i}": i for i in range(config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w3")),
                                        pad_token="w0", bos_token="w1", eos_token="w2", unk_token="w3")
    tokenizer.save_pretrained(out)
    return out


def batch(config, rows: int, seq_len: int, device: str) -> dict:
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(10, config.vocab_size, (rows, seq_len), generator=generator).to(device)
    labels = torch.full_like(ids, -100)
    labels[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
    mask = torch.ones_like(ids)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": mask.cumsum(-1) - 1, "labels": labels}


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


def attention_implementation(model_type: str, device: str) -> str:
    """FlashAttention-2 on a GPU where installed; else SDPA, except Gemma 2, whose attention logit softcapping
    SDPA does not apply (transformers then recommends eager, as tasktune loads it)."""
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "eager" if model_type == "gemma2" else "sdpa"


def hf_model(path: Path, device: str, liger: bool):
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    if liger:  # patches the model classes before they are built
        import liger_kernel.transformers as liger_kernel

        getattr(liger_kernel, f"apply_liger_kernel_to_{AutoConfig.from_pretrained(path).model_type}")()
    model_type = AutoConfig.from_pretrained(path).model_type
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                 attn_implementation=attention_implementation(model_type, device))
    return get_peft_model(model.to(device), lora_config())


def unsloth_model(path: Path, seq_len: int):
    from unsloth import FastLanguageModel  # noqa: I001 (Unsloth patches transformers on import)

    model, _ = FastLanguageModel.from_pretrained(model_name=str(path), max_seq_length=seq_len, dtype=None,
                                                 load_in_4bit=False)
    return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                            bias="none", use_gradient_checkpointing=False, random_state=0)


def own_forward_loss(model, inputs: dict, device: str):
    """The peers' loss: the model's forward computes it from `labels`, under the Trainer's bf16 autocast."""
    import torch

    def loss_of():
        with torch.autocast(device, dtype=torch.bfloat16):
            return model(**inputs).loss

    return loss_of


def tasktune_model(path: Path, device: str):
    from tasktune.config import TrainConfig
    from tasktune.models import load_model
    from tasktune.train import add_lora

    lm = load_model(str(path), "bf16")
    return add_lora(lm.model.to(device), TrainConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0,
                                                     target_modules=TARGETS), "answer")


def tasktune_loss(model, inputs: dict, compiled: bool):
    """tasktune's step: its `answer` objective, the adapter under autocast, and with `compiled` the layers
    compiled inside the step as TaskTrainer runs them (`train.compile`)."""
    import contextlib

    from tasktune.losses import adapter_autocast, adapter_input_casting_off, objective_loss
    from tasktune.train import CompiledLayers

    layers = CompiledLayers(model) if compiled else None

    def loss_of():
        active = layers.active() if layers is not None else contextlib.nullcontext()
        with adapter_input_casting_off(model), active, adapter_autocast(model):
            return objective_loss(model, inputs, "answer")

    return loss_of


def worker(config_name: str, model_name: str, path: Path, args) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        if config_name == "unsloth":
            model = unsloth_model(path, args.seq_len)
        elif config_name.startswith("hf"):
            model = hf_model(path, device, liger=config_name == "hf+liger")
        else:
            model = tasktune_model(path, device)
        config = model.get_base_model().config
        inputs = batch(config, args.batch, args.seq_len, device)
        loss_of = (tasktune_loss(model, inputs, compiled=config_name == "tasktune+compile")
                   if config_name.startswith("tasktune") else own_forward_loss(model, inputs, device))
        seconds = common.timed_steps(model, loss_of, args.steps,
                                     torch.cuda.synchronize if device == "cuda" else (lambda: None))
    except Exception as error:  # a config that cannot run here is a row that says why (the test requires
        # numbers for hf and tasktune, so their failures still fail it)
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200],
                "trace": traceback.format_exc()[-1500:]}
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # The loss sits on the answer tokens: the LM head is needed there only (tasktune applies it there; the
    # peers' forwards apply it everywhere, which is their cost, not work the job needs).
    flops = lora_training_flops(config, args.batch, args.seq_len, ANSWER_TOKENS, lora) * args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else common.peak_rss_mib() / 1024
    return {"tokens_per_s": args.batch * args.seq_len * args.steps / seconds, "tflops": flops / seconds / 1e12,
            "peak_gib": peak, "trainable": lora, "device": device}


def ratio_cell(results: dict, config: str, reference: str) -> str:
    mine, theirs = results[config], results.get(reference, [])
    if not theirs or any("error" in r for r in mine + theirs):
        return "—"
    ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(mine, theirs)]
    median = (statistics.median(r["tokens_per_s"] for r in mine) /
              statistics.median(r["tokens_per_s"] for r in theirs))
    return f"{median:.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def table(model_name: str, results: dict, peak_tflops: float) -> list[list]:
    rows = []
    for config, runs in results.items():
        failed = next((r["error"] for r in runs if "error" in r), None)
        if failed:
            rows.append([model_name, config, "not run: " + failed, "", "", "", "", ""])
            continue
        tokens = statistics.median(r["tokens_per_s"] for r in runs)
        tflops = statistics.median(r["tflops"] for r in runs)
        rows.append([model_name, config, f"{tokens:,.0f}", f"{tflops:.1f}", f"{100 * tflops / peak_tflops:.1f}%",
                     f"{max(r['peak_gib'] for r in runs):.2f}", ratio_cell(results, config, "hf"),
                     ratio_cell(results, config, "unsloth")])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(CONFIGS))
    parser.add_argument("--configs", default=",".join(CONFIG_NAMES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: the script's test, no entry")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.batch, args.seq_len, args.repeats = 2, 2, 32, 1
    if args.worker:
        config, path = args.worker
        print(json.dumps(worker(config, Path(path).name, Path(path), args)))
        return
    configs = ["hf"] + [c for c in args.configs.split(",") if c != "hf"]
    unknown = sorted(set(configs) - set(CONFIG_NAMES))
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; expected some of {list(CONFIG_NAMES)}")
    import torch

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_peers compares GPU training; run it on a CUDA device (or --tiny for its CPU test)")
    passed = ["--steps", str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len)]
    passed += ["--tiny"] if args.tiny else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            path = save_random_model(model_name, Path(tmp) / model_name, args.tiny)
            results = {c: [] for c in configs}
            for _ in range(args.repeats):  # interleaved, so drift hits every config alike
                for config in configs:
                    results[config].append(common.run_worker(Path(__file__), config, [str(path), *passed]))
            rows += table(model_name, results, args.peak_tflops)
    body = common.table(["model", "config", "tokens/s", "model TFLOP/s", f"MFU (of {args.peak_tflops:g})",
                         "peak GiB", "× hf (min–max)", "× unsloth (min–max)"], rows)
    body += (f"\n\nLoRA r16 on the seven projections, bf16, batch {args.batch} × {args.seq_len} tokens, loss on the "
             f"last {ANSWER_TOKENS}, {args.steps} timed steps after 2 untimed, {args.repeats} repeats interleaved "
             "(each a fresh process); ratios of medians. hf's attention: FlashAttention-2 where installed, else "
             "SDPA (Gemma 2: eager, which applies its logit softcapping).")
    print(body)
    if not args.tiny:
        common.record_results("GPU side by side: HF, Liger, Unsloth, tasktune", "python bench/gpu_peers.py " +
                              " ".join(sys.argv[1:]), body, common.machine())


if __name__ == "__main__":
    main()
