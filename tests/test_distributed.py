"""Multi-process runs through accelerate (2 CPU processes, gloo) and the shipped accelerate configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasktune.cli import main

ROOT = Path(__file__).parents[1]
RECIPE = "sst2-gemma3-270m-cpu"


def overrides(model, data, out, name, batch, objective, method="lora"):
    return [f"train.objective={objective}", f"train.method={method}", f"model={model}", f"data.path={data}", f"output_dir={out}", f"name={name}", "dtype=fp32",
            "data.val_size=16", "data.limit_train=null", "eval.limit_generate=null", "train.max_steps=6",
            "train.eval_steps=3", f"train.batch_size={batch}", "train.lora_dropout=0.0", "train.shuffle=false",
            "train.learning_rate=1e-3", "train.warmup_ratio=0.0"]


# Both objectives take the DDP branch of objective_loss; full fine-tuning and PiSSA train a base of their own.
@pytest.mark.parametrize("objective, method", [("label_lm", "lora"), ("verbalizer", "lora"), ("label_lm", "full"),
                                               ("label_lm", "pissa")])
def test_two_processes_match_one_with_the_same_global_batch(tiny_llama, tmp_path, objective, method):
    from tiny import write_sst2_tsv

    data = write_sst2_tsv(tmp_path / "train.tsv", n=150)
    # One thread, as each DDP process below runs (OMP_NUM_THREADS=1): the thread count changes the matmuls' and
    # PiSSA's SVD's reduction order, and Adam turns such rounding in a near-zero gradient into a visible update
    # (seen as 2e-5 on one PiSSA weight on a CI machine when this run used two threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", RECIPE, "eval.controls=[]", "eval.perplexity=null", "train.compile=false",
                     *overrides(tiny_llama, data, tmp_path, "single", 8, objective, method)]) == 0
    finally:
        torch.set_num_threads(threads)
    # `--multi_gpu` selects accelerate's torchrun launcher; on a machine without CUDA the processes join a gloo
    # group (accelerate's `--cpu` would start a single process unless an MPI hostfile is given).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tasktune", "run", RECIPE, "eval.controls=[]", "eval.perplexity=null", "train.compile=false",
               *overrides(tiny_llama, data, tmp_path, "ddp", 4, objective, method)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Gradients averaged over 2 × 4 examples equal the single process's mean over 8 (fp32 reduction order).
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    single = load_file(tmp_path / "single" / "adapter" / weights)
    ddp = load_file(tmp_path / "ddp" / "adapter" / weights)
    assert single.keys() == ddp.keys()
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=1e-4)
    # Every test example is evaluated exactly once, by one of the two processes; metrics agree.
    records = [json.loads(x) for x in (tmp_path / "ddp" / "finetuned" / "predictions.jsonl").read_text().splitlines()]
    split = json.loads((tmp_path / "ddp" / "split.json").read_text())
    assert sorted(r["id"] for r in records) == sorted(split["test"])
    assert {r["process"] for r in records} == {0, 1}
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["finetuned"]["processes"] == 2
    reference = json.loads((tmp_path / "single" / "report.json").read_text())
    assert report["finetuned"]["score"]["accuracy"] == pytest.approx(reference["finetuned"]["score"]["accuracy"])
    # Only the main process wrote: one run directory, no leftovers, one report.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ddp", "single"]
    assert proc.stdout.count("[tasktune] wrote") == 1


@pytest.mark.parametrize("name, kind", [("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP"),
                                         ("deepspeed-zero2.yaml", "DEEPSPEED"), ("deepspeed-zero3.yaml", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "src" / "tasktune" / "recipes" / "accelerate" / name))
    assert str(config.distributed_type).endswith(kind) and config.mixed_precision == "bf16"
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == (2 if "zero2" in name else 3)
