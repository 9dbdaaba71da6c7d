"""Every adaptation method on the same SST-2 job: accuracy with intervals, paired against LoRA, speed, memory,
size.

Each method runs the shipped recipe `sst2-gemma3-270m-cpu` as `tasktune run` in its own process, with the same
split, seed, rows and steps; only `train.method` differs, and the learning rate where a method's usual one is
another (`LEARNING_RATES`: full fine-tuning and IA3 are not trained at LoRA's rate by anyone). The cost checks are off and the test
sample is the split's whole sentences only (the headline rows), to keep the table within half an hour on 2 CPU
cores. Reported per method: the fine-tuned test accuracy on whole sentences with its 95% interval and n, the
paired difference to LoRA on the same rows (paired bootstrap and exact McNemar, the task's own `paired`), the
best validation accuracy, training examples/s, the process's peak RSS (its own, from wait4), trainable
parameters and the adapter's size on disk.
Usage: python bench/methods.py [--quick] [--methods lora,dora,rslora,pissa,ia3,qlora,full] [--train-rows 800]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ["lora", "dora", "rslora", "pissa", "ia3", "qlora", "full"]
# The recipe's rate for the LoRA family (2e-4 until c1a810d, then the sweep's 1.846e-4); IA3 at the IA3 paper's 3e-3 (at 2e-4 it barely moved: 0.654 on
# 2026-12-02); full fine-tuning at 5e-5, the rate of Google's Gemma 3 270M fine-tuning guide.
LEARNING_RATES = {"ia3": 3e-3, "full": 5e-5}


def run_method(method: str, out: Path, model: str | None, settings: list[str], in_process: bool = False) -> dict:
    """One `tasktune run` in a fresh process; its wall time and its own peak RSS. `in_process` (--quick, whose
    figures are not kept): in this process, without a Python start-up and imports per method."""
    rate = [f"train.learning_rate={LEARNING_RATES[method]}"] if method in LEARNING_RATES else []
    arguments = ["run", "sst2-gemma3-270m-cpu", f"name={method}", f"output_dir={out}", f"train.method={method}",
                 *settings, *rate] + ([f"model={model}"] if model else [])
    command = [sys.executable, "-m", "tasktune", *arguments]
    started = time.perf_counter()
    if in_process:
        import resource

        from tasktune.cli import main as tasktune

        if tasktune(arguments) != 0:
            raise RuntimeError(f"train.method={method} failed")
        return {"wall_s": time.perf_counter() - started,
                "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"train.method={method} failed:\n{err[-3000:]}")
    return {"wall_s": time.perf_counter() - started, "peak_mib": usage.ru_maxrss / 1024}


def figures(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    summary = json.loads((run / "train" / "summary.json").read_text())
    # With only whole sentences sampled, `score` is theirs; with phrases too, `score_sentences` is.
    headline = report["finetuned"].get("score_sentences") or report["finetuned"]["score"]
    adapter_bytes = sum(f.stat().st_size for f in (run / "adapter").iterdir() if f.is_file())
    return {"accuracy": headline["accuracy"], "interval": headline["ci95"]["accuracy"], "n": headline["n"],
            "validation": summary["best_metric"], "learning_rate": report["config"]["train"]["learning_rate"], "examples_per_s": summary["train_samples_per_second"],
            "steps": summary["global_step"], "trainable": summary["parameters"]["trainable"],
            "adapter_mib": adapter_bytes / 2**20, "quantized_layers": summary.get("quantized_linear_layers", 0),
            "sentences_only": all(r.get("sentence", True) for r in predictions(run))}


def predictions(run: Path) -> list[dict]:
    path = run / "finetuned" / "predictions.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="the tiny test model, a few steps: CI checks it runs")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--train-rows", type=int, default=800)
    args = parser.parse_args()
    from tasktune.tasks import get_task

    methods = args.methods.split(",")
    if "lora" not in methods:
        methods = ["lora", *methods]  # the reference of the paired tests
    tmp = Path(tempfile.mkdtemp())
    model = None
    # The cost checks off, the test sample the split's 1,377 whole sentences (a limited sample takes them first).
    settings = ["eval.controls=[]", "eval.perplexity=null", "eval.protocols=[score]", "data.limit_test=1377",
                f"data.limit_train={args.train_rows}"]
    if args.quick:
        sys.path.insert(0, str(common.ROOT / "tests"))
        from tiny import write_sst2_tsv

        model = str(common.tiny_model(tmp))
        # eager: compiling a tiny model's layers costs more than its 4 steps, and the table is not about compile
        settings = ["eval.controls=[]", "eval.perplexity=null", "eval.protocols=[score]", "dtype=fp32", "train.compile=false",
                    f"data.path={write_sst2_tsv(tmp / 'train.tsv', n=200)}", "data.val_size=16",
                    "data.limit_train=null", "data.limit_test=null", "train.max_steps=4", "train.eval_steps=2",
                    "train.batch_size=4"]
    rows = {}
    for method in methods:
        measured = run_method(method, tmp / "runs", model, settings, in_process=args.quick)
        rows[method] = {**measured, **figures(tmp / "runs" / method)}
        print(f"[methods] {method}: {rows[method]}", flush=True)
    task = get_task("sst2")
    reference = predictions(tmp / "runs" / "lora")
    lines = ["| method | lr | test accuracy, whole sentences [95%] (n) | vs LoRA, paired [95%]; McNemar | best "
             "validation | examples/s | speed × LoRA | peak RSS MiB | trainable | saved MiB |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for method in methods:
        r = rows[method]
        if method == "lora":
            versus = "—"
        else:
            paired = task.paired(reference, predictions(tmp / "runs" / method))
            part = paired.get("score_sentences") or paired["score"]
            gain, test = part["gain"], part["mcnemar"]
            versus = (f"{gain['difference']:+.4f} [{gain['interval'][0]:+.4f}, {gain['interval'][1]:+.4f}]; "
                      f"{test['wrong_to_right']} vs {test['right_to_wrong']}, p {test['p_value']:.2g}")
        lines.append(f"| {method}{' (4-bit base: ' + str(r['quantized_layers']) + ' layers)' if r['quantized_layers'] else ''} "
                     f"| {r['learning_rate']:g} | {r['accuracy']:.4f} [{r['interval'][0]:.4f}, {r['interval'][1]:.4f}] ({r['n']}) | {versus} | "
                     f"{r['validation']:.4f} | {r['examples_per_s']:.2f} | "
                     f"{r['examples_per_s'] / rows['lora']['examples_per_s']:.2f}× | {r['peak_mib']:,.0f} | "
                     f"{r['trainable']:,} | {r['adapter_mib']:.2f} |")
    steps = rows["lora"]["steps"]
    lines += ["", f"Same split, seed, rows ({'tiny' if args.quick else args.train_rows} training rows, {steps} steps) "
              "for every method, each at its usual learning rate (lr); one run each (speed: training examples/s including its "
              "validations, one measurement per method, so read small speed differences as noise); peak RSS "
              "of the whole run's process; saved: adapter/ on disk (for `full`, the whole model in the run's "
              "dtype)."]
    body = "\n".join(lines)
    print(body)
    if not args.quick:
        common.record_results("Adaptation methods on SST-2", "python bench/methods.py " + " ".join(sys.argv[1:]),
                              body, common.machine())


if __name__ == "__main__":
    main()
