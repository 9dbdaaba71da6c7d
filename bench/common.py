"""Shared helpers for the benchmarks: machine facts, subprocess workers, medians, RESULTS.md entries.

Each measured configuration runs in its own subprocess so its peak RSS (ru_maxrss) is its own.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
# The data the CPU recipes read: the copies embedded in the package (byte-identical to the public files).
DATA = ROOT / "src" / "tasktune" / "data" / "embedded"


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "bf16_matmul_kernel": matmul_kernel("bfloat16"), "fp32_matmul_kernel": matmul_kernel("float32"),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def matmul_kernel(dtype_name: str) -> str:
    """Which kernel family a CPU matmul of this dtype runs, as oneDNN names it (`brg_matmul:avx512_core_amx`,
    `...avx512_core_bf16`, ...), read from its verbose log in a fresh process; `mkl/other` when the product does
    not go through oneDNN (torch's fp32 CPU matmul calls MKL or OpenBLAS). On CUDA: `cuda`."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    code = (f"import torch; a = torch.randn(256, 256, dtype=torch.{dtype_name}); "
            "[torch.nn.functional.linear(a, a) for _ in range(2)]")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ONEDNN_VERBOSE": "1", "DNNL_VERBOSE": "1"})
    kernels = set()
    for line in proc.stdout.splitlines():  # ...,exec,cpu,<primitive kind>,<implementation>,...
        fields = line.split(",")
        if fields[0] in ("onednn_verbose", "dnnl_verbose") and "exec" in fields:
            kind = next((i for i, f in enumerate(fields) if f in ("matmul", "inner_product")), None)
            if kind is not None and kind + 1 < len(fields):
                kernels.add(f"{fields[kind]} {fields[kind + 1]}")
    return ", ".join(sorted(kernels)) or "mkl/other (not oneDNN)"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_mib() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


def run_worker(script: Path, config: str, args: list[str]) -> dict:
    """Run `script --worker CONFIG ARGS` in a fresh process; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, str(script), "--worker", config, *args], capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RuntimeError(f"worker {config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def interleaved(script: Path, configs: list[str], worker_args: list[str], repeats: int,
                in_process=None) -> dict[str, list[dict]]:
    """Run every config once per repeat, in turn, so drift on a noisy machine hits every config alike. Each in a
    fresh process (timings and peak memory of its own), or with `in_process` (a `--quick` run: correctness only,
    no figure kept) by calling it with the config here, without a Python start-up and imports per config."""
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for _ in range(repeats):
        for config in configs:
            results[config].append(in_process(config) if in_process else run_worker(script, config, worker_args))
    return results


def ratio(results: dict[str, list[dict]], config: str, key: str, baseline: str = "baseline") -> float:
    """Median over repeats of config/baseline, paired repeat by repeat."""
    return median([r[key] / b[key] for r, b in zip(results[config], results[baseline])])


def ratio_of_medians(results: dict[str, list[dict]], config: str, key: str, baseline: str) -> str:
    """`3.10× (2.95–3.30)`: median(config) / median(baseline), with the min–max of the per-repeat ratios (each
    repeat runs every config once, interleaved, so a repeat's pair shares the machine's state)."""
    if not results.get(baseline) or not all(b[key] for b in results[baseline]):
        return "—"
    per_repeat = [r[key] / b[key] for r, b in zip(results[config], results[baseline])]
    center = median([r[key] for r in results[config]]) / median([b[key] for b in results[baseline]])
    return f"{center:.2f}× ({min(per_repeat):.2f}–{max(per_repeat):.2f})"


def timed_steps(model, loss_of, steps: int, sync, scaler=None) -> float:
    """Seconds for `steps` AdamW steps on `loss_of()` after two untimed ones (compilation and allocator warm-up);
    `scaler`: a gradient scaler for fp16 autocast. `sync`: the device's synchronize (a no-op on CPU)."""
    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    start = time.perf_counter()
    for step in range(steps + 2):
        if step == 2:
            sync()
            start = time.perf_counter()
        loss = loss_of()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def rss_mib() -> float:
    """The current resident set size (Linux), else the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mib()


def matmul_peak_tflops(dtype_name: str = "bfloat16", size: int = 2048, seconds: float = 2.0) -> float:
    """What this machine's matmul reaches: square products of `size` in `dtype`, repeated for `seconds`
    (the denominator of MFU on a CPU, which has no datasheet peak for our threads)."""
    import torch

    from tasktune.models import cpu_supports_bf16

    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and dtype == torch.bfloat16 and not cpu_supports_bf16():
        size = min(size, 256)  # emulated bf16 (an AVX2-only CPU): one 2048-cube product takes minutes
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    return tflops_of(lambda: a @ b, 2 * size**3, seconds)


def tflops_of(fn, flops: float, seconds: float) -> float:
    """TFLOP/s of `fn` (doing `flops` per call), called repeatedly for `seconds` after three warm-up calls."""
    import time

    import torch

    for _ in range(3):
        fn()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return flops * count / (time.perf_counter() - start) / 1e12


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:,.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def commit() -> str:
    """The commit measured, `+changes` when the working tree differs from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def record_results(title: str, command: str, body: str, facts: dict) -> None:
    """Write this benchmark's entry into bench/RESULTS.md (never in --quick mode): it replaces the entry of the
    same title, command line and machine kind (CPU model and GPU: the AMD EPYC and the Intel Xeon with AMX
    differ 3-4x in bf16 matmul rate, so each keeps its entry), so the file holds current figures per machine;
    history stays in git."""
    import re

    from tasktune.atomic import write_text

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = command.strip()
    entry = "\n".join([f"## {title} — {stamp}, commit {commit()}", "", f"Command: `{command}`", "",
                       "Machine: " + (this_machine := ", ".join(f"{k} {v}" for k, v in facts.items())), "",
                       body.rstrip(), ""])
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results: the current figures\n\n"
    head, *entries = re.split(r"(?m)^(?=## )", text)

    def kind(machine_line: str) -> tuple:
        return tuple(re.findall(r"\b(cpu|gpu) ([^,]*)", machine_line))

    def same_command(old: str) -> bool:
        found = re.search(r"(?m)^Command: `(.*)`", old)
        return old.startswith(f"## {title} — ") and found is not None and found.group(1).strip() == command

    def same(old: str) -> bool:
        machine_line = re.search(r"(?m)^Machine: (.*)$", old)
        return (same_command(old) and machine_line is not None
                and kind(machine_line.group(1)) == kind(this_machine))

    kept = [e.rstrip() + "\n" for e in entries if not same(e)]
    # In place of its own entry; else after the same command's entry from another machine; else at the end.
    at = next((i for i, e in enumerate(entries) if same(e)), None)
    if at is None:
        at = next((i + 1 for i in reversed(range(len(kept))) if same_command(kept[i])), len(kept))
    kept.insert(min(at, len(kept)), entry)
    write_text(RESULTS, head.rstrip() + "\n\n" + "\n".join(kept))


def tiny_model(tmp: Path) -> Path:
    """The tests' tiny random model, for --quick runs."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_tiny_model

    return make_tiny_model(tmp / "tiny-llama", "llama")
