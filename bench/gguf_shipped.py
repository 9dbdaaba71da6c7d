"""What shipping as GGUF costs: a finished run exported with `tasktune export --gguf TYPE`, each file run by
llama.cpp (llama-cpp-python) with the run's own requests on the run's own test split, paired against the run's
fine-tuned predictions (the adapter, in PyTorch) on the same rows; `adapter` is the GGUF LoRA adapter on the base
GGUF the run started from (for the gemma3-270m alias, the PyPI package's Q4_K_M file).

Speed: evaluated tokens per second (the prompts' tokens plus the tokens scored or generated, over the seconds the
protocol took), each file by llama.cpp on this CPU's cores, one sequence at a time; the baseline is the adapter
merged in PyTorch, evaluated by the run's own evaluation stage (batched, the run's eval.batch_size) in the same
process, on the same rows. One pass each: the spread is not measured here (say so where you quote it).

Usage: python bench/gguf_shipped.py RUN_DIR [--types f16,q8_0,q4_k_m,adapter] [--work DIR] [--protocols score]
Writes WORK/shipped.json and prints the "shipped as" table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--types", default="f16,q8_0,q4_k_m,adapter")
    parser.add_argument("--work", default="gguf-shipped", help="where the exports and evaluations go (new)")
    parser.add_argument("--protocols", default="score", help="the run's protocols to evaluate (comma-separated)")
    args = parser.parse_args()

    from tasktune.cli import main as tasktune
    from tasktune.infer import merge_for_inference
    from tasktune.models import base_gguf
    from tasktune.run_layout import RunLayout, read_jsonl
    from tasktune.shipping import evaluated_tokens
    from tasktune.stages import evaluate_gguf_stage, evaluate_stage, load_trained, prepare_finished_run

    run = Path(args.run_dir)
    work = Path(args.work)
    if work.exists():
        print(f"{work} exists: choose a new --work folder")
        return 2
    work.mkdir(parents=True)
    protocols = args.protocols.split(",")
    p = prepare_finished_run(run)  # the run's split, prompt and tokenizer
    p.recipe.eval.protocols, p.recipe.eval.perplexity, p.recipe.eval.controls = protocols, None, []
    tokens = evaluated_tokens(p)  # the positions the test requests read

    model, _, _ = load_trained(p, run)
    (work / "eval-pytorch").mkdir()
    start = time.perf_counter()
    evaluate_stage(p, merge_for_inference(model), work / "eval-pytorch")
    pytorch_s = time.perf_counter() - start
    del model
    adapter_records = read_jsonl(RunLayout.predictions(work / "eval-pytorch"))
    run_records = {r["id"]: r for r in read_jsonl(RunLayout.predictions(RunLayout(run).stage("finetuned")))}
    adapter_metrics = json.loads(RunLayout.metrics(work / "eval-pytorch").read_text())
    # The baseline is the run's own adapter: this pass must reproduce the run's decisions in every column.
    keys = {p.task.decision_key(column) for column, _ in p.task.report_columns(adapter_metrics)}
    same = sum(all(k in r and r[k] == run_records[r["id"]].get(k) for k in keys) for r in adapter_records)
    rows = [{"type": "adapter (PyTorch, merged)", "bytes": None, "seconds": round(pytorch_s, 1),
             "tokens_per_s": round(tokens / pytorch_s, 1), "reproduces_run": f"{same}/{len(adapter_records)}",
             "metrics": adapter_metrics}]
    report = json.loads(RunLayout(run).report.read_text())
    with base_gguf(report["model"]) as base:
        for kind in args.types.split(","):
            out = work / kind
            start = time.perf_counter()
            assert tasktune(["export", str(run), "--gguf", kind, "--out", str(out)]) == 0
            export_s = time.perf_counter() - start
            file = out / json.loads((out / "gguf.json").read_text())["file"]
            model_file, adapter_file = (base, file) if kind == "adapter" else (file, None)
            evaluated = work / f"eval-{kind}"
            evaluated.mkdir()
            start = time.perf_counter()
            metrics = evaluate_gguf_stage(p, evaluated, model_file, adapter_file, {"run": str(run)}, against=run)
            eval_s = time.perf_counter() - start
            rows.append({"type": kind, "bytes": file.stat().st_size, "export_s": round(export_s, 1),
                         "seconds": round(eval_s, 1), "tokens_per_s": round(tokens / eval_s, 1), "metrics": metrics})
    (work / "shipped.json").write_text(json.dumps(rows, indent=1, default=str))
    print_table(p.task, rows, run)
    return 0


def print_table(task, rows: list[dict], run: Path) -> None:
    from tasktune import shipped_report
    from tasktune.run_layout import RunLayout

    finetuned = json.loads(RunLayout.metrics(RunLayout(run).stage("finetuned")).read_text())
    print(f"run {run}: the adapter (PyTorch) vs each GGUF file run by llama.cpp, same requests and rows")
    print("| shipped as | column | n | figure [95% CI] | run's adapter | same prediction | paired (file vs adapter) "
          "| size MiB | tokens/s |")
    print("|---|---|---:|---|---:|---:|---|---:|---:|")
    for row in rows:
        metrics = row["metrics"]
        comparison = metrics.get("against_adapter") if metrics else None
        for column, _ in task.report_columns(metrics):
            f, mine = task.figure(metrics, column), task.figure(finetuned, column)
            interval = f" [{f['interval'][0]:.4f}, {f['interval'][1]:.4f}]" if f["interval"] else ""
            agree, paired = "", ""
            if comparison:
                counts = comparison["agreement"].get(column) or {}
                agree = f"{counts.get('same')}/{counts.get('n')} (all rows)" if counts else ""
                paired = shipped_report.paired_text(comparison["paired"].get(column) or {})
            else:
                agree = f"reproduces the run: {row['reproduces_run']}"
            size = f"{row['bytes'] / 2**20:.0f}" if row["bytes"] else "—"
            print(f"| {row['type']} | {column} | {f['n']} | {f['value']:.4f}{interval} | {mine['value']:.4f} | "
                  f"{agree} | {paired} | {size} | {row['tokens_per_s']} |")


if __name__ == "__main__":
    sys.exit(main())
