import json

import pytest

from tasktune.cli import main
from tiny import run_args


def tiny_run_args(model, data, out, *extra):
    return run_args(model, data, out, "t", *extra, steps=8, eval_steps=4, batch_size=8, protocols=None)


@pytest.mark.parametrize("objective", ["verbalizer", "label_lm", "lm", "seqcls"])
def test_run_end_to_end(tiny_llama, sst2_tsv, tmp_path, objective):
    assert main(tiny_run_args(tiny_llama, sst2_tsv, tmp_path, f"train.objective={objective}")) == 0
    run = tmp_path / "t"
    for name in ["recipe.yaml", "split.json", "report.json", "report.md", "zeroshot/metrics.json",
                 "zeroshot/predictions.jsonl", "finetuned/metrics.json", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "train/log_history.json"]:
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    assert set(report["zeroshot"]) >= {"score", "generate"}
    fine_protocol = "classifier" if objective == "seqcls" else "score"
    # The reported accuracy is the one the written predictions give.
    records = [json.loads(x) for x in (run / "finetuned" / "predictions.jsonl").read_text().splitlines()]
    right = sum(r[f"{fine_protocol}_pred"] == r["label"] for r in records)
    assert report["finetuned"][fine_protocol]["accuracy"] == right / len(records) and len(records) == 24
    assert report["parameters"]["adapted"]["trainable"] > 0
    assert report["data"]["test"] == 24
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) + len(split["validation"]) + len(split["test"]) == 120
    assert "zero-shot `score`" in (run / "report.md").read_text()
    assert not list(tmp_path.glob(".t.partial*"))


def test_eval_contract(tiny_llama, sst2_tsv, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--task", "sst2", "--model", str(tiny_llama), "--data", str(sst2_tsv),
                 "--limit", "30", "--out", str(out), "--dtype", "fp32"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for protocol in ("score", "generate"):
        assert set(metrics[protocol]) >= {"accuracy", "precision", "recall", "f1", "f1_macro", "none_rate", "n"}
        assert metrics[protocol]["n"] == 30
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 30 and "score_pred" in json.loads(lines[0])


def test_eval_with_adapter_reproduces_run(tiny_llama, sst2_tsv, tmp_path):
    assert main(tiny_run_args(tiny_llama, sst2_tsv, tmp_path, "eval.protocols=score")) == 0
    run = tmp_path / "t"
    out = tmp_path / "ev"
    assert main(["eval", "--task", "sst2", "--model", str(tiny_llama), "--adapter", str(run / "adapter"),
                 "--data", str(sst2_tsv), "--split", "test", "--protocol", "score", "--out", str(out),
                 "--dtype", "fp32"]) == 0
    ours = json.loads((out / "metrics.json").read_text())["score"]
    theirs = json.loads((run / "finetuned" / "metrics.json").read_text())["score"]
    assert ours["n"] == theirs["n"] and ours["accuracy"] == pytest.approx(theirs["accuracy"])


@pytest.mark.parametrize("extra, message", [
    (["train.learning_rate=-1"], "learning_rate must be > 0"),
    (["train.lora_r=0"], "lora_r must be > 0"),
    (["model=/nonexistent/model-dir"], "cannot load model"),
    (["model=no-such-org/no-such-model"], "cannot load model"),
    (["data.path=/nonexistent.tsv"], "does not exist"),
])
def test_bad_input_exits_2_and_writes_nothing(tiny_llama, sst2_tsv, tmp_path, capsys, extra, message):
    assert main(tiny_run_args(tiny_llama, sst2_tsv, tmp_path, *extra)) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [sst2_tsv] or not (tmp_path / "t").exists()
    assert not list(tmp_path.glob(".t*"))


def test_bad_data_exits_2(tiny_llama, tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine\t3\n")
    assert main(tiny_run_args(tiny_llama, bad, tmp_path / "runs")) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "row 2" in err
    assert not (tmp_path / "runs").exists()


def test_existing_run_is_not_overwritten(tiny_llama, sst2_tsv, tmp_path, capsys):
    (tmp_path / "t").mkdir()
    assert main(tiny_run_args(tiny_llama, sst2_tsv, tmp_path)) == 2
    assert "already exists" in capsys.readouterr().err


def test_help_mentions_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "train", "eval"):
        assert command in out


def test_multi_token_verbalizer_needs_the_lm_objective(tiny_llama, sst2_tsv, tmp_path, capsys):
    args = tiny_run_args(tiny_llama, sst2_tsv, tmp_path, 'eval.verbalizers=[" negative", " very positive"]')
    assert main(args) == 2  # the recipe trains with label_lm, which needs one token per label
    assert "train.objective=label_lm needs single-token verbalizers" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()
    assert main(args + ["train.objective=lm", "eval.protocols=score"]) == 0
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert report["protocol"]["label_token_ids"] is None and report["finetuned"]["score"]["n"] == 24


def test_custom_verbalizers(tiny_llama, sst2_tsv, tmp_path):
    assert main(tiny_run_args(tiny_llama, sst2_tsv, tmp_path, 'eval.verbalizers=[" bad", " good"]')) == 0
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert report["protocol"]["verbalizers"] == [" bad", " good"]


def test_pickle_weights_are_refused(tiny_llama, sst2_tsv, tmp_path, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file

    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_llama, model_dir)
    (model_dir / "model.safetensors").unlink()
    torch.save(load_file(tiny_llama / "model.safetensors"), model_dir / "pytorch_model.bin")
    out = tmp_path / "ev"
    code = main(["eval", "--task", "sst2", "--model", str(model_dir), "--data", str(sst2_tsv), "--out", str(out)])
    assert code == 2 and not out.exists()
    assert "only from safetensors" in capsys.readouterr().err


def test_eval_run_uses_the_runs_own_recipe(tiny_llama, sst2_tsv, tmp_path):
    """`eval --run` rebuilds the run's protocol (here a non-default verbalizer pair and 1 shot, which the
    default `eval` would not use) and reproduces the run's fine-tuned figures exactly."""
    assert main(tiny_run_args(tiny_llama, sst2_tsv, tmp_path, "eval.protocols=score", "eval.shots=1",
                              "eval.verbalizers=[ bad, good]")) == 0
    run = tmp_path / "t"
    assert main(["eval", "--run", str(run), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    theirs = json.loads((run / "finetuned" / "metrics.json").read_text())
    assert again["score"]["n"] == theirs["score"]["n"] == 24
    assert again["score"]["confusion_matrix"] == theirs["score"]["confusion_matrix"]
    ours = [json.loads(x) for x in (tmp_path / "again" / "predictions.jsonl").read_text().splitlines()]
    before = [json.loads(x) for x in (run / "finetuned" / "predictions.jsonl").read_text().splitlines()]
    # Equal on CPU; on CUDA kernels may differ in the last rounded digit.
    assert [r["score_logprobs"] for r in ours] == [pytest.approx(r["score_logprobs"], abs=2e-5) for r in before]
    # --data: every row of another file, same protocol.
    other = tmp_path / "other.tsv"
    other.write_text("sentence\tlabel\nthe film was good \t1\nthe plot was dull \t0\n")
    assert main(["eval", "--run", str(run), "--data", str(other), "--out", str(tmp_path / "other")]) == 0
    assert json.loads((tmp_path / "other" / "metrics.json").read_text())["score"]["n"] == 2
