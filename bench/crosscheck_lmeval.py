"""Does tasktune's `score` protocol make the decisions lm-evaluation-harness makes?

Runs lm-evaluation-harness itself (`pip install -e ".[lmeval]"`; its glue/sst2 task, copied here as a
local-file task so nothing is downloaded) and tasktune's `score` protocol on the same SST-2 rows, in fp32, and
reports per-example agreement of the argmax decisions and the largest log-likelihood difference. Rows are a
seeded sample of the GLUE SST-2 training file (the copy embedded in tasktune by default), with each sentence's
text exactly as in the file (GLUE's space before the tab included, as lm-evaluation-harness keeps it).

    python bench/crosscheck_lmeval.py [--rows 300] [--data train.tsv] [--model gemma3-270m]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# lm-evaluation-harness 0.4.13 lm_eval/tasks/glue/sst2/default.yaml, with the dataset pointed at a local file.
TASK_YAML = """task: sst2_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {rows}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{sentence}}}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""


def tasktune_scores(model_path: str, rows: list[dict]) -> list[list[float]]:
    from tasktune.evaluation import predict
    from tasktune.models import load_model
    from tasktune.runner import Runner
    from tasktune.tasks import PromptBuilder, get_task

    lm = load_model(model_path, dtype="fp32")
    task = get_task("sst2")
    records, _ = predict(task, Runner(lm.model, lm.tokenizer, 32), PromptBuilder(task, lm.tokenizer), rows, ["score"])
    return [r["score_logprobs"] for r in records]


def lmeval_scores(model_path: str, rows_file: Path, work: Path) -> tuple[list[list[float]], str]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    (work / "sst2_local.yaml").write_text(TASK_YAML.format(rows=rows_file))
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_path},dtype=float32",
                                      tasks=["sst2_local"], batch_size=16, log_samples=True, device="cpu",
                                      task_manager=TaskManager(include_path=str(work)))
    samples = sorted(results["samples"]["sst2_local"], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples], lm_eval.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--data", default=str(common.DATA / "sst2" / "train.tsv.gz"))
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help="do not record the entry in bench/RESULTS.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from tasktune.tasks import get_task

    sst2 = get_task("sst2")
    from tasktune.models import resolve_model_path

    all_rows, source = sst2.load(args.data)
    rows = random.Random(args.seed).sample(all_rows, args.rows)
    model_path = resolve_model_path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "rows.jsonl"
        rows_file.write_text("".join(json.dumps({"sentence": r["text"], "label": r["label"]}) + "\n"
                                     for r in rows))
        start = time.perf_counter()
        ours = tasktune_scores(model_path, rows)
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        theirs, version = lmeval_scores(model_path, rows_file, Path(tmp))
        theirs_s = time.perf_counter() - start

    def decision(pair):
        return max(range(2), key=lambda k: pair[k])

    margin = [abs(t[1] - t[0]) for t in theirs]
    ties = [m < 1e-4 for m in margin]
    agree = [decision(a) == decision(b) for a, b in zip(ours, theirs)]
    disagree_untied = sum(not a and not t for a, t in zip(agree, ties))
    max_diff = max(abs(x - y) for a, b in zip(ours, theirs) for x, y in zip(a, b))
    acc_ours = sum(decision(a) == r["label"] for a, r in zip(ours, rows)) / len(rows)
    acc_theirs = sum(decision(b) == r["label"] for b, r in zip(theirs, rows)) / len(rows)
    lines = [f"- rows: {len(rows)} (seed {args.seed}) of `{Path(source).name}`, text as in the file; model "
             f"`{args.model}` in fp32; lm-evaluation-harness {version} (`hf`, batch 16) vs tasktune `score` (batch 32)",
             f"- per-example agreement of the decisions: **{sum(agree)}/{len(rows)}** "
             f"({100 * sum(agree) / len(rows):.2f}%); disagreements outside ties (|Δ| < 1e-4): {disagree_untied}",
             f"- largest |log-likelihood difference|: {max_diff:.2e}",
             f"- accuracy: tasktune {acc_ours:.4f}, lm-evaluation-harness {acc_theirs:.4f}",
             f"- time: tasktune {ours_s:.1f} s, lm-evaluation-harness {theirs_s:.1f} s (model load included in both)"]
    body = "\n".join(lines)
    print(body)
    if not args.no_record:
        common.record_results("SST-2 `score` vs lm-evaluation-harness (crosscheck)",
                              f"python bench/crosscheck_lmeval.py --rows {args.rows}", body, common.machine())
    if disagree_untied:
        sys.exit(1)


if __name__ == "__main__":
    main()
