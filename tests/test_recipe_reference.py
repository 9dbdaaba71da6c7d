"""docs/recipe-reference.md covers every recipe key and is not stale; --print-config; run --task --model."""

import dataclasses
import math
import typing
from pathlib import Path

import pytest
import yaml

from tasktune import config
from tasktune.cli import main
from tasktune.recipe_reference import render

ROOT = Path(__file__).resolve().parents[1]


def leaf_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_reference_file_is_current():
    assert (ROOT / "docs" / "recipe-reference.md").read_text() == render(), \
        "docs/recipe-reference.md is stale: run `tasktune recipe-reference --out docs/recipe-reference.md`"


def test_reference_covers_every_key_with_a_meaning():
    text = render()
    keys = list(leaf_keys(config.Recipe))
    assert len(keys) > 40
    for key in keys:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
        meaning = row.rstrip(" |").rsplit(" | ", 1)[1]
        assert len(meaning) > 10, key


def test_print_config_prints_the_resolved_recipe_and_runs_nothing(tmp_path, capsys):
    assert main(["run", "sst2-gemma3-270m-cpu", "eval.controls=[]", "eval.perplexity=null", "train.learning_rate=1e-4", f"output_dir={tmp_path}",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["learning_rate"] == 1e-4 and printed["train"]["objective"] == "label_lm"
    assert printed["task"] == "sst2" and printed["eval"]["limit_generate"] == 1000
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("task, model, recipe, name", [
    ("sst2", "llama3.2-1b", "sst2-llama3.2-1b", "sst2-llama3.2-1b"),
    ("squad_v2", "gemma3-270m", "squad2-gemma3-270m-cpu", "squad_v2-gemma3-270m"),
    ("sst2", "someone/other-model", "sst2-gemma3-270m-cpu", "sst2-other-model"),  # this machine has no CUDA
])
def test_task_and_model_without_a_recipe(capsys, task, model, recipe, name):
    assert main(["run", "--task", task, "--model", model, "train.max_steps=7", "--print-config"]) == 0
    out = capsys.readouterr()
    printed = yaml.safe_load(out.out)
    shipped = yaml.safe_load((ROOT / "src" / "tasktune" / "recipes" / f"{recipe}.yaml").read_text())
    assert printed["model"] == model and printed["task"] == task and printed["name"] == name
    assert printed["train"]["max_steps"] == 7
    assert printed["train"]["learning_rate"] == shipped["train"]["learning_rate"]
    assert recipe in out.err


def test_task_without_a_shipped_recipe_uses_the_defaults(capsys):
    spec = ROOT / "examples" / "news-topics" / "news-topics.yaml"
    assert main(["run", "--task", str(spec), "--model", "gemma3-270m", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["name"] == "news-topics-gemma3-270m" and printed["train"]["learning_rate"] == 2e-4


@pytest.mark.parametrize("argv, message", [
    (["run", "sst2-gemma3-270m-cpu", "eval.controls=[]", "eval.perplexity=null", "--task", "sst2", "--model", "x"], "not both"),
    (["run", "--task", "sst2"], "go together"),
    (["run"], "name a recipe"),
])
def test_task_model_misuse_is_one_line(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("gpu_gib, picked", [(None, "sst2-gemma2-2b"), (79.2, "sst2-gemma2-2b"),
                                             (14.6, "sst2-gemma2-2b-16gb"), (22.0, "sst2-gemma2-2b-16gb")])
def test_task_and_model_pick_the_recipe_that_fits_the_gpu(capsys, monkeypatch, gpu_gib, picked):
    """A T4 (14.6 GiB) or a 24 GB card gets the 16 GB recipe of Gemma-2-2B; an 80 GB card the full one."""
    from tasktune import models

    monkeypatch.setattr(models, "gpu_memory_gib", lambda: gpu_gib)
    assert main(["run", "--task", "sst2", "--model", "gemma2-2b", "--print-config"]) == 0
    out = capsys.readouterr()
    printed = yaml.safe_load(out.out)
    assert f"shipped recipe {picked} for" in out.err
    assert printed["train"]["gradient_checkpointing"] == picked.endswith("-16gb")
    assert printed["gpu_memory_gib"] <= (gpu_gib or math.inf)


def test_a_recipe_too_big_for_the_gpu_stops_before_loading_and_names_one_that_fits(capsys, monkeypatch, tmp_path):
    from tasktune import models, pipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "gpu_memory_gib", lambda: 14.6)
    monkeypatch.setattr(pipeline, "prepare", no_loading)
    monkeypatch.setattr(models, "load_model", no_loading)
    assert main(["run", "squad2-gemma2-2b", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # The hub's config cannot be read here (offline), so the recipe's stated figure stands in for the estimate.
    assert len(err) == 1 and "needs about 56.1 GiB (gpu_memory_gib)" in err[0] and "has 14.6 GiB" in err[0]
    assert "run the shipped recipe squad2-gemma2-2b-16gb instead" in err[0]
    assert not list(tmp_path.iterdir())  # nothing written
    # The check can be switched off, and then the run goes on (here to the stubbed loader).
    with pytest.raises(AssertionError, match="a model was loaded"):
        main(["run", "squad2-gemma2-2b", f"output_dir={tmp_path}", "gpu_memory_check=false"])


def test_every_gpu_recipe_states_the_memory_its_bench_row_measured():
    """gpu_memory_gib in each GPU recipe is the LoRA row of bench/gpu_memory.py in bench/RESULTS.md (the -16gb
    recipes: checkpointing on), to the digit it is written with."""
    text = (ROOT / "bench" / "RESULTS.md").read_text()
    section = text.split("## GPU recipe memory (estimated on CPU)", 1)[1].split("\n## ", 1)[0]
    need = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 7 and cells[0].endswith(".yaml") and cells[1] == "lora":
            need[(cells[0].removesuffix(".yaml"), cells[3])] = float(cells[7])
    recipes = [p for p in (ROOT / "src" / "tasktune" / "recipes").glob("*.yaml") if not p.stem.endswith("-cpu")]
    assert len(recipes) == 8
    for path in recipes:
        data = yaml.safe_load(path.read_text())
        base, checkpointing = path.stem.removesuffix("-16gb"), "on" if path.stem.endswith("-16gb") else "off"
        assert data["train"]["gradient_checkpointing"] == (checkpointing == "on"), path.name
        assert data["gpu_memory_gib"] == round(need[(base, checkpointing)], 1), path.name
        if checkpointing == "on":
            assert data["gpu_memory_gib"] <= 16e9 / 2**30 - 1, f"{path.name} must fit a 16 GB card with room"
