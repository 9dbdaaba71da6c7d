"""Where a CPU training step spends its time: torch.profiler over tasktune's SST-2 training step.

For each micro-batch size given, the script builds tasktune's `label_lm` step on real SST-2 rows (the CPU
recipe's LoRA, bf16 base, adapter autocast), runs warm-up steps, profiles timed steps, and reports the share of
the step spent in matrix products (what MFU counts) against everything else (elementwise ops, norms, copies,
the optimizer, Python), with the top operators by self time. This is the evidence behind the MFU figures in
`train_sst2.py`: it says whether a larger micro-batch, fusion or compilation can help.
Usage: python bench/profile_train_step.py [--batches 16,64] [--steps 3] [--top 12]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# Operators that are matrix products, attention (SDPA forward and backward) included: the work MFU counts.
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_mkldnn_mm")


def build_step(model_name: str, batch: int, quick: bool):
    import torch

    from tasktune.config import TrainConfig
    from tasktune.losses import adapter_autocast, adapter_input_casting_off, objective_loss
    from tasktune.models import load_model
    from tasktune.tasks import PromptBuilder, get_task
    from tasktune.train import LeftPadCollator, add_lora
    from train_sst2 import rows_for

    lm = load_model(model_name, "auto")
    task = get_task("sst2")
    builder = PromptBuilder(task, lm.tokenizer)
    rows = rows_for(batch, quick)
    label_ids = task.label_token_ids(builder, rows[0])
    from tasktune.losses import get_objective

    features = task.train_features(builder, rows, get_objective("label_lm"), 64, label_ids)
    inputs = LeftPadCollator(lm.tokenizer.pad_token_id)(features)
    model = add_lora(lm.model, TrainConfig(lora_r=16, lora_alpha=32, lora_dropout=0.0), "label_lm")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        with adapter_input_casting_off(model):
            with adapter_autocast(model):
                loss = objective_loss(model, inputs, "label_lm", label_ids)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tokens = int(inputs["attention_mask"].sum())
    return step, tokens, inputs["input_ids"].shape


def profile(model_name: str, batch: int, steps: int, warmup: int, top: int, quick: bool) -> tuple[list, str]:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    step, tokens, shape = build_step(model_name, batch, quick)
    rank = 16  # build_step's LoRA rank
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    plain_s = (time.perf_counter() - start) / steps  # unprofiled: the profiler itself adds overhead
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    count = sum(e.count for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as shaped:
        for _ in range(steps):
            step()
    by_shape = matmul_by_shape(shaped.key_averages(group_by_input_shape=True), steps, rank)
    matmul_s = matmul / 1e6 / steps  # profiler times are in microseconds
    summary = [batch, f"{shape[0]}×{shape[1]}", tokens, plain_s, batch / plain_s, f"{100 * matmul / total:.0f}%",
               f"{100 * matmul_s / plain_s:.0f}%", round(count / steps)]
    lines = [f"micro-batch {batch} ({shape[0]}×{shape[1]} ids, {tokens} real tokens): top {top} operators by self "
             f"CPU time, share of the profiled step", "",
             common.table(["operator", "calls per step", "self time share"],
                          [[e.key, round(e.count / steps), f"{100 * e.self_cpu_time_total / total:.1f}%"]
                           for e in ranked]),
             "", f"micro-batch {batch}: `aten::mm` by shape (a second profiled pass, shapes recorded; LoRA's "
             f"products are those with a rank-{rank} side)", "", by_shape]
    return summary, "\n".join(lines)


def matmul_by_shape(events, steps: int, rank: int, top: int = 10) -> str:
    """The matrix products grouped by their operands' shapes: calls and milliseconds per step and the rate each
    shape reached inside the step, with LoRA's rank-r products summed apart from the base's: which products
    keep the step from the matmul rate measured alone."""
    groups = {}
    for e in events:
        if e.key != "aten::mm" or len(e.input_shapes) < 2 or len(e.input_shapes[0]) != 2:
            continue
        (m, k), (_, n) = e.input_shapes[0], e.input_shapes[1]
        entry = groups.setdefault((m, k, n), [0, 0.0])
        entry[0] += e.count
        entry[1] += e.self_cpu_time_total / 1e6
    rows, totals = [], {"LoRA (a rank side)": [0, 0.0, 0.0], "base weights and the rest": [0, 0.0, 0.0]}
    for (m, k, n), (count, seconds) in sorted(groups.items(), key=lambda kv: -kv[1][1]):
        flops = 2 * m * k * n * count
        total = totals["LoRA (a rank side)" if rank in (m, k, n) else "base weights and the rest"]
        total[0], total[1], total[2] = total[0] + count, total[1] + seconds, total[2] + flops
        if len(rows) < top:
            rows.append([f"{m}×{k} @ {k}×{n}", round(count / steps), f"{1000 * seconds / steps:.1f}",
                         f"{flops / seconds / 1e12:.3f}"])
    for name, (count, seconds, flops) in totals.items():
        rows.append([f"**all {name}**", round(count / steps), f"{1000 * seconds / steps:.1f}",
                     f"{flops / seconds / 1e12:.3f}" if seconds else "—"])
    return common.table(["operands", "calls per step", "ms per step", "TFLOP/s inside the step"], rows)


def matmul_rates(config, token_counts: list[int], seconds: float = 1.0) -> str:
    """TFLOP/s of the step's own linear shapes (tokens x hidden -> intermediate, forward and input gradient) in
    bf16 and fp32, next to the square 2048² product MFU is quoted against: is a larger micro-batch faster?"""
    import torch
    import torch.nn.functional as F

    def rate(fn, flops: float) -> float:
        return common.tflops_of(fn, flops, seconds)

    from tasktune.models import cpu_supports_bf16

    d, ff = config.hidden_size, config.intermediate_size
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        # Emulated bf16 (an AVX2-only CPU) takes minutes for one 2048-cube product: a 256 square says as much.
        size = 256 if dtype == torch.bfloat16 and not cpu_supports_bf16() else 2048
        a = torch.randn(size, size, dtype=dtype)
        rows.append([str(dtype).removeprefix("torch."), f"{size}×{size} @ {size}×{size}",
                     rate(lambda: a @ a, 2 * size**3)])
        weight = torch.randn(ff, d, dtype=dtype)
        for m in token_counts:
            x, grad = torch.randn(m, d, dtype=dtype), torch.randn(m, ff, dtype=dtype)
            rows.append([str(dtype).removeprefix("torch."), f"{m}×{d} → {ff} (forward)",
                         rate(lambda: F.linear(x, weight), 2 * m * d * ff)])
            rows.append([str(dtype).removeprefix("torch."), f"{m}×{ff} → {d} (input gradient)",
                         rate(lambda: grad @ weight, 2 * m * d * ff)])
    return common.table(["dtype", "product", "TFLOP/s"], rows)


def padding_shares(recipe_name: str, batch_sizes: list[int]) -> str:
    """How much of each training batch is padding, over the recipe's own training rows, with the Trainer's
    length-grouped sampler (what the recipes use) and in random order: what packing could still remove."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from tasktune.config import load_recipe
    from tasktune.models import load_tokenizer, resolve_model_path
    from tasktune.tasks import PromptBuilder, get_task

    recipe = load_recipe(recipe_name)
    task = get_task(recipe.task, recipe.eval.verbalizers, recipe.eval.max_prompt_tokens)
    rows, _ = task.load(recipe.data.path)
    by_id = {r["id"]: r for r in rows}
    train = task.training_sample([by_id[i] for i in task.split(rows, recipe.data)["train"]], recipe.data)
    builder = PromptBuilder(task, load_tokenizer(resolve_model_path(recipe.model)), recipe.eval.prompt_format)
    from tasktune.losses import get_objective

    features = task.train_features(builder, train, get_objective(recipe.train.objective), recipe.train.max_length,
                                   task.label_token_ids(builder, train[0]))
    lengths = [len(f["input_ids"]) for f in features]
    table = []
    for batch in batch_sizes:
        grouped = list(LengthGroupedSampler(batch, lengths=lengths, generator=torch.Generator().manual_seed(0)))
        shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
        shares = []
        for order in (grouped, shuffled):
            chunks = [[lengths[i] for i in order[k:k + batch]] for k in range(0, len(order), batch)]
            real, padded = sum(sum(c) for c in chunks), sum(max(c) * len(c) for c in chunks)
            shares.append(f"{100 * (1 - real / padded):.1f}%")
        table.append([batch, *shares])
    return (f"{recipe_name}: {len(lengths):,} training rows, {sum(lengths) / len(lengths):.1f} tokens on average "
            f"(min {min(lengths)}, max {max(lengths)}). Share of padding tokens per batch:\n\n" +
            common.table(["batch", "length-grouped (the recipes)", "random order"], table))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="16,64")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--quick", action="store_true", help="tiny random model, no RESULTS.md entry")
    parser.add_argument("--padding", metavar="RECIPE", help="only measure the padding share of RECIPE's training "
                        "batches (tokenizer only, no model run)")
    args = parser.parse_args()
    if args.padding:
        body = padding_shares(args.padding, [int(b) for b in args.batches.split(",")])
        print(body)
        common.record_results("Padding in the training batches", "python bench/profile_train_step.py " +
                              " ".join(sys.argv[1:]), body, common.machine())
        return
    if args.quick:
        import tempfile

        args.model = str(common.tiny_model(Path(tempfile.mkdtemp())))
    summaries, details, shapes = [], [], []
    for batch in [int(b) for b in args.batches.split(",")]:
        summary, detail = profile(args.model, batch, args.steps, args.warmup, args.top, args.quick)
        summaries.append(summary)
        details.append(detail)
        rows, width = (int(n) for n in summary[1].split("×"))
        shapes.append(rows * width)
    from transformers import AutoConfig

    from tasktune.models import resolve_model_path

    model_config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    model_config = getattr(model_config, "text_config", model_config)
    body = "\n\n".join([common.table(["micro-batch", "ids shape", "real tokens", "s/step (unprofiled)",
                                      "examples/s", "matmul share of op time",
                                      "matmul time / unprofiled step", "operator calls per step"],
                                     summaries), *details,
                         "Matrix products alone, at the steps' shapes (rows = the padded ids of each micro-batch):",
                         matmul_rates(model_config, shapes)])
    body += (f"\n\n{args.warmup} warm-up steps, then {args.steps} unprofiled and {args.steps} profiled steps per "
             "micro-batch, one process; tasktune's label_lm step (forward, backward, AdamW) on real SST-2 rows.")
    print(body)
    if not args.quick:
        common.record_results("SST-2 training step profile", "python bench/profile_train_step.py " +
                              " ".join(sys.argv[1:]), body, common.machine())


if __name__ == "__main__":
    main()
