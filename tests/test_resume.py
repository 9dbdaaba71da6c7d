"""Crash safety and reproducibility: SIGKILL mid-training, resume, damaged checkpoints, identical reruns."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tasktune.cli import main
from tiny import run_args

ROOT = Path(__file__).parents[1]


def args(model, data, out, name, *extra):
    # 60 steps with dropout on and no early stop: enough checkpoints to kill between and compare.
    return run_args(model, data, out, name, "train.lora_dropout=0.1", "train.patience=100", *extra,
                    steps=60, eval_steps=5)


def finished(run: Path) -> tuple[dict, dict]:
    report = json.loads((run / "report.json").read_text())
    return report["finetuned"]["score"], load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_run(a: Path, b: Path):
    metrics_a, weights_a = finished(a)
    metrics_b, weights_b = finished(b)
    for key in ("accuracy", "f1", "confusion_matrix"):
        assert metrics_a[key] == metrics_b[key]
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert weights_a[key].equal(weights_b[key]), key
    # Validation accuracy at every evaluation step matches too (training-loss logs restart their running
    # mean after a resume, so they are not compared).
    history = [json.loads((r / "train" / "log_history.json").read_text()) for r in (a, b)]
    evals = [{h["step"]: h["eval_accuracy"] for h in hist if "eval_accuracy" in h} for hist in history]
    assert evals[0] == evals[1]


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory):
    from tiny import write_sst2_tsv

    root = tmp_path_factory.mktemp("ref")
    data = write_sst2_tsv(root / "train.tsv")
    assert main(args(tiny_llama, data, root, "ref")) == 0
    return root / "ref", data


def test_same_seed_gives_identical_results(tiny_llama, reference, tmp_path):
    ref, data = reference
    assert main(args(tiny_llama, data, tmp_path, "again")) == 0
    assert_same_run(ref, tmp_path / "again")
    split = json.loads((ref / "split.json").read_text())
    assert len(split["data_sha256"][str(data)]) == 64


def early_stopping_counter(checkpoint: Path) -> int:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"]


@pytest.mark.parametrize("patience", [1, 2])
def test_sigkill_after_a_checkpoint_resumes_to_the_same_early_stop(tiny_llama, tmp_path, patience):
    """Kill -9 right after the last checkpoint before the early stop (for patience 2, the one where the
    patience counter stands at 1); the same command must stop at the same step with identical weights."""
    from tiny import write_sst2_tsv

    data = write_sst2_tsv(tmp_path / "train.tsv")
    settings = ["train.learning_rate=1e-3", f"train.patience={patience}"]
    assert main(args(tiny_llama, data, tmp_path, "ref", *settings)) == 0
    ref = tmp_path / "ref"
    stopped = json.loads((ref / "train" / "summary.json").read_text())["global_step"]
    assert stopped < 60, "the early stop must actually trigger"
    kill_step = stopped - 5  # the last checkpoint before the stop
    # The patience counter there, replayed from the uninterrupted run's validations (EarlyStoppingCallback:
    # a validation that does not beat the best so far adds one): it must stand at patience - 1.
    history = json.loads((ref / "train" / "log_history.json").read_text())
    best, counter = None, 0
    for h in (h for h in history if "eval_accuracy" in h and h["step"] <= kill_step):
        best, counter = (h["eval_accuracy"], 0) if best is None or h["eval_accuracy"] > best else (best, counter + 1)
    assert counter == patience - 1

    command = [sys.executable, "-m", "tasktune", *args(tiny_llama, data, tmp_path, "killed", *settings)]
    checkpoint = tmp_path / ".killed.partial" / "train" / "checkpoints" / f"checkpoint-{kill_step}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (checkpoint / "tasktune_complete.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the process must be killed, not finish"
    assert early_stopping_counter(checkpoint) == patience - 1
    assert not (tmp_path / "killed").exists(), "killed before finishing: no final directory"
    assert main(args(tiny_llama, data, tmp_path, "killed", *settings)) == 0  # the same command resumes
    assert not (tmp_path / ".killed.partial").exists()
    resumed = json.loads((tmp_path / "killed" / "train" / "summary.json").read_text())["global_step"]
    assert resumed == stopped
    assert_same_run(ref, tmp_path / "killed")


def test_damaged_checkpoint_is_skipped_for_the_previous_one(tiny_llama, reference, tmp_path, capsys):
    ref, data = reference
    # Train to step 20 and stop, as an interrupted run would leave it.
    assert main(args(tiny_llama, data, tmp_path, "dmg", "train.max_steps=60")) == 0
    run = tmp_path / "dmg"
    partial = tmp_path / ".dmg.partial"
    run.rename(partial)  # pretend training never finished: drop the later stages
    stages = json.loads((partial / "stages.json").read_text())
    stages["done"] = [s for s in stages["done"] if s in ("split", "zeroshot")]
    (partial / "stages.json").write_text(json.dumps(stages))
    checkpoints = sorted((partial / "train" / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    newest = checkpoints[-1]
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert main(args(tiny_llama, data, tmp_path, "dmg", "train.max_steps=60")) == 0
    out = capsys.readouterr().out
    assert f"skipping incomplete or damaged checkpoint {newest}" in out
    assert f"resuming training from {checkpoints[-2]}" in out
    assert_same_run(ref, run)


def test_finished_run_is_not_redone_and_other_recipes_are_refused(tiny_llama, reference, capsys):
    ref, data = reference
    before = (ref / "report.json").stat().st_mtime_ns
    assert main(args(tiny_llama, data, ref.parent, "ref")) == 0
    assert "already complete" in capsys.readouterr().out
    assert (ref / "report.json").stat().st_mtime_ns == before
    assert main(args(tiny_llama, data, ref.parent, "ref", "train.learning_rate=1e-3")) == 2
    assert "different recipe" in capsys.readouterr().err


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_llama, reference, tmp_path):
    ref, data = reference
    command = [sys.executable, "-m", "tasktune", *args(tiny_llama, data, tmp_path, "term")]
    checkpoints = tmp_path / ".term.partial" / "train" / "checkpoints"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (checkpoints / "checkpoint-10").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    if proc.returncode == 0:
        pytest.skip("training finished before the signal arrived")
    assert proc.returncode == 130 and "SIGTERM received: checkpoint saved" in err
    assert main(args(tiny_llama, data, tmp_path, "term")) == 0
    assert_same_run(ref, tmp_path / "term")


def test_hub_token_never_reaches_the_run_directory(tiny_llama, reference, tmp_path, monkeypatch):
    ref, data = reference
    secret = "hf_tasktune_secret_0123456789"
    monkeypatch.setenv("HF_TOKEN", secret)
    assert main(args(tiny_llama, data, tmp_path, "tok", "train.max_steps=4")) == 0
    assert main(["export", str(tmp_path / "tok"), "--out", str(tmp_path / "export")]) == 0
    files = [f for d in (tmp_path / "tok", tmp_path / "export") for f in d.rglob("*") if f.is_file()]
    assert len(files) > 10
    for file in files:
        assert secret.encode() not in file.read_bytes(), file


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_resume_with_dropout_reproduces_every_later_checkpoint(tiny_llama, tmp_path, sig):
    """Randomness on (LoRA dropout 0.1, shuffled, length-grouped batches), no early stop: after a kill (or a
    clean stop) after checkpoint 30 of 60, the resumed run's checkpoints 40, 50 and 60 must hold the same
    weights as the uninterrupted run's, not only the one it ends with."""
    from tiny import write_sst2_tsv

    data = write_sst2_tsv(tmp_path / "train.tsv")
    settings = ["train.eval_steps=10", "train.keep_checkpoints=null", "train.learning_rate=1e-3"]
    assert main(args(tiny_llama, data, tmp_path, "ref", *settings)) == 0
    command = [sys.executable, "-m", "tasktune", *args(tiny_llama, data, tmp_path, "cut", *settings)]
    checkpoint = tmp_path / ".cut.partial" / "train" / "checkpoints" / "checkpoint-30"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (checkpoint / "tasktune_complete.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait()
    assert proc.returncode in (-signal.SIGKILL, 130), "the process must be stopped, not finish"
    assert not (tmp_path / ".cut.partial" / "train" / "checkpoints" / "checkpoint-60").exists()
    assert main(args(tiny_llama, data, tmp_path, "cut", *settings)) == 0
    ref_checkpoints = tmp_path / "ref" / "train" / "checkpoints"
    names = sorted(p.name for p in ref_checkpoints.glob("checkpoint-*"))
    assert names == [f"checkpoint-{step}" for step in (10, 20, 30, 40, 50, 60)]
    for name in names:
        a = load_file(ref_checkpoints / name / "adapter_model.safetensors")
        b = load_file(tmp_path / "cut" / "train" / "checkpoints" / name / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        assert all(a[k].equal(b[k]) for k in a), f"{name} differs after resuming"
