"""The contracts between parts: no import cycles, no task-type names outside tasks/, and an objective and a task
type added from outside src/ (this file) without editing tasktune."""

import ast
import json
import math
import re
from pathlib import Path

import pytest

from tasktune.cli import main
from test_careful_user import finished  # noqa: F401 (a finished tiny run, for the reporting tests)
from tiny import run_args

ROOT = Path(__file__).parents[1]


def import_graph(folder: Path, package: str | None) -> dict[str, set[str]]:
    """Module -> the modules of `folder` it imports anywhere in its code (lazy imports included: a cycle through
    a function-level import still ties two modules together)."""
    modules = {}
    for file in folder.rglob("*.py"):
        rel = file.relative_to(folder.parent if package else folder).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        modules[".".join(parts)] = file
    graph = {}
    for name, file in modules.items():
        deps = set()
        here = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                subs = {f"{base}.{a.name}" for a in node.names}
                deps |= subs & set(modules)
                if not subs <= set(modules):
                    deps.add(base)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


@pytest.mark.parametrize("folder, package", [(ROOT / "src" / "tasktune", "tasktune"), (ROOT / "bench", None)])
def test_no_import_cycles(folder, package):
    assert cycles(import_graph(folder, package)) == []


def test_the_cycle_check_can_fail():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_task_type_name_outside_tasks():
    pattern = re.compile(r"\"classification\"|\"extractive_qa\"")
    hits = [f"{path}:{n}" for path in (ROOT / "src" / "tasktune").rglob("*.py")
            if "tasks" not in path.relative_to(ROOT / "src" / "tasktune").parts
            for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_importing_metrics_and_tasks_loads_no_torch():
    import subprocess
    import sys

    code = ("import sys; import tasktune.metrics.text_overlap, tasktune.tasks.classification, "
            "tasktune.tasks.extractive_qa, tasktune.tasks.spec; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture
def toy_objective():
    """A label-smoothed verbalizer loss, registered from here, for classification tasks."""
    import torch.nn.functional as F

    from tasktune import losses
    from tasktune.tasks.base import task_type

    calls = []

    def smoothed(model, batch, label_token_ids):
        calls.append(len(batch["labels"]))
        logits = losses._last_position_logits(model, batch, label_token_ids)
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=0.1)

    kind = task_type("classification")
    before = kind.objectives
    losses.register_objective(losses.Objective("smoothed", smoothed, single_token_verbalizers=True),
                              task_types=("classification",))
    yield calls
    kind.objectives = before
    losses.OBJECTIVES.pop("smoothed")


def test_an_objective_registered_from_outside_trains(tiny_llama, sst2_tsv, tmp_path, toy_objective):
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "toy", "train.objective=smoothed")) == 0
    report = json.loads((tmp_path / "toy" / "report.json").read_text())
    assert report["config"]["train"]["objective"] == "smoothed"
    assert len(toy_objective) >= 4  # one call per training step at least


def test_an_unregistered_objective_is_refused(tiny_llama, sst2_tsv, tmp_path, capsys):
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "toy", "train.objective=smoothed")) == 2
    assert "objective 'smoothed' does not apply" in capsys.readouterr().err


@pytest.fixture
def toy_task_type(tmp_path):
    """The task type of tests/toy_first_word.py (one file, one registration), and a spec that names it."""
    import toy_first_word

    from tasktune.tasks import base

    toy_first_word.register()
    yield toy_first_word.write_spec(tmp_path / "first_word.yaml")
    base.TASK_TYPES.pop(toy_first_word.FirstWordTask.type_name)


def test_a_task_type_in_one_file_runs_every_stage(tiny_llama, sst2_tsv, tmp_path, toy_task_type):
    """Zero-shot, training, the same protocol again, the paired test, report, compare, export and `eval --run`
    for a type that implements only the contract's core."""
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "toytask", f"task={toy_task_type}", "train.objective=lm",
                         "eval.limit_generate=null", protocols="generate")) == 0
    run = tmp_path / "toytask"
    report = json.loads((run / "report.json").read_text())
    assert report["task_type"] == "toy_first_word" and report["split"]["split_by"] == "row"
    tested = report["split"]["overlap"]["test_rows"]
    assert report["finetuned"]["generate"]["n"] == report["zeroshot"]["generate"]["n"] == tested > 0
    assert report["paired"]["generate"]["n"] == tested and "mcnemar" in report["paired"]["generate"]
    assert "| exact |" in (run / "report.md").read_text()
    assert main(["compare", str(run), str(run), "--out", str(tmp_path / "cmp")]) == 0
    assert "finetuned_generate_exact" in (tmp_path / "cmp" / "compare.md").read_text()
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    assert "exact" in (tmp_path / "export" / "README.md").read_text()
    assert main(["eval", "--run", str(run), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["generate"]["exact"] == report["finetuned"]["generate"]["exact"]


def test_the_toy_task_type_is_one_file():
    """Everything the toy type is lives in tests/toy_first_word.py: no other file names it."""
    hits = [str(p.relative_to(ROOT)) for folder in ("src", "tests") for p in (ROOT / folder).rglob("*.py")
            if "toy_first_word" in p.read_text() and p.name not in ("toy_first_word.py", "test_contracts.py")]
    assert hits == []


def test_the_default_objective_follows_the_verbalizers(tiny_llama, sst2_tsv, tmp_path):
    """No train.objective and multi-token verbalizers: `lm`, the objective they allow, not a failure after
    loading the model; single-token ones get the fast `verbalizer`."""
    from tasktune.tasks.spec import shipped

    single = tmp_path / "single.yaml"
    single.write_text(shipped()["sst2"].read_text())
    multi = tmp_path / "multi.yaml"
    multi.write_text(shipped()["sst2"].read_text().replace('" positive"', '" very positive"'))
    for spec, expected in ((multi, "lm"), (single, "verbalizer")):
        args = ["run", "--task", str(spec), "--model", str(tiny_llama), f"data.path={sst2_tsv}",
                f"output_dir={tmp_path / 'runs'}", f"name={spec.stem}", "dtype=fp32", "data.val_size=16",
                "eval.protocols=score", "train.max_steps=2", "train.eval_steps=2", "train.batch_size=4"]
        assert main(args) == 0
        report = json.loads((tmp_path / "runs" / spec.stem / "report.json").read_text())
        assert report["config"]["train"]["objective"] == expected


@pytest.mark.parametrize("method", ["lora", "dora", "rslora", "ia3", "qlora", "pissa", "full"])
def test_every_method_trains_resumes_evaluates_exports_and_is_counted(tiny_llama, sst2_tsv, tmp_path, method):
    """Each method end to end on the tiny model: train, params (its own count formula), eval --run, export
    --merge, and a resume of a run whose train stage is redone."""
    from tasktune.methods import get_method

    run = tmp_path / method
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, method, f"train.method={method}",
                         "train.lora_r=4")) == 0
    params = json.loads((run / "params.json").read_text())
    adapter = params["analysis"]["adapter"]
    assert adapter["method"] == method and adapter["formula_matches"]
    modules = [(m["type"], tuple(m["shape"])) for m in params["analysis"]["modules"]]
    assert adapter["parameters"] == get_method(method).expected_parameters(4, modules) > 0
    assert params["counts"]["merged_equals_base"] and not params["frozen"]["unexpected_changes"]
    assert params["frozen"]["changed"] > 0 and all(m["relative"] > 0 for m in params["analysis"]["modules"])
    assert (adapter["magnitude_parameters"] > 0) == (method == "dora")
    trained_on = json.loads((run / "train" / "summary.json").read_text())["quantized_linear_layers"]
    assert (trained_on > 0) == (method == "qlora")
    if method == "qlora":  # trained on 4 bits, evaluated and exported merged into the dequantized base
        assert json.loads((run / "adapter" / "tasktune_base.json").read_text()) == {"method": "qlora",
                                                                                   "quantization": "nf4"}
        assert params["frozen"]["identical"] > 0  # the dequantized base's other weights, bit for bit
    if method == "pissa":  # trained at rank 4 on the residual base, saved as plain LoRA of rank 8 on the original
        assert json.loads((run / "adapter" / "tasktune_base.json").read_text()) == {"method": "pissa",
                                                                                   "trained_rank": 4}
        assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 8
        assert adapter["stored_parameters"] == 2 * adapter["parameters"] and adapter["r"] == 4
        assert params["frozen"]["identical"] > 0  # the original base outside the targets, bit for bit
    if method == "full":  # every weight trained and stored; no adapter
        assert adapter["parameters"] == params["counts"]["base"] == adapter["formula"]
        assert not (run / "adapter" / "adapter_config.json").exists()
        assert {"embed_tokens", "q_proj", "down_proj", "input_layernorm"} <= set(adapter["target_modules"])
    if method == "ia3":  # the MLP's down projection scales its inputs, every other target its outputs
        assert {m["type"]: m["scaled"] for m in params["analysis"]["modules"]}["down_proj"] == "input"
        assert adapter["parameters"] == sum(m["shape"][1] if m["type"] == "down_proj" else m["shape"][0]
                                            for m in params["analysis"]["modules"])
    assert main(["eval", "--run", str(run), "--out", str(tmp_path / f"{method}-eval")]) == 0
    again = json.loads((tmp_path / f"{method}-eval" / "metrics.json").read_text())
    first = json.loads((run / "finetuned" / "metrics.json").read_text())
    assert again["score"]["accuracy"] == first["score"]["accuracy"]
    assert main(["export", str(run), "--out", str(tmp_path / f"{method}-export"), "--merge"]) == 0
    card = (tmp_path / f"{method}-export" / "README.md").read_text()
    assert f"method `{method}`" in card
    assert ("merged into that 4-bit base dequantized" in card) == (method == "qlora")
    assert ("Full fine-tune of" in card) == (method == "full")
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert (tmp_path / f"{method}-export" / "model.safetensors").is_file()  # merged: a whole model
    # Resume: drop the stages after zero-shot, as a kill during training leaves them; same weights again.
    from safetensors.torch import load_file

    before = load_file(run / "adapter" / weights)
    partial = tmp_path / f".{method}.partial"
    run.rename(partial)
    stages = json.loads((partial / "stages.json").read_text())
    stages["done"] = [s for s in stages["done"] if s in ("split", "zeroshot")]
    (partial / "stages.json").write_text(json.dumps(stages))
    import shutil

    shutil.rmtree(partial / "adapter")
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, method, f"train.method={method}", "train.lora_r=4")) == 0
    after = load_file(run / "adapter" / weights)
    assert before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)


@pytest.mark.parametrize("objective", ["lm", "seqcls"])
@pytest.mark.parametrize("method", ["dora", "pissa", "ia3", "qlora", "full"])
def test_every_method_trains_with_the_other_heads_and_objectives(tiny_llama, sst2_tsv, tmp_path, method, objective):
    """The method test above trains label_lm; the label-token loss (`lm`) and a fresh classification head
    (`seqcls`, trained and saved with the adapter, or with every weight) work with every method too, or are
    refused in one line before anything loads (PiSSA with a classification head)."""
    if method == "pissa" and objective == "seqcls":
        assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "m", "train.method=pissa", "train.objective=seqcls")) == 2
        assert not (tmp_path / "m").exists() and not (tmp_path / ".m.partial").exists()
        return
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "m", f"train.method={method}", f"train.objective={objective}",
                         "train.lora_r=4")) == 0
    report = json.loads((tmp_path / "m" / "report.json").read_text())
    assert report["config"]["train"]["objective"] == objective and report["training"]["global_step"] == 4
    params = json.loads((tmp_path / "m" / "params.json").read_text())
    assert params["analysis"]["adapter"]["method"] == method and params["counts"]["merged_equals_base"]
    assert not params["frozen"]["unexpected_changes"]
    assert main(["eval", "--run", str(tmp_path / "m"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    column = "classifier" if objective == "seqcls" else "score"  # a classification head reads no verbalizer
    assert again[column]["accuracy"] == report["finetuned"][column]["accuracy"]


def test_full_fine_tuning_of_a_tied_embedding_model_counts_every_weight_once(tiny_models, sst2_tsv, tmp_path):
    """Gemma ties the LM head to the input embeddings: the saved fine-tune stores that matrix once, under
    whichever name, and the analysis compares it with the base's embeddings (not as a fresh head)."""
    import os
    import stat

    run = tmp_path / "tied"
    assert main(run_args(tiny_models["gemma3"], sst2_tsv, tmp_path, "tied", "train.method=full",
                         "train.learning_rate=1e-3")) == 0
    params = json.loads((run / "params.json").read_text())
    adapter = params["analysis"]["adapter"]
    assert adapter["formula_matches"] and adapter["other_trainable"] == 0
    assert adapter["parameters"] == params["counts"]["base"]
    assert "embed_tokens" in adapter["target_modules"] or "lm_head" in adapter["target_modules"]
    mode = stat.S_IMODE((run / "adapter" / "model.safetensors").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # written like every other file: atomically, the usual mode


def test_an_unknown_method_is_one_line(tiny_llama, sst2_tsv, tmp_path, capsys):
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "m", "train.method=galore")) == 2
    assert "train.method 'galore' is not one of ['dora', 'full', 'ia3', 'lora', 'none', 'pissa', 'qlora', 'rslora']" in capsys.readouterr().err


def test_controls_and_perplexity_show_what_an_adaptation_cost(tiny_llama, tmp_path, monkeypatch):
    """A control whose labels are the task's flipped (an adapter that learns the task must break it) shows a
    significant cost, and so does perplexity on general text after an aggressive fine-tune; a run at a tiny
    learning rate shows none on the control (its interval covers 0) and a negligible perplexity change."""
    from tiny import write_sst2_tsv

    from tasktune.tasks.spec import shipped

    data = write_sst2_tsv(tmp_path / "train.tsv", n=200)
    text = tmp_path / "general.txt"
    text.write_text("\n\n".join(f"the film {w} is a story of the city and the river" for w in
                                ("good", "bad", "dull", "fun", "moving", "tedious", "brilliant", "weak") * 5))
    flipped = tmp_path / "flipped.yaml"
    spec = shipped()["sst2"].read_text().replace("name: sst2", "name: sst2_flipped")
    spec = spec.replace('verbalizer: " negative"', 'verbalizer: " @@"').replace(
        'verbalizer: " positive"', 'verbalizer: " negative"').replace('verbalizer: " @@"', 'verbalizer: " positive"')
    flipped.write_text(spec)
    monkeypatch.setenv("TASKTUNE_DATA_DIR", str(tmp_path / "datadir"))
    (tmp_path / "datadir" / "sst2_flipped").mkdir(parents=True)
    write_sst2_tsv(tmp_path / "datadir" / "sst2_flipped" / "train.tsv", n=200, seed=7)
    common = [f"eval.perplexity={text}", "eval.perplexity_docs=40", f"eval.controls=[{flipped}]",
              "eval.control_rows=60", "train.max_steps=300", "train.eval_steps=300", "train.batch_size=8", "train.lora_dropout=0.0",
              "train.objective=verbalizer", "data.val_size=16"]
    assert main(run_args(tiny_llama, data, tmp_path, "learned", *common, "train.learning_rate=3e-3")) == 0
    assert main(run_args(tiny_llama, data, tmp_path, "gentle", *common, "train.learning_rate=1e-7")) == 0
    learned = json.loads((tmp_path / "learned" / "report.json").read_text())
    gentle = json.loads((tmp_path / "gentle" / "report.json").read_text())
    gain = learned["paired"]["score"]["gain"]
    assert gain["difference"] > 0 and gain["p_value"] < 0.05, "the task itself was learned"
    cost = learned["costs"]["controls"]["sst2_flipped"]["gain"]
    assert cost["difference"] < 0 and cost["interval"][1] < 0 and cost["p_value"] < 0.05
    assert learned["costs"]["perplexity"]["interval"][0] > 0  # general text got less likely
    quiet = gentle["costs"]["controls"]["sst2_flipped"]["gain"]
    assert quiet["interval"][0] <= 0 <= quiet["interval"][1]
    assert abs(gentle["costs"]["perplexity"]["relative_change"]) < 1e-3
    report = (tmp_path / "learned" / "report.md").read_text()
    assert "## Bought and cost" in report and "perplexity on held-out general text" in report
    assert "control `sst2_flipped`" in report
    controls = learned["finetuned"]["cost"]["controls"]["sst2_flipped"]
    assert controls["excluded_as_training_rows"] >= 0 and controls["rows"] == 60
    # `compare` puts the costs beside the gains, with their intervals.
    assert main(["compare", str(tmp_path / "learned"), str(tmp_path / "gentle"), "--out", str(tmp_path / "cmp")]) == 0
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in
            (tmp_path / "cmp" / "compare.md").read_text().splitlines() if line.startswith("| cost_")}
    control_metric = learned["costs"]["controls"]["sst2_flipped"]["metric"]
    assert set(rows) == {"cost_perplexity_change", f"cost_sst2_flipped_{control_metric}"}
    learned_cell, gentle_cell = rows[f"cost_sst2_flipped_{control_metric}"]
    assert learned_cell.startswith(f"{cost['difference']:+.4f} [") and learned_cell.endswith("(n 60)")
    assert gentle_cell.startswith(f"{quiet['difference']:+.4f} [")


@pytest.mark.parametrize("method", ["lora", "dora", "rslora", "ia3", "qlora", "pissa", "full"])
def test_every_method_trains_on_a_bf16_base(tiny_llama, sst2_tsv, tmp_path, method):
    """The CPU recipes' dtype: bf16 weights, fp32 adapter weights under bf16 autocast (IA3 once failed here:
    peft's input-cast switch exists on LoRA layers only, and the other tests train in fp32)."""
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, method, f"train.method={method}", "dtype=bf16",
                         "train.logging_steps=1")) == 0
    report = json.loads((tmp_path / method / "report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["training"]["global_step"] == 4
    losses = [h["loss"] for h in json.loads((tmp_path / method / "train" / "log_history.json").read_text())
              if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)


def test_qlora_without_bitsandbytes_is_one_line_before_anything_loads(tiny_llama, sst2_tsv, tmp_path, monkeypatch,
                                                                    capsys):
    import importlib.util

    from tasktune import stages

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setattr(stages, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "q", "train.method=qlora")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'train.method qlora needs bitsandbytes: pip install "tasktune[qlora]"' in err[0]
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("name", ["sst2-gemma3-270m-cpu", "squad2-gemma3-270m-cpu"])
def test_each_shipped_cpu_recipe_has_held_out_perplexity_documents(name):
    """The shipped recipes measure perplexity on the embedded paragraphs: each gets its documents, none of them
    a context of one of its examples (the SQuAD recipe reads every embedded paragraph's file, so only its
    unused paragraphs qualify). Red when the documents were taken from files the run does not read: none."""
    from tasktune import recipes
    from tasktune.config import load_recipe
    from tasktune.costs import held_out_documents
    from tasktune.tasks import get_task

    recipe = load_recipe(str(recipes.find(name)))
    task = get_task(recipe.task)
    rows, _ = task.load(recipe.data.path)
    by_id = {r["id"]: r for r in rows}
    examples = {part: [by_id[i] for i in ids] for part, ids in task.split(rows, recipe.data).items()}
    examples = task.sampled_parts(examples, recipe.data)
    docs, origin = held_out_documents(recipe, examples)
    assert len(docs) == recipe.eval.perplexity_docs >= 50  # the recipe gets the documents it asks for
    used = {r["context"] for part in examples.values() for r in part if "context" in r}
    assert not used & set(docs)
    # The origin counts the documents from articles the run trains on, and says nothing where there are none.
    trained = {r["title"] for part in ("train", "validation") for r in examples[part] if r.get("title")}
    title_of = {r["context"]: r["title"] for r in rows if "context" in r}
    related = sum(title_of.get(d) in trained for d in docs)
    assert (f"({related} of {len(docs)} from articles it trains on)" in origin) == (related > 0)


@pytest.mark.parametrize("asked, says", [(3, False), (4, False), (5, True)])
def test_fewer_perplexity_documents_than_asked_are_said(tmp_path, capsys, asked, says):
    """A source with fewer documents than eval.perplexity_docs asks for is used whole, and the run says so (the
    SQuAD recipe once asked for 100 and silently got 65)."""
    from tasktune.costs import perplexity_documents

    path = tmp_path / "general.txt"
    path.write_text("one document.\n\ntwo documents.\n\nthree.\n\nfour.\n")
    docs, _ = perplexity_documents(str(path), set(), asked, 0)
    assert len(docs) == min(asked, 4)
    said = f"eval.perplexity_docs={asked} is more than the 4 documents of {path}: using all 4"
    assert (said in capsys.readouterr().out) == says


def test_a_perplexity_source_without_documents_is_refused_before_the_model_loads(tiny_llama, sst2_tsv, tmp_path,
                                                                                monkeypatch, capsys):
    from tasktune import stages

    empty = tmp_path / "general.txt"
    empty.write_text("\n\n  \n")
    monkeypatch.setattr(stages, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "empty", f"eval.perplexity={empty}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"tasktune: error: eval.perplexity: {empty} has no documents (non-empty blocks separated by "
                   "blank lines)"]
    assert not (tmp_path / "empty").exists() and not (tmp_path / ".empty.partial").exists()


def test_the_model_card_carries_the_costs(tiny_llama, tmp_path, monkeypatch):
    from huggingface_hub import metadata_load
    from tiny import write_sst2_tsv

    data = write_sst2_tsv(tmp_path / "train.tsv", n=80)
    text = tmp_path / "general.txt"
    text.write_text("\n\n".join(f"the film is {w} and the city is a river" for w in ("good", "bad", "dull") * 4))
    assert main(run_args(tiny_llama, data, tmp_path, "carded", f"eval.perplexity={text}", "eval.controls=[sst2]",
                         "eval.control_rows=20")) == 0
    assert main(["export", str(tmp_path / "carded"), "--out", str(tmp_path / "card")]) == 0
    results = metadata_load(tmp_path / "card" / "README.md")["model-index"][0]["results"]
    names = [r["task"]["name"] for r in results]
    assert "control: sst2" in names and "perplexity on held-out general text" in names


def test_a_run_parses_its_task_spec_once_and_records_the_bytes_it_read(tiny_llama, sst2_tsv, tmp_path, monkeypatch):
    """The recipe check, the run, the report and the card all need the spec: it is parsed once, and the run
    directory keeps exactly what was parsed (CRLF line ends and all), with its sha256 in the fingerprint."""
    import hashlib

    from tasktune import typed_yaml
    from tasktune.tasks import spec as spec_module

    spec = tmp_path / "crlf.yaml"
    spec.write_bytes(spec_module.shipped()["sst2"].read_bytes().replace(b"\n", b"\r\n"))
    parsed = []
    real = typed_yaml.parse_yaml_mapping
    monkeypatch.setattr(typed_yaml, "parse_yaml_mapping",
                        lambda text, what, where: parsed.append((what, where)) or real(text, what, where))
    monkeypatch.setattr(spec_module, "_PARSED", {})
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "once", f"task={spec}")) == 0
    assert [w for w in parsed if w[0] == "task"] == [("task", str(spec))]
    run = tmp_path / "once"
    assert (run / "task.yaml").read_bytes() == spec.read_bytes()
    fingerprint = json.loads((run / "fingerprint.json").read_text())
    assert fingerprint["task_sha256"] == hashlib.sha256(spec.read_bytes()).hexdigest()


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('["nf4"]', "expected a JSON object, got list"),
    ('{"quantisation": "nf4"}', "key 'quantisation' is not one of"),
    ('{"trained_rank": "4"}', "key 'trained_rank' is not one of"),
    ('{"method": "galore"}', "method must be one of ['qlora', 'pissa', 'full']"),
    ('{"method": "full"}', "a full fine-tune's record needs its head"),
])
def test_a_malformed_adapter_base_record_is_one_line(tiny_llama, sst2_tsv, tmp_path, capsys, content, message):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "tasktune_base.json").write_text(content)
    assert main(["eval", "--task", "sst2", "--model", str(tiny_llama), "--data", str(sst2_tsv), "--adapter",
                 str(adapter), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tasktune_base.json" in err[0] and message in err[0], err
    assert not (tmp_path / "out").exists()


# --- pure reporting: report and compare read run files; measuring stays with the stages ----------------------------

BLOCK_TORCH = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft", "accelerate"):
            raise ImportError(f"{name} imported while reporting")
sys.meta_path.insert(0, Blocked())
"""


def test_report_and_compare_import_no_torch():
    import subprocess
    import sys

    code = "import tasktune.report, tasktune.compare, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_finished_run_is_reported_and_compared_without_torch(finished, tmp_path):
    """`tasktune report` (report.json, report.md/html, plots) and `tasktune compare` on a real run, in a process
    where importing torch, transformers, peft or accelerate fails."""
    import shutil
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(finished[0], run, symlinks=True)
    (run / "report.md").unlink()
    code = BLOCK_TORCH + f"""
from tasktune.cli import main
from tasktune.report import write_report
write_report({str(run)!r})
assert main(["report", {str(run)!r}]) == 0
assert main(["compare", {str(run)!r}, {str(finished[0])!r}, "--out", {str(tmp_path / "cmp")!r}]) == 0
assert not any(m.split(".")[0] in ("torch", "transformers", "peft") for m in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (run / "report.md").is_file() and (tmp_path / "cmp" / "compare.md").is_file()


def test_the_torch_block_can_fail():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", BLOCK_TORCH + "import tasktune.param_report"], capture_output=True,
                         text=True)
    assert out.returncode != 0 and "imported while reporting" in out.stderr


def test_one_jsonl_reader():
    definitions = [f"{path.relative_to(ROOT)}:{node.name}" for path in (ROOT / "src" / "tasktune").rglob("*.py")
                   for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.FunctionDef) and "read_jsonl" in node.name]
    assert definitions == ["src/tasktune/run_layout.py:read_jsonl"]


def test_run_file_names_are_spelled_in_run_layout_only():
    """A run's file names live in run_layout.py; every other module asks RunLayout for them."""
    from tasktune.run_layout import RunLayout

    layout = RunLayout(Path("r"))
    # (report.md and report.html are a sweep's file names too)
    names = {f'"{p.name}"' for p in (*layout.finished_paths(trained=True), layout.params, layout.split)}
    hits = [f"{path.relative_to(ROOT)}:{n}" for path in (ROOT / "src" / "tasktune").rglob("*.py")
            if path.name not in ("run_layout.py",)
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if any(name in line for name in names - {'"adapter"'})]
    assert hits == []


def method_name_comparisons(source: str, names: set[str]) -> list[int]:
    """Lines where a method's name is compared (==, !=, in) as a string literal."""
    def literals(node) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(literals(e) for e in node.elts)) if node.elts else set()
        return set()

    return [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Compare)
            and any(literals(side) & names for side in (node.left, *node.comparators))]


def test_no_method_name_is_compared_outside_methods():
    """How a method is analysed, saved, loaded and exported is asked of its `Method` object."""
    from tasktune.methods import METHODS

    hits = [f"{path.relative_to(ROOT)}:{line}" for path in (ROOT / "src" / "tasktune").rglob("*.py")
            if path.name != "methods.py"
            for line in method_name_comparisons(path.read_text(), set(METHODS) - {"none"})]  # also "no logger"
    assert hits == []


def test_the_method_name_check_can_fail():
    assert method_name_comparisons('if record.get("method") == "full":\n    pass\nx = m in ("qlora", "pissa")',
                                   {"full", "pissa"}) == [1, 3]


# --- texts that name a command, a document or a section are true ------------------------------------------------

def test_the_cli_docstring_names_every_command():
    import argparse

    from tasktune import cli

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    named = set(re.search(r"`tasktune ([a-z|\-\n]+)`", cli.__doc__)[1].replace("\n", "").split("|"))
    assert named == set(commands)


def doc_pointers(text: str) -> list[tuple[str, str | None]]:
    """(document, section or None) for each `docs/NAME.md` a text names, with `(section X)` or `, section X`,
    and each README section it names (`README section 'X'`, `README: X`)."""
    docs = [(m[1], m[2]) for m in re.finditer(r"(docs/[\w\-]+\.md)(?:,? \(?section ([A-Z][\w ]+?)[\);])?", text)]
    readme = [("README.md", m[1] or m[2])
              for m in re.finditer(r"README(?:\.md)? section '([^']+)'|README(?:\.md)?: ([A-Z][\w ]+)", text)]
    return docs + readme


def test_every_document_and_section_the_code_points_to_exists():
    hits = []
    for path in (ROOT / "src" / "tasktune").rglob("*.py"):
        for doc, section in doc_pointers(path.read_text()):
            target = ROOT / doc
            headings = {line.lstrip("#").strip() for line in target.read_text().splitlines()
                        if line.startswith("#")} if target.is_file() else set()
            if not target.is_file() or (section and not any(h.startswith(section) for h in headings)):
                hits.append(f"{path.name}: {doc} {section or ''}")
    assert hits == []


def test_the_pointer_check_can_fail():
    assert doc_pointers("see docs/scale-out.md (section Memory) and docs/none.md; README section 'Memory'") == [
        ("docs/scale-out.md", "Memory"), ("docs/none.md", None), ("README.md", "Memory")]


# --- layers: each module imports (anywhere in its code, lazy imports included) only its own layer or lower ---------

LAYERS = [
    # foundations
    {"_version", "errors", "atomic", "cache", "device", "memory", "runlog", "html_page", "run_layout", "typed_yaml",
     "prompt_template", "inference_requests", "infer", "metrics", "data.sampling"},
    # files and data
    {"ownership", "rundir", "checkpoints", "plots", "data", "data.hub", "data.split", "data.squad", "data.table"},
    # tasks
    {"tasks", "tasks.base", "tasks.spec", "tasks.classification", "tasks.extractive_qa", "tasks.multiple_choice",
     "tasks.generation"},
    # models, methods, objectives, inference
    {"runner", "llama_cpp_runtime", "evaluation", "lora_delta", "methods", "models", "losses", "gpu_memory", "recipes",
     "adaptation", "gguf_export"},
    # recipes as read
    {"config", "recipe_reference"},
    # what the stages measure
    {"costs", "train", "param_report"},
    # the stage API that run and sweep share (shipping: a run's GGUF files, written and measured)
    {"stages", "shipping"},
    # reading run files
    {"cost_report", "report", "compare", "sweep_report", "shipped_report", "export"},
    # the commands
    {"pipeline", "sweep_spec", "sweep_study", "sweep_trials", "sweep_final", "sweeper", "api", "cli", "__main__", ""},
]
MEASURING = {"costs", "train", "models", "infer", "runner", "llama_cpp_runtime", "evaluation", "param_report", "lora_delta", "stages", "shipping",
             "pipeline", "sweep_study", "sweep_trials", "sweep_final", "sweeper", "losses", "adaptation"}


def layer_of(module: str) -> int:
    name = module.removeprefix("tasktune").removeprefix(".")
    found = [i for i, layer in enumerate(LAYERS) if name in layer or name.split(".")[0] + ".*" in layer
             or (name.startswith("metrics.") and "metrics" in LAYERS[i])]
    assert found, f"{module} has no layer in LAYERS: add it where it belongs"
    return found[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a)]


def test_every_import_points_down_the_layers():
    assert upward_imports(import_graph(ROOT / "src" / "tasktune", "tasktune")) == []


def test_the_layer_check_can_fail():
    assert upward_imports({"tasktune.tasks.classification": {"tasktune.losses"}}) == [
        "tasktune.tasks.classification -> tasktune.losses"]


def test_reporting_never_imports_what_measures():
    graph = import_graph(ROOT / "src" / "tasktune", "tasktune")
    reporting = {"tasktune.report", "tasktune.compare", "tasktune.cost_report", "tasktune.sweep_report",
                 "tasktune.shipped_report"}
    hits = [f"{m} -> {d}" for m in reporting for d in graph[m] if d.removeprefix("tasktune.") in MEASURING]
    assert hits == []


def private_imports(folder: Path) -> list[str]:
    """`from tasktune.x import _name`: a module reaching past another's public API."""
    hits = []
    for file in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tasktune"):
                hits += [f"{file.name}: {node.module}.{a.name}" for a in node.names
                         if a.name.startswith("_") and a.name != "__version__"]
    return hits


def test_run_and_sweep_call_one_public_stage_api(tmp_path):
    """The sweep is a loop over the stages `run` calls (stages.py), not over the run command's internals: no
    sweep module imports pipeline, both import stages, and no module imports another's private name."""
    graph = import_graph(ROOT / "src" / "tasktune", "tasktune")
    sweep = {m for m in graph if m.startswith("tasktune.sweep")}
    assert sweep >= {"tasktune.sweeper", "tasktune.sweep_spec", "tasktune.sweep_study", "tasktune.sweep_trials",
                     "tasktune.sweep_final", "tasktune.sweep_report"}
    assert [m for m in sweep if "tasktune.pipeline" in graph[m]] == []
    assert all("tasktune.stages" in graph[m] for m in ("tasktune.pipeline", "tasktune.sweep_trials",
                                                       "tasktune.sweep_final", "tasktune.sweeper"))
    assert private_imports(ROOT / "src" / "tasktune") == []
    (tmp_path / "a.py").write_text("from tasktune.pipeline import _run\n")  # the check can fail
    assert private_imports(tmp_path) == ["a.py: tasktune.pipeline._run"]


def test_the_resolved_method_and_objective_travel_with_the_prepared_run():
    """`stages.prepare` (and `stages.variant` for a trial) resolve the method and objective once, into
    `Prepared.adaptation`; the stages and the commands never look them up by name again. The run command's one
    lookup refuses `train.method: none` before anything loads."""
    lookups = re.compile(r"\bget_(?:method|objective)\(")
    counts = {name: len(lookups.findall((ROOT / "src" / "tasktune" / f"{name}.py").read_text()))
              for name in ("stages", "pipeline", "sweeper", "sweep_spec", "sweep_study", "sweep_trials",
                           "sweep_final")}
    assert counts == {**dict.fromkeys(counts, 0), "pipeline": 1}
