"""Training memory of the GPU recipes (Llama-3.2-1B, Gemma-2-2B), estimated on a CPU: no GPU, no download.

How: tasktune's own training step (the recipe's objective and LoRA settings, bf16 base with the adapter under
autocast, AdamW; two steps, so optimizer state is live in the second) runs on CPU on randomly
initialised models with the published config cut to 1 and to 2 decoder layers, at the recipe's batch size with
every row at the recipe's maximum length (the worst batch). A dispatch mode adds up the bytes of live tensors
after every operation. Every decoder layer has the same shapes, so the step's peak grows linearly with depth:
peak(N) = peak(1) + (N - 1) * (peak(2) - peak(1)). Activations grow linearly with the batch, so the same at half
the batch gives the cost of one more row, and from it the largest batch per card. The frozen base weights are
counted exactly at full depth.

Methods: LoRA is measured as above. QLoRA and full fine-tuning are derived from LoRA's measured step with exact
byte counts of the model's tensors: QLoRA stores the decoder's linear weights in NF4 with double quantization
(4 bits + one 8-bit absmax per 64 weights + one fp32 per 256 absmaxes) and dequantizes one layer's weight at a
time; full fine-tuning holds fp32 weights, fp32 gradients, two fp32 AdamW moments and the bf16 copies autocast
makes for the step. In a tasktune run the 16-bit base that the zero-shot and fine-tuned evaluations use stays
loaded beside a base of the method's own (QLoRA, full), so "need in a run" adds it for those.

Live tensor bytes are what `torch.cuda.max_memory_allocated()` reports. A card also needs the CUDA context and
the caching allocator's slack on top: the table adds 2 GiB for that before deciding what fits. Both
extrapolations are checked against direct measurements on a narrower model (reported). Where a GPU is available,
`bench/gpu_check.py` measures the real peak.
Usage: python bench/gpu_memory.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from model_shapes import CONFIGS, RECIPES  # noqa: E402,F401

GIB = 2**30
CUDA_OVERHEAD_GIB = 2.0  # CUDA context + caching-allocator slack, added before deciding what fits
CARDS_GIB = {"16 GB": 16e9 / GIB, "24 GB": 24e9 / GIB, "80 GB": 80e9 / GIB}
METHODS = ("lora", "qlora", "full")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # bitsandbytes NF4, double quantization, blocksize 64
ANSWER_TOKENS = 8  # SQuAD rows: the loss covers the answer tokens at the end of the row

# The GPU recipes and the model config (in gpu_check.py) each one trains.


def recipe_train_config(name: str):
    """The recipe's training section: objective, per-device batch, maximum length, LoRA settings."""
    from tasktune.config import load_recipe

    return load_recipe(name).train


def default_train_config():
    from tasktune.config import TrainConfig

    return TrainConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0)


class LiveTensorBytes:
    """A dispatch mode that tracks the bytes of every storage created while it is active, and their peak.

    Storages of `existing` tensors (the model's weights) are left out: ops return views of them (`t()` of a
    weight), which share their storage without allocating anything.
    """

    def __init__(self, existing):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.record(out)
                return out

        self.mode, self.live, self.peak = Mode(), {}, 0
        self.existing = {tensor.untyped_storage()._cdata for tensor in existing}

    def record(self, out) -> None:
        import torch
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils import _pytree as pytree

        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                storage = leaf.untyped_storage()
                if storage._cdata in self.existing:
                    continue
                self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.live = {key: value for key, value in self.live.items() if not value[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


# The dtype of the measured steps: bf16 as the recipes train, except in --quick on a CPU without bf16
# instructions (emulated bf16 takes minutes there), where fp32 checks the same extrapolations.
STEP_DTYPE = "bfloat16"


def build(model_name: str, train_cfg, layers: int | None, device: str = "cpu", width_divisor: int = 1):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from tasktune.train import add_lora

    cls_name, kwargs = CONFIGS[model_name]
    kwargs = copy.deepcopy(kwargs)
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    if width_divisor > 1:  # the extrapolation check: same structure, smaller
        for key in ("hidden_size", "intermediate_size", "vocab_size"):
            kwargs[key] //= width_divisor
    config = getattr(transformers, cls_name)(**kwargs)
    attn = "eager" if cls_name == "Gemma2Config" else "sdpa"  # as tasktune loads them
    with torch.device(device):
        dtype = torch.bfloat16 if device == "meta" else getattr(torch, STEP_DTYPE)  # weights counted in bf16
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return add_lora(model, train_cfg, train_cfg.objective), config


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def step_peak(model_name: str, train_cfg, layers: int, batch: int, seq_len: int, width_divisor: int = 1) -> int:
    """Peak live bytes of two training steps, weights excluded (they exist before tracking starts)."""
    import torch

    from tasktune.losses import adapter_autocast, adapter_input_casting_off, objective_loss

    objective = train_cfg.objective
    torch.manual_seed(0)
    model, config = build(model_name, train_cfg, layers, width_divisor=width_divisor)
    model.train()
    if train_cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()  # as the Trainer does for train.gradient_checkpointing
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(10, config.vocab_size, (batch, seq_len))
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1)}
    if objective == "answer":
        labels = torch.full_like(ids, -100)
        labels[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
        inputs["labels"] = labels
    else:
        inputs["labels"] = torch.randint(0, 2, (batch,))
    with LiveTensorBytes([*model.parameters(), *model.buffers()]) as tracker:
        for _ in range(2):
            with adapter_input_casting_off(model):  # as TaskTrainer.training_step and compute_loss do
                with adapter_autocast(model):
                    loss = objective_loss(model, inputs, objective, [11, 12])
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return tracker.peak


def depth_extrapolated(model_name: str, train_cfg, batch: int, seq_len: int, layers: int,
                       width_divisor: int = 1) -> float:
    one, two = (step_peak(model_name, train_cfg, n, batch, seq_len, width_divisor) for n in (1, 2))
    return one + (layers - 1) * (two - one)


def estimate(model_name: str, train_cfg, batch: int, seq_len: int) -> dict:
    """Weights and step peak at `batch`, and the per-row slope (from batch/2) to size other batches."""
    meta_model, config = build(model_name, train_cfg, None, device="meta")
    weights = weight_bytes(meta_model)
    full = depth_extrapolated(model_name, train_cfg, batch, seq_len, config.num_hidden_layers)
    half = depth_extrapolated(model_name, train_cfg, batch // 2, seq_len, config.num_hidden_layers)
    per_row = (full - half) / (batch - batch // 2)
    return {"weights": weights, "step": full, "per_row": per_row, "fixed": full - batch * per_row}


def tensor_counts(model_name: str) -> dict:
    """Exact element counts of the plain model (meta device): all parameters (tied ones once), the decoder's
    linear weights (what bitsandbytes quantizes; the LM head stays 16-bit) and the largest of them."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, kwargs = CONFIGS[model_name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(getattr(transformers, cls_name)(**kwargs), dtype=torch.bfloat16)
    linear = [m.weight.numel() for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}."]
    return {"params": sum(p.numel() for p in model.parameters()), "linear": sum(linear), "largest": max(linear)}


def method_estimate(lora: dict, counts: dict, method: str) -> dict:
    """weights / step / per_row / fixed of `method`, from LoRA's measured figures (see the module docstring),
    and `in_run`: the bytes a tasktune run holds beside it (the 16-bit base of the evaluations)."""
    if method == "lora":
        return {**lora, "in_run": 0}
    base_16bit = counts["params"] * 2
    if method == "qlora":
        weights = lora["weights"] - counts["linear"] * 2 + counts["linear"] * NF4_BYTES
        extra_step = counts["largest"] * 2  # one dequantized weight at a time
    else:  # full: fp32 weights; gradients, AdamW moments and autocast's bf16 copies live in the step
        weights = counts["params"] * 4
        extra_step = counts["params"] * (4 + 8 + 2)
    return {"weights": weights, "step": lora["step"] + extra_step, "per_row": lora["per_row"],
            "fixed": lora["fixed"] + extra_step, "in_run": base_16bit}


def largest_batch(est: dict, card_gib: float) -> int:
    room = card_gib * GIB - CUDA_OVERHEAD_GIB * GIB - est["weights"] - est["fixed"] - est.get("in_run", 0)
    return max(int(room // est["per_row"]), 0)


def check_extrapolation(quick: bool) -> dict:
    """Depth and batch extrapolations vs direct measurements, on a narrower Llama-shaped model."""
    batch, seq_len, divisor = (2, 32, 16) if quick else (4, 128, 4)
    cfg = default_train_config()
    cfg.objective = "answer"
    depth = depth_extrapolated("llama-3.2-1b", cfg, batch, seq_len, 4, divisor)
    direct = step_peak("llama-3.2-1b", cfg, 4, batch, seq_len, divisor)
    one, two = (step_peak("llama-3.2-1b", cfg, 2, b, seq_len, divisor) for b in (batch // 2, batch))
    by_batch = two + (two - one) / (batch - batch // 2) * batch  # at 2 x batch
    direct_batch = step_peak("llama-3.2-1b", cfg, 2, 2 * batch, seq_len, divisor)
    return {"depth": depth / direct - 1, "batch": by_batch / direct_batch - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, correctness only, no RESULTS.md entry")
    args = parser.parse_args()
    global STEP_DTYPE
    from tasktune.models import cpu_supports_bf16

    if args.quick and not cpu_supports_bf16():
        STEP_DTYPE = "float32"
    check = check_extrapolation(args.quick)
    recipes = list(RECIPES)[:1] if args.quick else list(RECIPES)
    rows = []
    for recipe in recipes:
        train_cfg = recipe_train_config(recipe)
        train_cfg.method = "lora"
        batch, seq_len = (2, 16) if args.quick else (train_cfg.batch_size, train_cfg.max_length)
        counts = tensor_counts(RECIPES[recipe])
        for checkpointing in (False, True):
            train_cfg.gradient_checkpointing = checkpointing
            lora = estimate(RECIPES[recipe], train_cfg, batch, seq_len)
            for method in METHODS:
                est = method_estimate(lora, counts, method)
                need = (est["weights"] + est["step"] + est["in_run"]) / GIB + CUDA_OVERHEAD_GIB
                rows.append([recipe, method, seq_len, "on" if checkpointing else "off", est["weights"] / GIB, batch,
                             est["step"] / GIB, need, *(largest_batch(est, size) for size in CARDS_GIB.values())])
    body = common.table(["recipe", "method", "max length", "grad. checkpointing", "weights GiB", "batch",
                         "step peak GiB (live tensors)", f"need in a run GiB (+{CUDA_OVERHEAD_GIB:.0f} CUDA)",
                         *(f"largest batch, {card}" for card in CARDS_GIB)], rows)
    body += ("\n\nEvery row at the maximum length (the worst batch); the recipes' batch is per device; a largest batch "
             "of 0 means it does not fit. lora: measured (live tensors of tasktune's step on CPU); qlora and full: "
             "LoRA's measured step with exact byte counts (module docstring), and in a run the 16-bit base of the "
             "evaluations beside them. Extrapolation checks (Llama-shaped, narrower, answer loss): 4 layers from 1 "
             f"and 2 vs measured directly {check['depth']:+.2%}; twice the batch from batch and batch/2 vs measured "
             f"directly {check['batch']:+.2%}.")
    print(body)
    if not args.quick:
        common.record_results("GPU recipe memory (estimated on CPU)", "python bench/gpu_memory.py", body,
                              common.machine())


if __name__ == "__main__":
    main()
