"""Every benchmark's --quick mode runs (tiny model, correctness only; no timing is asserted)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("script", ["train_sst2.py", "eval_sst2.py", "train_squad.py", "eval_squad.py",
                                    "train_custom_lm.py"])
def test_quick_mode(script):
    before = (ROOT / "bench" / "RESULTS.md").read_text() if (ROOT / "bench" / "RESULTS.md").exists() else None
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| config |" in proc.stdout and "speed × baseline" in proc.stdout
    if script == "eval_sst2.py":
        assert "identical to the per-example loop: 100.00%" in proc.stdout
        assert "In fp32: 100.00%" in proc.stdout
    after = (ROOT / "bench" / "RESULTS.md").read_text() if (ROOT / "bench" / "RESULTS.md").exists() else None
    assert before == after  # --quick never writes results


def test_gpu_memory_estimate_quick():
    """The CPU estimate of GPU training memory runs, and its depth extrapolation matches a direct measurement."""
    before = (ROOT / "bench" / "RESULTS.md").read_text()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_memory.py"), "--quick"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| sst2-llama3.2-1b.yaml |" in proc.stdout
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| sst2-llama3.2-1b.yaml |")]
    weights = {(r[1], r[3]): float(r[4]) for r in rows}
    assert sorted({r[1] for r in rows}) == ["full", "lora", "qlora"]
    # 4-bit decoder weights are smaller than LoRA's 16-bit base; full fine-tuning holds fp32 weights.
    assert weights[("qlora", "off")] < weights[("lora", "off")] < weights[("full", "off")]
    errors = [float(e) for e in re.findall(r"measured directly ([+-][\d.]+)%", proc.stdout)]
    assert len(errors) == 2 and all(abs(e) < 5.0 for e in errors)
    assert (ROOT / "bench" / "RESULTS.md").read_text() == before


def test_training_step_profile_quick():
    """The step profile runs and accounts the matrix products apart from the rest."""
    before = (ROOT / "bench" / "RESULTS.md").read_text()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_train_step.py"), "--quick", "--batches", "2,4",
                           "--steps", "1", "--warmup", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^\| 2 \| 2×\d+ \|", proc.stdout, re.M) and re.search(r"^\| 4 \| 4×\d+ \|", proc.stdout, re.M)
    assert "| aten::mm |" in proc.stdout
    assert (ROOT / "bench" / "RESULTS.md").read_text() == before


def test_training_variants_parse():
    sys.path.insert(0, str(ROOT / "bench"))
    from train_sst2 import parse_config

    assert parse_config("label_lm", 16) == ("label_lm", 16, False)
    assert parse_config("label_lm+b64+compile", 16) == ("label_lm", 64, True)
    with pytest.raises(SystemExit, match="unknown variant 'x64'"):
        parse_config("label_lm+x64", 16)


def test_results_hold_the_current_entry_per_benchmark_command_and_machine(tmp_path, monkeypatch):
    """A benchmark replaces its own entry (same title, command and machine kind), in place; another command
    adds one; another machine kind adds one beside the first (the AMD and the AMX machine both keep theirs)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import common

    results = tmp_path / "RESULTS.md"
    amd = "Machine: cpu AMD EPYC, cores 2, gpu None"
    results.write_text("# Benchmark results: the current figures\n\nintro\n\n"
                       f"## A — 2026-11-27 10:00 UTC\n\nCommand: `python bench/a.py`\n\n{amd}\n\nold a\n\n"
                       f"## B — 2026-11-27 11:00 UTC\n\nCommand: `python bench/b.py`\n\n{amd}\n\nold b\n")
    monkeypatch.setattr(common, "RESULTS", results)
    common.record_results("A", "python bench/a.py ", "new a", {"cpu": "AMD EPYC", "cores": 4, "gpu": None})
    common.record_results("A", "python bench/a.py --repeats 5", "other a", {"cpu": "AMD EPYC", "gpu": None})
    common.record_results("A", "python bench/a.py", "amx a", {"cpu": "Intel Xeon", "gpu": None})
    text = results.read_text()
    assert "old a" not in text and "old b" in text and "intro" in text
    titles = re.findall(r"(?m)^## (\w) — .*, commit \w+", text)
    assert titles == ["A", "A", "A"]
    assert text.index("new a") < text.index("amx a") < text.index("old b") < text.index("other a")
    assert len(re.findall(r"(?m)^## ", text)) == 4
    common.record_results("A", "python bench/a.py", "amx a again", {"cpu": "Intel Xeon", "gpu": None})
    text = results.read_text()
    assert "amx a again" in text and "amx a\n" not in text and "new a" in text


def test_methods_table_quick():
    """bench/methods.py runs every method through `tasktune run` (QLoRA on its 4-bit base) and prints one row each,
    paired against LoRA; --quick writes nothing."""
    before = (ROOT / "bench" / "RESULTS.md").read_text()
    # One method per learning-rate rule and base (LoRA's family, IA3, QLoRA's 4-bit base, full): each method
    # itself trains in tests/test_contracts.py.
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "methods.py"), "--quick", "--methods",
                           "lora,ia3,qlora,full"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0].strip("| ").split(" ")[0] for row in rows] == ["lora", "ia3", "qlora", "full"]
    from tasktune.config import load_recipe

    recipe = f"{load_recipe('sst2-gemma3-270m-cpu').train.learning_rate:g}"  # the LoRA family's rate
    assert [row.split(" | ")[1] for row in rows] == [recipe, "0.003", recipe, "5e-05"]
    assert "qlora (4-bit base: " in proc.stdout and "McNemar" in proc.stdout
    assert (ROOT / "bench" / "RESULTS.md").read_text() == before


def test_sweep_overhead_reads_a_finished_sweep(tiny_llama, tmp_path):
    """bench/sweep_overhead.py on a tiny sweep: one row per finished trial, overhead = wall − training + compiling and
    warm-up inside training (recorded per trial), the fresh-run costs measured in a fresh process;
    --no-record writes nothing."""
    from test_sweep import write_sweep
    from tiny import write_sst2_tsv

    from tasktune.cli import main

    before = (ROOT / "bench" / "RESULTS.md").read_text()
    spec = write_sweep(tmp_path, tiny_llama, write_sst2_tsv(tmp_path / "train.tsv", n=120), trials=2, pruner="none")
    assert main(["sweep", str(spec)]) == 0
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sweep_overhead.py"), str(tmp_path / "sweeps" / "tiny"),
                           "--no-record"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(r[0].strip("| ")) for r in rows] == [0, 1]
    for r in rows:  # trial, steps, wall, training, compile and warm-up, overhead, share
        assert r[4].strip() != "—"  # recorded by the trial
        assert float(r[5]) == pytest.approx(float(r[2]) - float(r[3]) + max(float(r[4]), 0.0), abs=0.16)
    assert "A fresh `tasktune run` per trial would add" in proc.stdout
    assert (ROOT / "bench" / "RESULTS.md").read_text() == before


def test_gpu_check_tiny_runs_every_part_on_cpu():
    """bench/gpu_check.py --tiny (the CUDA script's smoke test on CPU): throughput per objective and method
    (full fine-tuning under autocast), the recipes' memory steps, and the T4 part running each -16gb recipe in
    fp16 with a gradient scaler; no RESULTS.md entry."""
    before = (ROOT / "bench" / "RESULTS.md").read_text()
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    methods = {line.split(" | ")[1] for line in proc.stdout.splitlines() if line.startswith("| llama-3.2-1b |")}
    assert methods == {"lora", "dora", "full"}
    t4 = [line for line in proc.stdout.splitlines() if "-16gb |" in line]
    assert len(t4) == 4 and all(line.rstrip(" |").endswith("yes") for line in t4)
    assert (ROOT / "bench" / "RESULTS.md").read_text() == before


def test_gpu_peers_tiny_runs_the_baseline_and_tasktune_and_names_missing_peers():
    """bench/gpu_peers.py --tiny on CPU: the HF + peft baseline and tasktune (eager and compiled) train and get
    a ratio to the baseline; a peer that cannot be imported here (Unsloth, Liger: CUDA and Triton) is a row
    saying why, not a crash and not a silent gap; no RESULTS.md entry."""
    before = (ROOT / "bench" / "RESULTS.md").read_text()
    # One architecture: the peers' rows and ratios are the same code for both (Gemma 2 trains in test_gpu_session).
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_peers.py"), "--tiny", "--models",
                           "llama-3.2-1b"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in proc.stdout.splitlines()
            if line.startswith("| llama-3.2-1b |")}
    assert set(rows) == {(m, c) for m in ("llama-3.2-1b",)
                         for c in ("hf", "hf+liger", "unsloth", "tasktune", "tasktune+compile")}
    for model in ("llama-3.2-1b",):
        for config in ("hf", "tasktune", "tasktune+compile"):
            cells = [c.strip() for c in rows[(model, config)].split("|")[1:-1]]
            assert float(cells[2].replace(",", "")) > 0 and cells[6].endswith(")"), cells  # tokens/s, × hf
        for peer in ("hf+liger", "unsloth"):
            cells = [c.strip() for c in rows[(model, peer)].split("|")[1:-1]]
            assert cells[2].startswith("not run: ") and len(cells[2]) > len("not run: "), cells
    assert (ROOT / "bench" / "RESULTS.md").read_text() == before
