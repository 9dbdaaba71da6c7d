import pytest

from tasktune.config import load_recipe, parse_overrides
from tasktune.errors import TasktuneError


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_and_overrides(tmp_path):
    recipe = load_recipe(write(tmp_path, "name: x\ntask: sst2\ntrain:\n  lora_r: 4\n"),
                         ["train.learning_rate=1e-4", "eval.protocols=score", "data.limit_train=10"])
    assert recipe.train.lora_r == 4 and recipe.train.learning_rate == 1e-4
    assert recipe.eval.protocols == ["score"] and recipe.data.limit_train == 10
    assert recipe.train.target_modules[0] == "q_proj" and len(recipe.train.target_modules) == 7


def test_name_defaults_to_file_stem(tmp_path):
    assert load_recipe(write(tmp_path, "task: sst2\n")).name == "r"


def test_parse_overrides_nests():
    assert parse_overrides(["a.b=1", "a.c=x", "d=true"]) == {"a": {"b": 1, "c": "x"}, "d": True}


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=0", "learning_rate must be > 0"),
    ("train.learning_rate=-1e-4", "learning_rate must be > 0"),
    ("train.batch_size=0", "batch_size must be > 0"),
    ("train.lora_r=-2", "lora_r must be > 0"),
    ("train.epochs=0", "epochs must be > 0"),
    ("train.lora_dropout=1.5", "lora_dropout must be in"),
    ("data.test_size=0", "test_size must be in"),
    ("train.batch_size=abc", "batch_size must be int"),
    ("train.objective=magic", "objective 'magic' does not apply to task 'sst2'"),
    ("eval.protocols=vibes", "eval.protocols"),
    ("train.lora_rank=8", "unknown key"),
    ("name=../escape", "plain directory name"),
    ("train.patience=-1", "patience must be >= 0"),
    ("justaword", "must look like key=value"),
    ("eval.perplexity=nowhere.txt", "eval.perplexity 'nowhere.txt' is neither `embedded` nor an existing text file"),
    ("eval.controls=[no_such_task]", "task 'no_such_task' is neither a shipped task"),
    ("train.method=galore", "train.method 'galore' is not one of"),
])
def test_bad_values(tmp_path, override, message):
    with pytest.raises(TasktuneError, match=message):
        load_recipe(write(tmp_path, "name: x\ntask: sst2\n"), [override])


def test_bad_yaml(tmp_path):
    with pytest.raises(TasktuneError, match="not valid YAML"):
        load_recipe(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(TasktuneError, match="expected a mapping"):
        load_recipe(write(tmp_path, "- a list\n"))
    with pytest.raises(TasktuneError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_shipped_recipes_are_valid():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "src" / "tasktune" / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        load_recipe(str(path))


def test_shipped_recipe_by_name_and_recipes_command(tmp_path, capsys):
    from tasktune.cli import main

    assert load_recipe("sst2-gemma3-270m-cpu").name == "sst2-gemma3-270m-cpu"
    assert load_recipe("squad2-gemma3-270m-cpu.yaml").task == "squad_v2"
    assert load_recipe("sst2-gemma3-270m-cpu").data.path is None  # the recipes name no path
    with pytest.raises(TasktuneError, match="is not a shipped recipe"):
        load_recipe("no-such-recipe")
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "sst2-gemma3-270m-cpu" in listing and "accelerate/ddp" in listing and "SQuAD v2 on Gemma 3" in listing
    assert main(["recipes", "cp", "sst2-gemma3-270m-cpu", str(tmp_path)]) == 0
    copied = tmp_path / "sst2-gemma3-270m-cpu.yaml"
    assert load_recipe(str(copied)).to_dict() == load_recipe("sst2-gemma3-270m-cpu").to_dict()
    copied.write_text("mine")
    assert main(["recipes", "cp", "sst2-gemma3-270m-cpu", str(copied)]) == 2
    assert "already exists" in capsys.readouterr().err and copied.read_text() == "mine"
    assert main(["recipes", "cp", "x", str(tmp_path / "x.yaml")]) == 2
    assert "no shipped recipe 'x'" in capsys.readouterr().err


def test_verbalizers_must_match_the_tasks_labels(tmp_path):
    recipe = write(tmp_path, "name: x\ntask: sst2\n")
    with pytest.raises(TasktuneError, match="must give one word per label of task 'sst2'"):
        load_recipe(recipe, ["eval.verbalizers=[' bad']"])
    assert load_recipe(recipe, ["eval.verbalizers=[' awful', ' great']"]).eval.verbalizers == [" awful", " great"]
    # Unset: chosen once the tokenizer shows what the verbalizers allow (adaptation.Adaptation.resolve).
    assert load_recipe(recipe).train.objective is None
    squad = write(tmp_path, "name: x\ntask: squad_v2\n")
    with pytest.raises(TasktuneError, match="must give one word per label"):
        load_recipe(squad, ["eval.verbalizers=[' a', ' b']"])
    assert load_recipe(squad).train.objective is None
