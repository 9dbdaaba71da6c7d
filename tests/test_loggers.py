"""Experiment loggers (train.report_to) and run.log."""

import json

import pytest

from tasktune.cli import main
from test_cli import tiny_run_args


def scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_training_validation_and_test_figures(tiny_llama, sst2_tsv, tmp_path):
    pytest.importorskip("tensorboard")
    assert main(tiny_run_args(tiny_llama, sst2_tsv, tmp_path, "train.report_to=tensorboard",
                              "train.logging_steps=2")) == 0
    run = tmp_path / "t"
    found = scalars(run / "train" / "tensorboard")  # the Trainer's loggers file "test_x" under "test/x"
    assert not list((run / "train" / "checkpoints").rglob("events.out.tfevents*"))
    assert found["train/loss"] and found["eval/accuracy"]
    report = json.loads((run / "report.json").read_text())
    assert found["test/zeroshot/score/accuracy"] == [pytest.approx(report["zeroshot"]["score"]["accuracy"])]
    assert found["test/finetuned/score/accuracy"] == [pytest.approx(report["finetuned"]["score"]["accuracy"])]


def test_default_writes_no_logger_files(tiny_llama, sst2_tsv, tmp_path):
    assert main(tiny_run_args(tiny_llama, sst2_tsv, tmp_path)) == 0
    assert not (tmp_path / "t" / "train" / "tensorboard").exists()
    assert not list((tmp_path / "t").rglob("events.out.tfevents*"))


def test_run_log_has_what_was_printed_without_progress_bars(tiny_llama, sst2_tsv, tmp_path, capsys):
    assert main(tiny_run_args(tiny_llama, sst2_tsv, tmp_path)) == 0
    printed = capsys.readouterr().out
    log = (tmp_path / "t" / "run.log").read_text()
    assert "\r" not in log and "it/s]" not in log and "\x1b[" not in log
    for line in ("zero-shot evaluation on 24 test examples", "test set seen in training", "fine-tuned score accuracy",
                 "'eval_accuracy'"):
        assert line in log and line in printed, line


@pytest.mark.parametrize("value, message", [("[nonsense]", "is not one of"), ("[swanlab]", "not installed")])
def test_unknown_or_missing_logger_fails_before_loading_anything(tmp_path, capsys, value, message):
    assert main(["run", "sst2-gemma3-270m-cpu", "eval.controls=[]", "eval.perplexity=null", f"train.report_to={value}", "model=/nonexistent",
                 f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "report_to" in err and "/nonexistent" not in err
    assert not list(tmp_path.iterdir())


def test_memory_is_recorded_per_stage_and_step(tiny_llama, sst2_tsv, tmp_path):
    assert main(tiny_run_args(tiny_llama, sst2_tsv, tmp_path, "train.logging_steps=2")) == 0
    run = tmp_path / "t"
    record = json.loads((run / "memory.json").read_text())
    stages = [p["at"] for p in record["stages"]]
    assert stages[0] == "model loaded" and "after train" in stages and "after finetuned" in stages
    assert [p["step"] for p in record["steps"] if p["at"] == "train step"] == [2, 4, 6, 8]
    summary = record["summary"]
    assert summary["peak_rss_mib"] >= max(p["rss_mib"] for p in record["stages"]) > 0
    assert summary["added_by_the_run_mib"] == round(summary["peak_rss_mib"] - summary["rss_after_model_load_mib"], 1)
    report = json.loads((run / "report.json").read_text())
    assert report["memory"] == summary and "## Memory" in (run / "report.md").read_text()
