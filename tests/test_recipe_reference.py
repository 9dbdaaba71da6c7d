"""docs/recipe-reference.md covers every recipe key and is not stale; --print-config; run --task --model."""

import dataclasses
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
