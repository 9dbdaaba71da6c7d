"""What shipping as GGUF costs: a finished run exported with `tasktune export --gguf TYPE`, each file's weights
evaluated with the run's own protocol on the run's own test split, paired against the run's fine-tuned
predictions (the adapter merged, in PyTorch) on the same rows.

The GGUF file is read by transformers' GGUF loader (dequantized to the run's dtype) and evaluated by tasktune's
evaluation stage (`stages.evaluate_stage`): this measures what the file's *weights* cost (F16 rounding, Q8_0
blocks). It is not llama.cpp's runtime: llama.cpp also quantizes activations for Q8_0 dot products and has its own
kernels, so its figures can differ again (not measured here; llama-cpp-python is not installed).

Usage: python bench/gguf_shipped.py RUN_DIR [--types f16,q8_0] [--work DIR] [--protocols score]
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
    parser.add_argument("--types", default="f16,q8_0")
    parser.add_argument("--work", default="gguf-shipped", help="where the exports and evaluations go (new)")
    parser.add_argument("--protocols", default="score", help="the run's protocols to evaluate (comma-separated)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from tasktune.cli import main as tasktune
    from tasktune.config import load_recipe
    from tasktune.run_layout import RunLayout, read_jsonl
    from tasktune.stages import evaluate_stage, prepare

    run = Path(args.run_dir)
    work = Path(args.work)
    if work.exists():
        print(f"{work} exists: choose a new --work folder")
        return 2
    work.mkdir(parents=True)
    protocols = args.protocols.split(",")
    recipe = load_recipe(str(RunLayout(run).recipe), [
        f"task={run / 'task.yaml'}", f"eval.protocols=[{args.protocols}]", "eval.perplexity=null", "eval.controls=[]"])
    p = prepare(recipe, training=False)  # the run's split, prompt and tokenizer
    adapter = read_jsonl(RunLayout.predictions(RunLayout(run).stage("finetuned")))
    rows = []
    for kind in args.types.split(","):
        out = work / kind
        start = time.perf_counter()
        assert tasktune(["export", str(run), "--gguf", kind, "--out", str(out)]) == 0
        export_s = time.perf_counter() - start
        name = json.loads((out / "gguf.json").read_text())["file"]
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=p.lm.dtype).eval()
        start = time.perf_counter()
        metrics = evaluate_stage(p, model, work / f"eval-{kind}")
        eval_s = time.perf_counter() - start
        shipped = read_jsonl(RunLayout.predictions(work / f"eval-{kind}"))
        paired = p.task.paired(adapter, shipped)
        by_id = {r["id"]: r for r in adapter}
        for column, values in p.task.report_columns(metrics):
            protocol, _, part = column.partition("_")
            if protocol not in protocols or part == "phrases":
                continue
            key = f"{protocol}_pred"
            keep = [r for r in shipped if key in r and (part != "sentences" or r.get("sentence"))]
            agree = sum(r[key] == by_id[r["id"]][key] for r in keep)
            rows.append({"type": kind, "column": column, "n": values.get("n"), "accuracy": values.get("accuracy"),
                         "ci95": (values.get("ci95") or {}).get("accuracy"), "agreement": agree / len(keep),
                         "disagree": len(keep) - agree, "paired": paired.get(column),
                         "bytes": (out / name).stat().st_size, "export_s": round(export_s, 1),
                         "eval_s": round(eval_s, 1)})
        del model
    finetuned = json.loads(RunLayout.metrics(RunLayout(run).stage("finetuned")).read_text())
    print(f"run {run}: adapter (PyTorch, {p.lm.dtype}) vs each GGUF file's weights, same protocol and rows")
    print("| shipped as | column | n | accuracy [95% CI] | adapter's | agreement | McNemar (adapter vs file) | size MiB |")
    print("|---|---|---:|---|---:|---:|---|---:|")
    for r in rows:
        mine = dict(p.task.report_columns(finetuned)).get(r["column"], {})
        test = (r["paired"] or {}).get("mcnemar") or {}
        ci = r["ci95"] or [float("nan")] * 2
        print(f"| {r['type']} | {r['column']} | {r['n']} | {r['accuracy']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] | "
              f"{mine.get('accuracy', float('nan')):.4f} | {r['agreement']:.4f} ({r['disagree']} differ) | "
              f"{json.dumps(test)} | {r['bytes'] / 2**20:.0f} |")
    (work / "shipped.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
