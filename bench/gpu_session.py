"""The seed's scenario on one GPU, every stage, in one prepared script (~10 minutes on one H100).

For each seed recipe, on a random-weight model of its published architecture (bench/seed_models.py; nothing is
downloaded), a `tasktune run` shrunk by overrides (a few rows, a few steps) through every stage: zero-shot
evaluation, training with validation, the parameter analysis, the fine-tuned evaluation, perplexity on held-out
text and a control task. Then `tasktune eval --run` of one run and a 2-trial `tasktune sweep`. The `-16gb`
recipe runs as on a T4 (fp16 weights with a gradient scaler, the process held to 15 GiB by
`torch.cuda.set_per_process_memory_fraction`), on the instruct model with its chat template
(`eval.prompt_format=chat`). With a GPU, the training step side by side with HF Trainer + peft and Unsloth
(bench/gpu_peers.py) closes the session.

It prints, for each stage, where the model was (read from the stage's own output: `device` in each metrics.json
and in train/summary.json), its wall time and the peak memory, and exits 1 when any stage ran elsewhere than on
the expected device (`cuda:0` with a GPU).

`--cpu-dry-run`: the same commands on the CPU, on 2-layer models at the published width with the tokenizer's
vocabulary (CI runs it: tests/test_gpu_session.py); every stage must then report `cpu`.
Usage: python bench/gpu_session.py [--cpu-dry-run] [--work DIR] [--only NAME[,NAME]]
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
import seed_models  # noqa: E402

SHRINK = ["data.limit_train=32", "data.val_size=16", "data.limit_validation=8", "data.limit_test=24",
          "eval.limit_generate=8", "train.max_steps=4", "train.eval_steps=2", "train.logging_steps=1",
          "eval.perplexity=embedded", "eval.perplexity_docs=4", "eval.control_rows=8", "train.compile=false"]
# The CPU rehearsal trains and evaluates less (2 CPU cores; the same stages and code paths).
CPU_SHRINK = ["train.batch_size=4", "train.max_steps=2", "train.eval_steps=1", "data.limit_test=8",
              "eval.perplexity_docs=2", "eval.control_rows=4", "data.limit_validation=4", "eval.limit_generate=4",
              "eval.max_prompt_tokens=192", "train.max_length=224"]  # SQuAD's contexts cut shorter
T4_GIB = 15.0
# name: (shipped recipe, seed model, extra overrides, emulate a T4)
RUNS = {
    "sst2-llama3.2-1b": ("sst2-llama3.2-1b", "llama-3.2-1b", ["eval.controls=[squad_v2]"], False),
    "squad2-gemma2-2b": ("squad2-gemma2-2b", "gemma-2-2b", ["data.path=null", "eval.controls=[sst2]",
                                                            "data.limit_test=12"], False),
    "sst2-gemma2-2b-it-16gb": ("sst2-gemma2-2b-16gb", "gemma-2-2b-it", ["eval.prompt_format=chat",
                                                                        "eval.controls=[squad_v2]"], True),
}
STAGE_FILES = {"zero-shot": "zeroshot/metrics.json", "train": "train/summary.json",
               "fine-tuned": "finetuned/metrics.json"}


def tasktune(args: list[str], cwd: Path, memory_fraction_gib: float | None = None) -> tuple[int, float, str]:
    """Run `tasktune ARGS` in a fresh process; (exit code, seconds, output tail)."""
    if memory_fraction_gib is None:
        command = [sys.executable, "-m", "tasktune", *args]
    else:  # a T4's memory on a larger card: the cap applies to this process's caching allocator
        command = [sys.executable, "-c",
                   "import sys, torch; from tasktune.cli import main; "
                   f"torch.cuda.set_per_process_memory_fraction({memory_fraction_gib} * 2**30 / "
                   "torch.cuda.get_device_properties(0).total_memory); sys.exit(main(sys.argv[1:]))", *args]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return done.returncode, time.perf_counter() - start, (done.stdout + done.stderr)[-3000:]


def stage_rows(name: str, run_dir: Path, expected: str) -> list[dict]:
    """One row per stage of a finished run: device, seconds, peak memory."""
    facts = json.loads((run_dir / "run.json").read_text())
    memory = json.loads((run_dir / "memory.json").read_text())["summary"]
    timings = facts["timings_s"]
    seconds = {"zero-shot": timings.get("zeroshot_s"), "train": timings.get("train_s"),
               "fine-tuned": timings.get("finetuned_s")}
    rows = []
    for stage, file in STAGE_FILES.items():
        device = json.loads((run_dir / file).read_text()).get("device")
        rows.append({"run": name, "stage": stage, "device": device, "seconds": seconds[stage],
                     "cuda_peak_mib": memory.get("cuda_peak_allocated_mib"), "peak_rss_mib": memory.get("peak_rss_mib"),
                     "ok": device == expected})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="on the CPU, 2-layer models (CI)")
    parser.add_argument("--work", help="where models and runs go (default: a temporary folder)")
    parser.add_argument("--only", help="comma-separated names of RUNS to do (default: all, then eval and sweep)")
    args = parser.parse_args()
    import torch

    gpu = torch.cuda.is_available() and not args.cpu_dry_run
    if not gpu and not args.cpu_dry_run:
        print("no CUDA device: run with --cpu-dry-run for the CPU rehearsal")
        return 2
    expected = "cuda:0" if gpu else "cpu"
    env_device = {} if gpu else {"CUDA_VISIBLE_DEVICES": ""}
    os.environ.update(env_device)
    work = Path(args.work or tempfile.mkdtemp(prefix="tasktune-gpu-session-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"device: {torch.cuda.get_device_name(0) if gpu else 'CPU (dry run)'}; expected stage device {expected}; "
          f"work {work}", flush=True)
    only = set(args.only.split(",")) if args.only else set(RUNS)
    texts = seed_models.corpus()
    models = {}
    for name in sorted({RUNS[r][1] for r in only}):
        start = time.perf_counter()
        models[name] = seed_models.make_seed_model(work / "models" / name, name,
                                                   layers=None if gpu else 2,
                                                   vocab=None if gpu else seed_models.TOKENIZER_VOCAB, texts=texts)
        print(f"built {name} in {time.perf_counter() - start:.1f} s", flush=True)

    rows, failures = [], []
    for name in [r for r in RUNS if r in only]:
        recipe, model, extra, t4 = RUNS[name]
        overrides = [f"model={models[model]}", "output_dir=runs", f"name={name}", *SHRINK, *extra,
                     *([] if gpu else CPU_SHRINK)]
        if t4 and gpu:
            overrides.append("dtype=fp16")  # a T4 has no bf16: fp16 weights, fp32 adapter, gradient scaler
        code, seconds, tail = tasktune(["run", recipe, *overrides], work, T4_GIB if t4 and gpu else None)
        print(f"== run {name} ({recipe}{', T4 emulation' if t4 and gpu else ''}): exit {code}, {seconds:.1f} s",
              flush=True)
        if code != 0:
            failures.append(name)
            print(tail)
            continue
        rows += stage_rows(name, work / "runs" / name, expected)

    if args.only is None and "sst2-llama3.2-1b" not in failures:
        code, seconds, tail = tasktune(["eval", "--run", "runs/sst2-llama3.2-1b", "--out", "eval-llama"], work)
        print(f"== eval --run sst2-llama3.2-1b: exit {code}, {seconds:.1f} s", flush=True)
        if code != 0:
            failures.append("eval")
            print(tail)
        else:
            device = json.loads((work / "eval-llama" / "metrics.json").read_text()).get("device")
            rows.append({"run": "eval --run", "stage": "evaluation", "device": device, "seconds": round(seconds, 1),
                         "ok": device == expected})
        rows += sweep(work, models["gemma-2-2b"], expected, failures, [] if gpu else CPU_SHRINK)

    print("\n| run | stage | device | seconds | CUDA peak MiB | peak RSS MiB |\n|---|---|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['run']} | {row['stage']} | {row['device']}{'' if row['ok'] else ' (WRONG)'} | "
              f"{row.get('seconds')} | {row.get('cuda_peak_mib')} | {row.get('peak_rss_mib')} |")
    wrong = [r for r in rows if not r["ok"]]
    if gpu and args.only is None:
        try:
            peers = subprocess.run([sys.executable, str(Path(__file__).parent / "gpu_peers.py"), "--steps", "10",
                                    "--repeats", "2"], capture_output=True, text=True, timeout=300)
            shown = (peers.stdout + peers.stderr)[-4000:]
        except subprocess.TimeoutExpired:
            shown = "not finished within 300 s"
        print("\n== training step side by side (bench/gpu_peers.py)\n" + shown)
    if failures or wrong:
        print(f"FAILED: commands {failures}, stages off {expected}: {[(r['run'], r['stage']) for r in wrong]}")
        return 1
    print(f"every stage ran on {expected}")
    return 0


def sweep(work: Path, model: Path, expected: str, failures: list[str], extra: list[str]) -> list[dict]:
    """A 2-trial sweep of the Gemma 2 SST-2 recipe: each trial's training and the final test stages on the
    device."""
    shrink = {k: v for k, v in (item.split("=", 1) for item in SHRINK + extra) if not k.startswith("eval.perplexity")}
    overrides = "\n".join(f"  {k}: {v}" for k, v in {**shrink, "model": str(model), "eval.controls": "[]"}.items())
    (work / "sweep.yaml").write_text(
        "name: gpu-session-sweep\nrecipe: sst2-gemma2-2b\noverrides:\n" + overrides + "\n"
        "space:\n  train.learning_rate: {type: categorical, choices: [1.0e-4, 3.0e-4]}\n"
        "sampler: grid\ntrials: 2\nseed: 0\n", encoding="utf-8")
    code, seconds, tail = tasktune(["sweep", "sweep.yaml"], work)
    print(f"== sweep (2 trials): exit {code}, {seconds:.1f} s", flush=True)
    if code != 0:
        failures.append("sweep")
        print(tail)
        return []
    rows = []
    for file in sorted((work / "sweeps" / "gpu-session-sweep").rglob("*.json")):
        if file.name in ("metrics.json", "summary.json"):
            device = json.loads(file.read_text()).get("device")
            if device is not None:
                rows.append({"run": "sweep", "stage": str(file.parent.relative_to(work / "sweeps")), "device": device,
                             "ok": device == expected})
    if not rows:
        failures.append("sweep (no stage recorded its device)")
    return rows


if __name__ == "__main__":
    sys.exit(main())
