"""Per-trial overhead of a sweep, against what a fresh `tasktune run` per trial would pay on top.

A sweep runs its trials in one process: the model is loaded once, the split made once, training rows tokenized
once per distinct tokenization. Per trial it still wraps the base with a fresh adapter, builds a Trainer, saves
the adapter, and takes the trial's figure from its best checkpoint's validation pass (one more pass only where
that pass did not see the final model). This reads a finished sweep directory: per finished trial its wall time
(`trial.json`), the Trainer's own training time (its validations included), and inside it what compiling
(`train.compile`) and warm-up cost: the excess over the median step of the first step and of every step that
compiled a graph. The time outside training plus that excess is the per-trial overhead. Compiled graphs stay
cached in the process, so the first trial of each shape pays for them and the rest reuse them: the mean over
trials, not the median, is what a sweep pays per trial. Then, in a fresh process, it times what a `tasktune run`
per trial would add: imports, data, split, model load and tokenization of the base recipe (`stages.prepare`
and `train_features`). Usage: python bench/sweep_overhead.py SWEEP_DIR [--no-record]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FRESH = r"""
import json, sys, time
t0 = time.perf_counter()
from tasktune.config import load_recipe
from tasktune.stages import prepare, training_features
t1 = time.perf_counter()
recipe = load_recipe(sys.argv[1], sys.argv[2:])
p = prepare(recipe)
t2 = time.perf_counter()
training_features(p)
t3 = time.perf_counter()
print(json.dumps({"imports_s": t1 - t0, "data_s": p.timings.get("data_s"), "model_load_s": p.timings.get("model_load_s"),
                  "prepare_s": t2 - t1, "tokenize_s": t3 - t2}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--no-record", action="store_true", help="print only, no RESULTS.md entry")
    args = parser.parse_args()
    spec = json.loads((args.sweep_dir / "spec.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted((args.sweep_dir / "trials").glob("*/trial.json"))]
    finished = [r for r in records if not r.get("pruned") and r.get("train_s")]
    if not finished:
        raise SystemExit(f"{args.sweep_dir}: no finished trial with a training time")

    def overhead(r: dict) -> float:
        # outside the Trainer's training time, plus inside it what compiling (train.compile) and warm-up cost;
        # trials before 2026-12-03 did not record the latter
        return r["wall_s"] - r["train_s"] + (r.get("compile_warmup_s") or 0.0)

    rows = []
    for r in sorted(finished, key=lambda r: r["trial"]):
        compiling, spent = r.get("compile_warmup_s"), overhead(r)
        rows.append([r["trial"], r["steps"], f"{r['wall_s']:.1f}", f"{r['train_s']:.1f}",
                     f"{compiling:.1f}" if compiling is not None else "—", f"{spent:.1f}",
                     f"{100 * spent / r['wall_s']:.1f}%"])
    overheads = [overhead(r) for r in finished]
    walls = [r["wall_s"] for r in finished]
    overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in (spec.get("overrides") or {}).items()]
    proc = subprocess.run([sys.executable, "-c", FRESH, spec["recipe"], *overrides], capture_output=True, text=True,
                          check=True)
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    extra = fresh["imports_s"] + fresh["prepare_s"] + fresh["tokenize_s"]
    body = common.table(["trial", "steps", "wall s", "training s (with its validations)",
                         "compile and warm-up s (in training)", "overhead s", "overhead"], rows)
    mean_overhead, mean_wall = statistics.mean(overheads), statistics.mean(walls)
    body += (f"\n\nPer-trial overhead: mean {mean_overhead:.1f} s of a mean trial of {mean_wall:.1f} s "
             f"({100 * mean_overhead / mean_wall:.1f}%), median {statistics.median(overheads):.1f} s "
             f"({100 * statistics.median(overheads) / statistics.median(walls):.1f}%), range "
             f"{min(overheads):.1f}–{max(overheads):.1f} s over {len(finished)} finished trials: adapter wrap, Trainer "
             "set-up, compiling and warm-up inside training, adapter save and, where no checkpoint's validation saw "
             "the final model, one validation pass. A fresh `tasktune run` per trial would add "
             f"{extra:.1f} s more (imports {fresh['imports_s']:.1f}, data {fresh['data_s']:.1f}, model load "
             f"{fresh['model_load_s']:.1f}, the rest of prepare {fresh['prepare_s'] - fresh['data_s'] - fresh['model_load_s']:.1f}, "
             f"tokenizing the training rows {fresh['tokenize_s']:.1f}), "
             f"{100 * extra / mean_wall:.1f}% of a mean trial, plus its zero-shot and test stages, and would compile "
             "its layers afresh.")
    print(body)
    if not args.no_record:
        common.record_results(f"Sweep overhead per trial ({spec['name']})", "python bench/sweep_overhead.py "
                              + str(args.sweep_dir), body, common.machine())


if __name__ == "__main__":
    main()
