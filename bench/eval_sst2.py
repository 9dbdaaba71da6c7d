"""SST-2 evaluation throughput: a per-example `model.generate` loop vs tasktune's batched protocols.

baseline   for each sentence: tokenize, model.generate(max_new_tokens=3, greedy), decode, parse (the seed's loop)
score      tasktune: length-sorted, left-padded batches; last hidden state → LM head at one position
generate   tasktune: the same batching with a KV cache, greedy, 3 new tokens, same parse

Also checks that batched generation predicts what the per-example loop predicts: in the timed dtype (bf16 on a
bf16-capable CPU, where padding changes rounding on close calls) and once more in fp32 (`--agreement-n` rows),
where the two must be identical.
Usage: python bench/eval_sst2.py [--quick] [--n 256] [--repeats 3] [--agreement-n 128]
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
from train_sst2 import rows_for  # noqa: E402

CONFIGS = ["baseline", "score", "generate"]


def worker(config: str, model: str, n: int, batch: int, dtype: str, quick: bool) -> dict:
    import torch

    from tasktune import infer
    from tasktune.models import load_model
    from tasktune.tasks import PromptBuilder
    from tasktune.tasks import get_task

    lm = load_model(model, dtype)
    task = get_task("sst2")
    builder = PromptBuilder(task, lm.tokenizer)
    rows = rows_for(n, quick)
    prompts = [builder.render(r) for r in rows]
    def baseline(prompts):
        preds = []
        with torch.inference_mode():
            for prompt in prompts:
                enc = lm.tokenizer(prompt, return_tensors="pt")
                out = lm.model.generate(**enc, max_new_tokens=task.max_new_tokens, do_sample=False, top_p=None,
                                        top_k=None, temperature=None, pad_token_id=lm.tokenizer.pad_token_id)
                preds.append(task.parse(lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:],
                                                            skip_special_tokens=True)))
        return preds

    def batched(prompts):
        encoded = [builder.encode(p) for p in prompts]  # tokenization is part of the timed work
        if config == "score":
            ids = task.label_token_ids(builder, rows[0])
            return infer.score_tokens(lm.model, encoded, ids, lm.tokenizer.pad_token_id, batch).argmax(-1).tolist()
        texts = infer.generate(lm.model, lm.tokenizer, encoded, task.max_new_tokens, batch).texts
        return [task.parse(t) for t in texts]

    run = baseline if config == "baseline" else batched
    run(prompts[-batch:])  # warm-up with the config's own code path: first-call allocations, thread pools
    start = time.perf_counter()
    preds = run(prompts)
    seconds = time.perf_counter() - start
    golds = [r["label"] for r in rows]
    return {"config": config, "examples_per_s": n / seconds, "seconds": seconds, "preds": preds,
            "accuracy": sum(p == g for p, g in zip(preds, golds)) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 1 repeat, no RESULTS.md entry")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--agreement-n", type=int, default=128, help="rows for the fp32 agreement check (0: skip)")
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.n, args.batch, args.dtype, args.quick)))
        return
    if args.quick:
        args.model, args.repeats, args.n = str(common.tiny_model(Path(tempfile.mkdtemp()))), 1, 32
    worker_args = ["--model", args.model, "--n", str(args.n), "--batch", str(args.batch), "--dtype", args.dtype] + \
        (["--quick"] if args.quick else [])
    results = common.interleaved(Path(__file__), CONFIGS, worker_args, args.repeats)
    agree = agreement(results["baseline"][0]["preds"], results["generate"][0]["preds"])
    fp32_note = ""
    if args.agreement_n:
        fp32_args = ["--model", args.model, "--n", str(min(args.agreement_n, args.n)), "--batch", str(args.batch),
                     "--dtype", "fp32"] + (["--quick"] if args.quick else [])
        fp32 = {c: common.run_worker(Path(__file__), c, fp32_args)["preds"] for c in ("baseline", "generate")}
        fp32_agree = agreement(fp32["baseline"], fp32["generate"])
        fp32_note = f" In fp32: {fp32_agree:.2%} of {len(fp32['baseline'])}."
    rows = []
    for config in CONFIGS:
        rows.append([config, common.median([r["examples_per_s"] for r in results[config]]),
                     common.ratio(results, config, "examples_per_s"), results[config][0]["accuracy"]])
    body = common.table(["config", "examples/s (median)", "speed × baseline", "accuracy"], rows)
    body += (f"\n\nGenerate-protocol predictions identical to the per-example loop: {agree:.2%} of {args.n} "
             f"(dtype {args.dtype}, as timed).{fp32_note} n {args.n}, batch {args.batch}, {args.repeats} repeats interleaved; ratios are "
             "medians of per-repeat pairs.")
    print(body)
    if not args.quick:
        common.append_results("SST-2 evaluation", "python bench/eval_sst2.py " + " ".join(sys.argv[1:]), body,
                              common.machine())
    if agree < 1.0:
        print(f"WARNING: batched generation disagrees with the per-example loop on {1 - agree:.2%} of examples")


def agreement(a: list, b: list) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


if __name__ == "__main__":
    main()
