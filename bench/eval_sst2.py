"""SST-2 evaluation throughput: a per-example `model.generate` loop vs tasktune's batched protocols.

baseline   for each sentence: tokenize, model.generate(max_new_tokens=3, greedy), decode, parse (the seed's loop)
score      tasktune: length-sorted, left-padded batches; last hidden state → LM head at one position
generate   tasktune: the same batching with a KV cache, greedy, 3 new tokens, same parse

Also checks that batched generation predicts exactly what the per-example loop predicts.
Usage: python bench/eval_sst2.py [--quick] [--n 256] [--repeats 3]
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
    from tasktune.tasks.sst2 import SST2Task

    lm = load_model(model, dtype)
    task = SST2Task()
    builder = PromptBuilder(task, lm.tokenizer)
    rows = rows_for(n, quick)
    prompts = [builder.render(r) for r in rows]
    # Warm-up outside the timed region (first-call allocations, thread pools).
    infer.score_tokens(lm.model, [builder.encode(p) for p in prompts[:2]], [0, 1], lm.tokenizer.pad_token_id, 2)
    start = time.perf_counter()
    if config == "baseline":
        preds = []
        with torch.inference_mode():
            for prompt in prompts:
                enc = lm.tokenizer(prompt, return_tensors="pt")
                out = lm.model.generate(**enc, max_new_tokens=task.max_new_tokens, do_sample=False, top_p=None,
                                        top_k=None, temperature=None, pad_token_id=lm.tokenizer.pad_token_id)
                preds.append(task.parse(lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:],
                                                            skip_special_tokens=True)))
    else:
        encoded = [builder.encode(p) for p in prompts]  # tokenization is part of the timed work
        if config == "score":
            ids = task.label_token_ids(builder, rows[0])
            preds = infer.score_tokens(lm.model, encoded, ids, lm.tokenizer.pad_token_id, batch).argmax(-1).tolist()
        else:
            texts = infer.generate(lm.model, lm.tokenizer, encoded, task.max_new_tokens, batch).texts
            preds = [task.parse(t) for t in texts]
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
    base_preds = results["baseline"][0]["preds"]
    gen_preds = results["generate"][0]["preds"]
    agree = sum(a == b for a, b in zip(base_preds, gen_preds)) / len(base_preds)
    rows = []
    for config in CONFIGS:
        rows.append([config, common.median([r["examples_per_s"] for r in results[config]]),
                     common.ratio(results, config, "examples_per_s"), results[config][0]["accuracy"]])
    body = common.table(["config", "examples/s (median)", "speed × baseline", "accuracy"], rows)
    body += (f"\n\nGenerate-protocol predictions identical to the per-example loop: {agree:.2%} of {len(base_preds)} "
             f"(dtype {args.dtype}). n {args.n}, batch {args.batch}, {args.repeats} repeats interleaved; ratios are "
             "medians of per-repeat pairs.")
    print(body)
    if not args.quick:
        common.append_results("SST-2 evaluation", "python bench/eval_sst2.py " + " ".join(sys.argv[1:]), body,
                              common.machine())
    if agree < 1.0:
        print(f"WARNING: batched generation disagrees with the per-example loop on {1 - agree:.2%} of examples")


if __name__ == "__main__":
    main()
