"""SQuAD v2 evaluation throughput: tasktune's batched generation against the strongest standard script.

baseline   THE BASELINE: the tokenizer left-pads batches (same batch size), model.generate greedy with the same
           stop rule (stop_strings="\n", the same ≤32 new tokens), the abstain token suppressed at the first step
           (begin_suppress_tokens) and na_prob taken from generate's own first-step logits (output_logits=True)
loop       the seed's loop (an extra row): per question model.generate up to 32 tokens without a stop rule, cut at
           the first newline, then a second forward pass over the prompt for P(first token of " unanswerable")
tasktune   length-sorted left-padded batches, KV cache, stop at newline, na_prob read at the first step

Usage: python bench/eval_squad.py [--quick] [--n 64] [--repeats 3]
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
from train_squad import squad_rows  # noqa: E402

CONFIGS = ["baseline", "loop", "tasktune"]


def worker(config: str, model: str, n: int, batch: int, quick: bool) -> dict:
    import torch

    from tasktune.models import load_model
    from tasktune.tasks import PromptBuilder
    from tasktune.tasks import get_task

    lm = load_model(model, "auto")
    task = get_task("squad_v2")
    builder = PromptBuilder(task, lm.tokenizer)
    rows = squad_rows(n, quick)
    abstain_id = task.label_token_ids(builder, rows[0])[0]
    start = time.perf_counter()
    if config == "baseline":
        preds, na = [], []
        tok = lm.tokenizer
        tok.padding_side = "left"
        # stop_strings needs a tokenizer with merges; the tests' tiny word-level one stops on tasktune's criterion.
        from transformers import StoppingCriteriaList

        from tasktune.infer import NewlineStop

        stop = {"stopping_criteria": StoppingCriteriaList([NewlineStop(tok)])} if quick \
            else {"stop_strings": ["\n"], "tokenizer": tok}
        with torch.inference_mode():
            for start_row in range(0, len(rows), batch):
                chunk = rows[start_row:start_row + batch]
                ids = [task.fit_prompt(builder, r, task.max_prompt_tokens, keep_answer=False)[0] for r in chunk]
                enc = tok.pad({"input_ids": ids}, return_tensors="pt")  # the same prompt tokens, left-padded
                out = lm.model.generate(**enc, max_new_tokens=task.max_new_tokens, do_sample=False, top_p=None,
                                        top_k=None, temperature=None, pad_token_id=tok.pad_token_id,
                                        begin_suppress_tokens=[abstain_id], output_logits=True,
                                        return_dict_in_generate=True, **stop)
                texts = tok.batch_decode(out.sequences[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                preds += [t.split("\n")[0].strip() for t in texts]
                na += torch.softmax(out.logits[0].float(), -1)[:, abstain_id].tolist()
    elif config == "loop":
        preds, na = [], []
        with torch.inference_mode():
            for row in rows:
                ids, _ = task.fit_prompt(builder, row, task.max_prompt_tokens, keep_answer=False)
                enc = torch.tensor([ids])
                out = lm.model.generate(input_ids=enc, max_new_tokens=task.max_new_tokens, do_sample=False, top_p=None,
                                        top_k=None, temperature=None, pad_token_id=lm.tokenizer.pad_token_id)
                preds.append(lm.tokenizer.decode(out[0, enc.shape[1]:], skip_special_tokens=True).split("\n")[0].strip())
                logits = lm.model(input_ids=enc).logits[0, -1].float()
                na.append(torch.softmax(logits, -1)[abstain_id].item())
    else:
        from tasktune.evaluation import predict
        from tasktune.runner import Runner

        records, _ = predict(task, Runner(lm.model, lm.tokenizer, batch), builder, rows, ["generate"])
        na = [r["na_prob"] for r in records]
    seconds = time.perf_counter() - start
    return {"config": config, "examples_per_s": n / seconds, "seconds": seconds, "na_probs": na}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 1 repeat, no RESULTS.md entry")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.n, args.batch, args.quick)))
        return
    if args.quick:
        args.model, args.repeats, args.n = str(common.tiny_model(Path(tempfile.mkdtemp()))), 1, 12
    worker_args = ["--model", args.model, "--n", str(args.n), "--batch", str(args.batch)] + \
        (["--quick"] if args.quick else [])
    results = common.interleaved(Path(__file__), CONFIGS, worker_args, args.repeats, in_process=(
        (lambda c: worker(c, args.model, args.n, args.batch, True)) if args.quick else None))
    gap = max(abs(a - b) for a, b in zip(results["loop"][0]["na_probs"], results["tasktune"][0]["na_probs"]))
    gap_baseline = max(abs(a - b) for a, b in zip(results["baseline"][0]["na_probs"],
                                                  results["tasktune"][0]["na_probs"]))
    rows = []
    for config in CONFIGS:
        rows.append([config, common.median([r["examples_per_s"] for r in results[config]]),
                     common.ratio_of_medians(results, config, "examples_per_s", "baseline")])
    body = common.table(["config", "questions/s (median)", "speed × baseline (min–max)"], rows)
    body += (f"\n\nn {args.n} questions (official train subset), batch {args.batch}, {args.repeats} repeats "
             f"interleaved; ratios are median / median with the min–max of the per-repeat ratios. Largest |na_prob "
             f"difference| of tasktune vs the per-example loop: {gap:.4f}; vs the batched baseline: {gap_baseline:.4f}.")
    print(body)
    if not args.quick:
        common.record_results("SQuAD v2 evaluation", "python bench/eval_squad.py " + " ".join(sys.argv[1:]), body,
                              common.machine())


if __name__ == "__main__":
    main()
