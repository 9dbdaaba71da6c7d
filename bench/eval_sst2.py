"""SST-2 evaluation throughput: tasktune's batched protocols against the strongest standard way to do each.

loglik_loop      THE BASELINE for `score`: per example and label, one forward of prompt + verbalizer, summed
                 log-probability of the verbalizer's tokens, argmax (lm-evaluation-harness's loglikelihood at
                 batch size 1)
lm_eval          lm-evaluation-harness itself on the same rows, `--batch_size auto` (only where the `lmeval` extra
                 is installed; its own timing includes its request building)
hf_batched       THE BASELINE for `generate`: the tokenizer left-pads batches of 64, model.generate with greedy
                 decoding and the same 3 new tokens, same parse (what a competent user writes)
generate_loop    the seed's loop: per sentence model.generate, decode, parse (an extra row)
score            tasktune: length-sorted, left-padded batches; last hidden state → LM head at one position
generate         tasktune: the same batching with a KV cache, greedy, 3 new tokens, same parse

Also checks that batched generation predicts what the per-example loop predicts: in the timed dtype (bf16 on a
bf16-capable CPU, where padding changes rounding on close calls) and once more in fp32 (`--agreement-n` rows),
where the two must be identical.
Usage: python bench/eval_sst2.py [--quick] [--n 256] [--repeats 3] [--agreement-n 128]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from train_sst2 import rows_for  # noqa: E402

CONFIGS = ["loglik_loop", "hf_batched", "generate_loop", "score", "generate"]
PEERS = {"score": "loglik_loop", "lm_eval": "loglik_loop", "loglik_loop": "loglik_loop", "generate": "hf_batched",
         "hf_batched": "hf_batched", "generate_loop": "hf_batched"}


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
    verbalizers = task.verbalizer_tokens(builder, rows[0])

    def loglik_loop(prompts):
        preds = []
        with torch.inference_mode():
            for prompt in prompts:
                context = lm.tokenizer(prompt)["input_ids"]
                scores = []
                for continuation in verbalizers:
                    ids = torch.tensor([context + continuation])
                    logprobs = torch.log_softmax(lm.model(input_ids=ids).logits[0, len(context) - 1:-1].float(), -1)
                    scores.append(sum(logprobs[k, t].item() for k, t in enumerate(continuation)))
                preds.append(max(range(len(scores)), key=scores.__getitem__))
        return preds

    def generate_loop(prompts):
        preds = []
        with torch.inference_mode():
            for prompt in prompts:
                enc = lm.tokenizer(prompt, return_tensors="pt")
                out = lm.model.generate(**enc, max_new_tokens=task.max_new_tokens, do_sample=False, top_p=None,
                                        top_k=None, temperature=None, pad_token_id=lm.tokenizer.pad_token_id)
                preds.append(task.parse(lm.tokenizer.decode(out[0, enc["input_ids"].shape[1]:],
                                                            skip_special_tokens=True)))
        return preds

    def hf_batched(prompts):
        preds = []
        lm.tokenizer.padding_side = "left"
        with torch.inference_mode():
            for start in range(0, len(prompts), batch):
                enc = lm.tokenizer(prompts[start:start + batch], return_tensors="pt", padding=True)
                out = lm.model.generate(**enc, max_new_tokens=task.max_new_tokens, do_sample=False, top_p=None,
                                        top_k=None, temperature=None, pad_token_id=lm.tokenizer.pad_token_id)
                texts = lm.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                preds += [task.parse(t) for t in texts]
        return preds

    def batched(prompts):
        encoded = [builder.encode(p) for p in prompts]  # tokenization is part of the timed work
        if config == "score":
            ids = task.label_token_ids(builder, rows[0])
            return infer.score_tokens(lm.model, encoded, ids, lm.tokenizer.pad_token_id, batch).argmax(-1).tolist()
        texts = infer.generate(lm.model, lm.tokenizer, encoded, task.max_new_tokens, batch).texts
        return [task.parse(t) for t in texts]

    if config == "lm_eval":
        return lm_eval_worker(model, rows, dtype)
    run = {"loglik_loop": loglik_loop, "generate_loop": generate_loop, "hf_batched": hf_batched}.get(config, batched)
    run(prompts[-batch:])  # warm-up with the config's own code path: first-call allocations, thread pools
    start = time.perf_counter()
    preds = run(prompts)
    seconds = time.perf_counter() - start
    golds = [r["label"] for r in rows]
    return {"config": config, "examples_per_s": n / seconds, "seconds": seconds, "preds": preds,
            "accuracy": sum(p == g for p, g in zip(preds, golds)) / n}


def lm_eval_worker(model: str, rows: list[dict], dtype: str) -> dict:
    """lm-evaluation-harness on the same rows with its own batching (`batch_size auto`), timed end to end."""
    from crosscheck_lmeval import TASK_YAML
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from tasktune.models import resolve_model_path

    work = Path(tempfile.mkdtemp())
    rows_file = work / "rows.jsonl"
    rows_file.write_text("".join(json.dumps({"sentence": r["text"], "label": r["label"]}) + "\n" for r in rows))
    (work / "sst2_local.yaml").write_text(TASK_YAML.format(rows=rows_file))
    torch_dtype = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16"}.get(dtype, dtype)
    start = time.perf_counter()
    results = simple_evaluate(model="hf", model_args=f"pretrained={resolve_model_path(model)},dtype={torch_dtype}",
                              tasks=["sst2_local"], batch_size="auto", task_manager=TaskManager(include_path=str(work)),
                              device="cuda" if __import__("torch").cuda.is_available() else "cpu",
                              log_samples=False)
    seconds = time.perf_counter() - start
    accuracy = results["results"]["sst2_local"]["acc,none"]
    return {"config": "lm_eval", "examples_per_s": len(rows) / seconds, "seconds": seconds, "preds": [],
            "accuracy": accuracy}


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
    configs = CONFIGS + (["lm_eval"] if importlib.util.find_spec("lm_eval") and not args.quick else [])
    results = common.interleaved(Path(__file__), configs, worker_args, args.repeats, in_process=(
        (lambda c: worker(c, args.model, args.n, args.batch, args.dtype, True)) if args.quick else None))
    agree = agreement(results["generate_loop"][0]["preds"], results["generate"][0]["preds"])
    fp32_note = ""
    if args.agreement_n:
        fp32_args = ["--model", args.model, "--n", str(min(args.agreement_n, args.n)), "--batch", str(args.batch),
                     "--dtype", "fp32"] + (["--quick"] if args.quick else [])
        fp32 = {c: common.run_worker(Path(__file__), c, fp32_args)["preds"] for c in ("generate_loop", "generate")}
        fp32_agree = agreement(fp32["generate_loop"], fp32["generate"])
        fp32_note = f" In fp32: {fp32_agree:.2%} of {len(fp32['generate_loop'])}."
    rows = []
    for config in configs:
        peer = PEERS[config]
        rows.append([config, peer, common.median([r["examples_per_s"] for r in results[config]]),
                     common.ratio_of_medians(results, config, "examples_per_s", peer), results[config][0]["accuracy"]])
    body = common.table(["config", "compared with", "examples/s (median)", "speed × baseline (min–max)", "accuracy"],
                        rows)
    body += (f"\n\nGenerate-protocol predictions identical to the per-example loop: {agree:.2%} of {args.n} "
             f"(dtype {args.dtype}, as timed).{fp32_note} n {args.n}, batch {args.batch}, {args.repeats} repeats "
             "interleaved; ratios are median / median, with the min–max of the per-repeat ratios. `score` is "
             "compared with the per-example log-likelihood loop, `generate` with batched HF generation.")
    print(body)
    if not args.quick:
        common.record_results("SST-2 evaluation", "python bench/eval_sst2.py " + " ".join(sys.argv[1:]), body,
                              common.machine())
    if agree < 1.0:
        print(f"WARNING: batched generation disagrees with the per-example loop on {1 - agree:.2%} of examples")


def agreement(a: list, b: list) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


if __name__ == "__main__":
    main()
