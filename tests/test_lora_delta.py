"""Parameter analysis, merging, plots, HTML report and export (issue: what changed and what it bought)."""

import json
import re

import pytest
import torch
import yaml

from tasktune.lora_delta import frozen_check
from tasktune.methods import analyse_saved
from tasktune.cli import main
from tasktune.config import TrainConfig
from tasktune.models import count_parameters, load_model
from tasktune.train import add_lora
from tiny import VOCAB

RECIPE = "sst2-gemma3-270m-cpu"


def trained_adapter(path, tmp_path, r=4, alpha=8):
    """A LoRA adapter with random non-zero B (as after training) saved next to its base model."""
    lm = load_model(str(path), dtype="fp32")
    torch.manual_seed(0)
    model = add_lora(lm.model, TrainConfig(lora_r=r, lora_alpha=alpha, lora_dropout=0.0), "verbalizer")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    return lm, model


def test_counts_match_hand_computed_numbers(tiny_llama, tmp_path):
    lm, model = trained_adapter(tiny_llama, tmp_path, r=4)
    v = len(VOCAB)
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3 + 2 * 64  # q,o + k,v + gate,up,down + 2 norms
    base = 2 * v * 64 + 2 * per_layer + 64  # untied embeddings and head, 2 layers, final norm
    assert count_parameters(lm.model)["total"] == base + 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
    lora_per_layer = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert count_parameters(model)["trainable"] == 2 * lora_per_layer
    result = analyse_saved(str(tiny_llama), tmp_path / "adapter")
    assert result["adapter"]["parameters"] == result["adapter"]["formula"] == 2 * lora_per_layer
    assert result["adapter"]["modules"] == 14
    merged = model.merge_and_unload()
    assert count_parameters(merged)["total"] == base


def test_delta_statistics_match_dense_computation(tiny_models, tmp_path):
    lm, model = trained_adapter(tiny_models["gemma3"], tmp_path, r=4, alpha=8)
    result = analyse_saved(str(tiny_models["gemma3"]), tmp_path / "adapter")
    named = dict(model.named_modules())
    for stats in result["modules"]:
        layer = named["base_model.model." + stats["module"]]
        delta = layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double() * 2.0  # alpha / r
        w = layer.base_layer.weight.double()
        assert stats["delta_fro"] == pytest.approx(torch.linalg.norm(delta).item(), rel=1e-6)
        assert stats["relative"] == pytest.approx((torch.linalg.norm(delta) / torch.linalg.norm(w)).item(), rel=1e-6)
        assert stats["effective_rank"] == torch.linalg.matrix_rank(delta).item() == 4


def test_merged_equals_base_plus_delta_and_logits_match(tiny_llama, tmp_path):
    lm, model = trained_adapter(tiny_llama, tmp_path)
    base = load_model(str(tiny_llama), dtype="fp32").model
    ids = torch.tensor([[1, 5, 9, 12, 30, 7]])
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits
    deltas = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            deltas[name.removeprefix("base_model.model.") + ".weight"] = \
                module.lora_B["default"].weight @ module.lora_A["default"].weight * 2.0
    merged = model.merge_and_unload()
    base_state = base.state_dict()
    for name, tensor in merged.state_dict().items():
        expected = base_state[name] + deltas[name] if name in deltas else base_state[name]
        torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapter_logits, atol=1e-5, rtol=1e-5)
    check = frozen_check(merged, str(tiny_llama), {n.removesuffix(".weight") for n in deltas})
    assert check["unexpected_changes"] == [] and check["changed"] == 14 and check["identical"] == 7


@pytest.fixture(scope="module")
def finished_run(tiny_llama, tmp_path_factory):
    from tiny import write_sst2_tsv

    root = tmp_path_factory.mktemp("run")
    data = write_sst2_tsv(root / "train.tsv")
    assert main(["run", RECIPE, "eval.controls=[]", "eval.perplexity=null", "train.compile=false", f"model={tiny_llama}", f"data.path={data}", f"output_dir={root}", "name=r",
                 "data.val_size=16", "data.limit_train=null", "eval.limit_generate=null", "train.eval_steps=4",
                 "train.max_steps=8", "train.batch_size=8", "dtype=fp32", "train.learning_rate=5e-3"]) == 0
    return root / "r", data


def test_run_writes_params_plots_and_self_contained_html(finished_run):
    run, _ = finished_run
    params = json.loads((run / "params.json").read_text())
    assert params["counts"]["merged_equals_base"] and params["analysis"]["adapter"]["formula_matches"]
    assert params["frozen"]["unexpected_changes"] == []
    for name in ("training.png", "confusion_score.png", "metrics.png", "delta_heatmap.png"):
        png = (run / "plots" / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 5000, name
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert not re.search(r'src="(?!data:)', html) and "<table>" in html
    md = (run / "report.md").read_text()
    assert "‖ΔW‖/‖W‖" in md and "merged model" in md


def test_params_command_recomputes(finished_run, capsys):
    run, _ = finished_run
    before = json.loads((run / "params.json").read_text())
    (run / "params.json").unlink()
    assert main(["params", str(run)]) == 0
    after = json.loads((run / "params.json").read_text())
    assert after["counts"] == before["counts"] and after["frozen"] == before["frozen"]
    assert [m["delta_fro"] for m in after["analysis"]["modules"]] == pytest.approx(
        [m["delta_fro"] for m in before["analysis"]["modules"]], rel=1e-6)
    assert after["analysis"]["modules"][0]["delta_fro"] > 0
    assert "r×(in+out)" in capsys.readouterr().out


@pytest.mark.parametrize("merge", [False, True])
def test_export_reloads_and_reproduces_metrics(finished_run, tmp_path, merge):
    run, data = finished_run
    out = tmp_path / ("merged" if merge else "adapter")
    assert main(["export", str(run), "--out", str(out)] + (["--merge"] if merge else [])) == 0
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    results = front["model-index"][0]["results"][0]
    # The run read a local file, not the hub dataset: the card names the file and claims no hub dataset.
    assert results["task"]["type"] == "text-classification" and results["dataset"]["type"] == "sst2"
    assert results["dataset"]["name"] == "local file train.tsv" and "datasets" not in front
    accuracy = next(m["value"] for m in results["metrics"] if m["type"] == "accuracy")
    report = json.loads((run / "report.json").read_text())
    assert accuracy == pytest.approx(report["finetuned"]["score"]["accuracy"], abs=1e-4)
    # The card loads with huggingface_hub, and its model-index parses into EvalResults.
    from huggingface_hub import ModelCard, metadata_load

    loaded = ModelCard.load(out / "README.md")
    by_metric = {r.metric_type: r for r in loaded.data.eval_results}
    assert by_metric["accuracy"].metric_value == accuracy and by_metric["accuracy"].dataset_type == "sst2"
    assert "n=24" in by_metric["accuracy"].dataset_split
    assert metadata_load(out / "README.md")["model-index"][0]["results"][0]["metrics"]
    assert loaded.data.library_name == ("transformers" if merge else "peft")
    assert loaded.data.base_model is None and loaded.data.license is None  # a local model: nothing claimed
    assert "95% bootstrap interval" in loaded.text and "LoRA (trainable)" in loaded.text
    assert (out / ("model.safetensors" if merge else "adapter_model.safetensors")).is_file()
    # Reload with plain transformers/peft through tasktune's eval and reproduce the run's test metrics.
    model_args = ["--model", str(out)] if merge else ["--model", report["model"], "--adapter", str(out)]
    ev = tmp_path / "ev"
    assert main(["eval", "--task", "sst2", *model_args, "--data", str(data), "--split", "test",
                 "--protocol", "score", "--out", str(ev), "--dtype", "fp32"]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())["score"]
    assert metrics["accuracy"] == pytest.approx(report["finetuned"]["score"]["accuracy"])


def test_push_offline_fails_clearly_and_keeps_export(finished_run, tmp_path, capsys, monkeypatch):
    run, _ = finished_run
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    out = tmp_path / "exp"
    assert main(["export", str(run), "--out", str(out), "--push", "someone/model"]) == 2
    err = capsys.readouterr().err
    assert "could not push" in err and "hf_secret_token_value" not in err
    assert (out / "README.md").is_file() and (out / "adapter_model.safetensors").is_file()
    for file in out.rglob("*"):
        if file.is_file():
            assert b"hf_secret_token_value" not in file.read_bytes()


def test_compare(finished_run, tiny_llama, tmp_path):
    run, data = finished_run
    assert main(["run", RECIPE, "eval.controls=[]", "eval.perplexity=null", "train.compile=false", f"model={tiny_llama}", f"data.path={data}", f"output_dir={tmp_path}", "name=other",
                 "data.val_size=16", "data.limit_train=null", "eval.limit_generate=null", "train.eval_steps=4",
                 "train.max_steps=4", "train.batch_size=8", "dtype=fp32", "train.learning_rate=1e-5"]) == 0
    assert main(["compare", str(run), str(tmp_path / "other"), "--out", str(tmp_path / "cmp")]) == 0
    text = (tmp_path / "cmp" / "compare.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:4]]
            for line in text.splitlines() if line.startswith("| ")}
    reports = [json.loads((r / "report.json").read_text()) for r in (run, tmp_path / "other")]
    assert rows["finetuned_accuracy"] == [f"{r['finetuned']['score']['accuracy']:.4f}" for r in reports]
    assert rows["zeroshot_accuracy"][0] == rows["zeroshot_accuracy"][1]  # same model, same split
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 5000


def test_model_card_facts_of_known_models():
    from tasktune.export import base_model_facts

    hub_id, license_id, origin = base_model_facts("gemma3-270m")
    assert (hub_id, license_id) == ("google/gemma-3-270m", "gemma") and "dequantized" in origin and "Q4_K_M" in origin
    assert base_model_facts("llama3.2-1b")[:2] == ("meta-llama/Llama-3.2-1B", "llama3.2")
    assert base_model_facts("meta-llama/Llama-3.2-1B")[:2] == ("meta-llama/Llama-3.2-1B", "llama3.2")
    assert base_model_facts("someone/their-model")[:2] == ("someone/their-model", None)


def test_push_passes_private(monkeypatch, tmp_path):
    import huggingface_hub

    from tasktune.export import push

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            calls["create"] = (repo_id, private)

        def upload_folder(self, **kwargs):
            calls["upload"] = kwargs["repo_id"]
            return type("Info", (), {"commit_url": "https://hub/commit"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push(tmp_path, "me/model", private=True) == "https://hub/commit"
    assert calls == {"create": ("me/model", True), "upload": "me/model"}
