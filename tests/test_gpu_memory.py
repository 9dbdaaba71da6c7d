"""The fit check estimates the recipe as given (after overrides), before anything loads, and the estimate is
checked against live measurements of tasktune's own training step."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import yaml

from tasktune import gpu_memory, models, pipeline
from tasktune.cli import main
from tasktune.config import load_recipe
from tasktune.losses import get_objective
from tasktune.methods import get_method

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def seed_config(name: str, **changes):
    import transformers
    from model_shapes import CONFIGS

    cls_name, kwargs = CONFIGS[name]
    return getattr(transformers, cls_name)(**{**copy.deepcopy(kwargs), **changes})


def estimate_for(config, train, method: str = "lora") -> gpu_memory.MemoryEstimate:
    shape = gpu_memory.model_shape(config, train.target_modules, train.lora_r)
    return gpu_memory.estimate(shape, train, get_method(method), 2, get_objective(train.objective).labels == "tokens")


@pytest.mark.parametrize("model, recipe", [("llama-3.2-1b", "sst2-llama3.2-1b"), ("gemma-2-2b", "squad2-gemma2-2b")])
def test_estimate_against_the_live_tensors_of_a_training_step(model, recipe):
    """On a narrower copy of each seed architecture (an eighth of the width, 2 layers, 4 rows of 128 tokens), the estimated optimizer and
    activation bytes against bench/gpu_memory.py's count of live tensors in two real training steps: close without
    checkpointing, never much below it with."""
    import gpu_memory as bench
    from model_shapes import CONFIGS

    kwargs = CONFIGS[model][1]
    narrow = {k: kwargs[k] // 8 for k in ("hidden_size", "intermediate_size", "vocab_size")}
    for checkpointing in (False, True):
        train = load_recipe(recipe).train
        train.batch_size, train.max_length, train.gradient_checkpointing = 4, 128, checkpointing
        est = estimate_for(seed_config(model, num_hidden_layers=2, **narrow), train)
        live = bench.step_peak(model, train, 2, train.batch_size, train.max_length, width_divisor=8)
        ratio = (est.optimizer + est.activations) / live
        assert (0.85 < ratio < 1.25) if not checkpointing else (0.9 < ratio < 1.5), (checkpointing, ratio)


def test_estimate_of_each_gpu_recipe_is_near_its_measured_figure():
    """At full shape, the estimate of each shipped GPU recipe against the figure its bench row measured
    (gpu_memory_gib: live tensors + 2 GiB), erring on the side of refusing."""
    from model_shapes import RECIPES

    for path in sorted((ROOT / "src" / "tasktune" / "recipes").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        base = path.stem.removesuffix("-16gb") + ".yaml"
        if base not in RECIPES:
            continue
        train = load_recipe(str(path)).train
        total = estimate_for(seed_config(RECIPES[base]), train).total_gib
        assert 0.99 * data["gpu_memory_gib"] <= total <= 1.15 * data["gpu_memory_gib"], (path.name, total)


def test_methods_change_the_estimate_as_they_hold_the_base():
    train = load_recipe("sst2-llama3.2-1b").train
    config = seed_config("llama-3.2-1b")
    lora, qlora, full = (estimate_for(config, train, m) for m in ("lora", "qlora", "full"))
    params = gpu_memory.model_shape(config, train.target_modules, train.lora_r).parameters
    assert full.weights == pytest.approx(lora.weights + 4 * params)  # fp32 master weights beside the 16-bit base
    assert full.optimizer == pytest.approx(14 * params)
    assert lora.weights < qlora.weights < 1.6 * lora.weights  # the 4-bit copy comes on top of the 16-bit base


@pytest.fixture
def gemma2_config_dir(tmp_path):
    """Gemma-2-2B's published config in a model directory: the estimate reads it; no weight is ever loaded."""
    folder = tmp_path / "gemma-2-2b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(seed_config("gemma-2-2b").to_dict()))
    return folder


@pytest.fixture
def t4(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "gpu_memory_gib", lambda: 14.6)
    monkeypatch.setattr(pipeline, "prepare", no_loading)
    monkeypatch.setattr(models, "load_model", no_loading)


def test_the_fit_check_estimates_the_recipe_after_overrides(t4, gemma2_config_dir, tmp_path, capsys):
    """The 16 GB recipe fits a T4 as shipped; the same recipe with checkpointing off, or a batch four times larger,
    is refused before loading, naming what fits (the recipe's fixed figure alone let both through)."""
    out = tmp_path / "runs"
    base = ["run", "sst2-gemma2-2b-16gb", f"model={gemma2_config_dir}", f"output_dir={out}"]
    with pytest.raises(AssertionError, match="a model was loaded"):
        main(base)
    assert main([*base, "train.gradient_checkpointing=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gradient checkpointing off" in err[0] and "this GPU has 14.6 GiB" in err[0]
    assert "train.gradient_checkpointing=true fits (about" in err[0]
    assert main([*base, "train.batch_size=256"]) == 2
    err = capsys.readouterr().err.strip()
    assert "batch 256" in err and "train.batch_size=" in err and "train.grad_accum=" in err and " fits (about" in err
    assert not out.exists()
    with pytest.raises(AssertionError, match="a model was loaded"):
        main([*base, "train.batch_size=256", "gpu_memory_check=false"])
