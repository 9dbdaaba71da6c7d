"""Nothing lost, round two: the cases of the second red-team (issue 40). One test per case, each seen red on the
code before it; docs/bad-inputs.md lists the refusals."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasktune.cli import main
from test_careful_user import error_lines, finished, one_error_line, score_args, snapshot  # noqa: F401
from tiny import run_args, write_sst2_tsv

ROOT = Path(__file__).parents[1]


@pytest.fixture
def a_run(finished, tmp_path):
    """A private copy of the finished run (these tests change it)."""
    copy = tmp_path / "runs" / "base"
    shutil.copytree(finished[0], copy, symlinks=True)
    return copy


# --- files lost -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, edited", [(["report"], "report.md"), (["report"], "report.html"),
                                             (["params"], "params.json")])
def test_regenerating_never_replaces_a_file_the_user_edited(a_run, capsys, command, edited):
    path = a_run / edited
    path.write_text(path.read_text() + "\nmy notes on this run\n")
    before = snapshot(a_run)
    assert main([*command, str(a_run)]) == 2
    line = one_error_line(capsys)
    assert edited in line and "not what tasktune last wrote" in line
    assert snapshot(a_run) == before


def test_regenerating_an_unedited_run_still_works(a_run, capsys):
    assert main(["report", str(a_run)]) == 0
    assert main(["report", str(a_run)]) == 0  # and again: what it wrote is its own


def test_run_refuses_an_output_that_is_its_own_model(tiny_llama, tmp_path, capsys):
    """`run ... model=runs/m --overwrite` with the run directory being that same model."""
    model = tmp_path / "runs" / "m"
    shutil.copytree(tiny_llama, model)
    before = snapshot(model)
    data = write_sst2_tsv(tmp_path / "train.tsv")
    args = run_args(model, data, tmp_path / "runs", "m", "--overwrite")
    assert main(args) == 2
    line = one_error_line(capsys)
    assert "overlaps the model this command reads" in line
    assert snapshot(model) == before


def test_run_refuses_a_data_file_inside_its_run_directory(tiny_llama, tmp_path, capsys):
    (tmp_path / "runs" / "r").mkdir(parents=True)
    data = write_sst2_tsv(tmp_path / "runs" / "r" / "train.tsv")
    assert main(run_args(tiny_llama, data, tmp_path / "runs", "r")) == 2
    assert "overlaps the data this command reads" in one_error_line(capsys)


# --- silently wrong or misleading ------------------------------------------------------------------------------

def test_a_duplicate_key_in_a_recipe_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ntask: sst2\ntrain:\n  lora_r: 4\neval:\n  shots: 0\ntrain:\n  epochs: 2\n")
    assert main(["run", str(recipe), "--print-config"]) == 2
    line = one_error_line(capsys)
    assert "duplicate key 'train' (first at line 3)" in line and "line 7" in line


def test_a_duplicate_key_in_a_task_spec_is_refused(tmp_path, capsys):
    spec = tmp_path / "t.yaml"
    text = (ROOT / "src" / "tasktune" / "tasks" / "sst2.yaml").read_text()
    spec.write_text(text + "\nheadline: f1\n")
    assert main(["run", "sst2-gemma3-270m-cpu", f"task={spec}", "--print-config"]) == 2
    assert "duplicate key 'headline'" in one_error_line(capsys)


def test_a_stray_quote_in_a_csv_is_an_error_naming_the_lines(tmp_path):
    from tasktune.errors import TasktuneError
    from tasktune.tasks import get_task

    rows = [f"a fine film number {i},1" for i in range(20)]
    rows[5] = '"a stray quote that opens a field,0'
    rows[12] = 'and closes here later",1'
    path = tmp_path / "data.csv"
    path.write_text("sentence,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(TasktuneError, match=r"data.csv, lines 7-14: one record runs over 8 lines"):
        get_task("sst2").load(str(path))
    rows[12] = 'and "closes" here later",1'  # the quote closes mid-field: malformed, and the lines are named
    path.write_text("sentence,label\n" + "\n".join(rows) + "\n")
    with pytest.raises(TasktuneError, match=r"data.csv, lines 7-14 \(a quote opened on line 7: a stray quote\?\)"):
        get_task("sst2").load(str(path))


def test_a_csv_quote_must_close_a_field(tmp_path):
    from tasktune.errors import TasktuneError
    from tasktune.tasks import get_task

    path = tmp_path / "data.csv"
    path.write_text('sentence,label\n"quoted"then more,1\nfine,0\n')
    with pytest.raises(TasktuneError, match=r"data.csv, line 2: not valid CSV"):
        get_task("sst2").load(str(path))


def test_a_duplicated_header_column_is_named(tmp_path):
    from tasktune.errors import TasktuneError
    from tasktune.tasks import get_task

    path = tmp_path / "data.tsv"
    path.write_text("sentence\tlabel\tlabel\ngood film\t1\t1\n")
    with pytest.raises(TasktuneError, match=r"header: column\(s\) \['label'\] appear more than once"):
        get_task("sst2").load(str(path))


def test_a_jsonl_text_that_is_a_number_says_so(tmp_path):
    from tasktune.errors import TasktuneError
    from tasktune.tasks import get_task

    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"sentence": "good", "label": 1}) + "\n" + json.dumps({"sentence": 42, "label": 0}))
    with pytest.raises(TasktuneError, match=r"a number \(42\), expected text"):
        get_task("sst2").load(str(path))


def test_a_symlink_loop_is_named_as_one(tmp_path, capsys):
    loop = tmp_path / "loop.tsv"
    loop.symlink_to(loop)
    assert main(["run", "sst2-gemma3-270m-cpu", f"data.path={loop}", f"output_dir={tmp_path / 'runs'}",
                 "train.max_steps=1", "model=/nonexistent-model-dir"]) == 2
    assert "is a symbolic link that loops" in one_error_line(capsys)


@pytest.mark.parametrize("override", ["data.path=", "data.path= ", "data.test_path="])
def test_an_empty_override_is_refused_not_taken_for_the_default(tmp_path, capsys, override):
    assert main(["run", "sst2-gemma3-270m-cpu", override, f"output_dir={tmp_path}", "--print-config"]) == 2
    line = one_error_line(capsys)
    assert "has no value" in line and f"{override.split('=')[0]}=null" in line


def test_an_empty_data_path_in_a_recipe_file_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\ntask: sst2\ndata:\n  path: ''\n")
    assert main(["run", str(recipe), "--print-config"]) == 2
    assert "data.path is empty" in one_error_line(capsys)


def test_a_bad_value_names_its_key(tmp_path, capsys):
    assert main(["run", "sst2-gemma3-270m-cpu", "eval.batch_size=0", f"output_dir={tmp_path}", "--print-config"]) == 2
    assert "eval.batch_size must be > 0" in one_error_line(capsys)


def test_duplicate_prediction_ids_are_refused(tmp_path, capsys):
    from tiny import write_squad_json

    data = write_squad_json(tmp_path / "dev.json")
    preds = tmp_path / "preds.json"
    preds.write_text('{"a0-q1": "Paris", "a0-q1": "London"}')
    assert main(score_args(data, preds, tmp_path / "out")) == 2
    assert "id 'a0-q1': given twice" in one_error_line(capsys)


def test_compare_states_each_test_set_and_warns_when_they_differ(finished, tiny_llama, tmp_path, capsys):
    run, data = finished
    other_data = write_sst2_tsv(tmp_path / "other.tsv", seed=5)
    assert main(run_args(tiny_llama, other_data, tmp_path / "runs", "other")) == 0
    capsys.readouterr()
    assert main(["compare", str(run), str(run), "--out", str(tmp_path / "same")]) == 0
    same = (tmp_path / "same" / "compare.md").read_text()
    assert "Warning" not in same and "| test_set |" in same and "finetuned_n" in same and "_ci95" in same
    capsys.readouterr()
    assert main(["compare", str(run), str(tmp_path / "runs" / "other"), "--out", str(tmp_path / "differ")]) == 0
    assert "different test sets" in capsys.readouterr().err
    assert "**Warning: these runs were tested on 2 different test sets" in (tmp_path / "differ" / "compare.md").read_text()


def test_a_lost_ownership_key_says_what_happened_and_makes_no_new_key(a_run, tmp_path, monkeypatch, capsys):
    from tasktune import ownership

    key = ownership.key_path()
    saved = key.read_bytes()
    key.unlink()
    try:
        assert main(["report", str(a_run)]) == 2
        line = one_error_line(capsys)
        assert "ownership key" in line and "is missing" in line and "restore that key file" in line
        assert not key.exists()  # verifying never makes a key
    finally:
        key.write_bytes(saved)
    assert main(["report", str(a_run)]) == 0  # the restored key proves it again


def test_a_replaced_key_says_it_is_younger_than_the_signature(a_run, capsys):
    from tasktune import ownership

    key = ownership.key_path()
    saved = key.read_bytes()
    marker = a_run / ownership.MARKER
    os.utime(marker, (marker.stat().st_atime, marker.stat().st_mtime - 3600))
    key.write_text(os.urandom(32).hex())
    try:
        assert main(["report", str(a_run)]) == 2
        line = one_error_line(capsys)
        assert "after this was signed" in line and "restore the earlier key file" in line
    finally:
        key.write_bytes(saved)


# --- noise ------------------------------------------------------------------------------------------------------

def test_bitsandbytes_kernel_hub_warnings_do_not_reach_the_user():
    """bitsandbytes' import-time warning (its hub kernel, offline) would precede every one-line refusal."""
    code = ("import logging, tasktune.cli as cli; "
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU gemm_4bit_forward from "
            "kernels-community'); import sys; sys.exit(cli.main(['run', 'no-such-recipe']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == error_lines(done.stderr), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- unfinished directories --------------------------------------------------------------------------------------

def interrupted_run(tiny_llama, tmp_path, monkeypatch) -> tuple[list[str], Path]:
    """A run killed after its zero-shot stage: its unfinished directory stays, to be resumed."""
    from tasktune import pipeline

    data = write_sst2_tsv(tmp_path / "train.tsv")
    args = run_args(tiny_llama, data, tmp_path / "runs", "r")

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "train_stage", killed)
        assert main(args) != 0
    partial = tmp_path / "runs" / ".r.partial"
    assert partial.is_dir()
    return args, partial


def test_overwrite_never_deletes_what_a_user_put_in_an_unfinished_run(tiny_llama, tmp_path, monkeypatch, capsys):
    args, partial = interrupted_run(tiny_llama, tmp_path, monkeypatch)
    (partial / "notes.md").write_text("why this run matters")
    (partial / "mine").mkdir()
    (partial / "mine" / "data.csv").write_text("a,b\n")
    capsys.readouterr()
    assert main([*args, "train.lora_r=4", "--overwrite"]) == 2  # another recipe: the unfinished one would go
    line = one_error_line(capsys)
    assert "tasktune did not write" in line and "mine" in line and "notes.md" in line
    assert (partial / "notes.md").read_text() == "why this run matters" and (partial / "mine" / "data.csv").is_file()


def test_a_users_file_in_an_unfinished_run_is_not_sealed_as_tasktunes(tiny_llama, tmp_path, monkeypatch, capsys):
    from tasktune.ownership import read_marker

    args, partial = interrupted_run(tiny_llama, tmp_path, monkeypatch)
    (partial / "notes.md").write_text("mine")
    assert main(args) == 0  # the plain resume finishes the run
    final = tmp_path / "runs" / "r"
    marker, _ = read_marker(final)
    assert "notes.md" not in marker["files"] and "report.md" in marker["files"]
    capsys.readouterr()
    assert main([*args, "train.lora_r=4", "--overwrite"]) == 2
    assert "notes.md" in one_error_line(capsys)
    assert (final / "notes.md").read_text() == "mine"


def test_every_file_a_finished_run_holds_is_in_its_layout(finished):
    """The ownership layout of a run is RunLayout's, and covers every top-level path a real run wrote."""
    from tasktune.ownership import LAYOUTS, MARKER

    written = {p.name for p in finished[0].iterdir()} - {MARKER}
    assert {"report.json", "adapter", "zeroshot", "finetuned", "train"} <= written
    assert written <= LAYOUTS["run"], written - LAYOUTS["run"]


# --- sweeps -------------------------------------------------------------------------------------------------------

def interrupted_sweep(tiny_llama, tmp_path, monkeypatch, data=None):
    """A 2-trial sweep whose trials finished but whose final test never ran (killed there)."""
    from tasktune import sweeper
    from test_sweep import write_sweep

    data = data or write_sst2_tsv(tmp_path / "train.tsv", n=120)
    spec = write_sweep(tmp_path, tiny_llama, data, trials=2, pruner="none", sampler="grid",
                       space={"train.lora_r": {"type": "categorical", "choices": [4, 8]}})

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(sweeper, "final_test", killed)
        assert main(["sweep", str(spec)]) != 0
    folder = tmp_path / "sweeps" / "tiny"
    assert (folder / "trials" / "1").is_dir() and not (folder / "sweep.json").exists()
    return spec, folder, data


def test_overwrite_never_deletes_what_a_user_put_in_an_unfinished_sweep(tiny_llama, tmp_path, monkeypatch, capsys):
    spec, folder, _ = interrupted_sweep(tiny_llama, tmp_path, monkeypatch)
    (folder / "notes.md").write_text("trial 1 looked odd")
    (folder / "trials" / "0" / "plot.png").write_bytes(b"mine")
    capsys.readouterr()
    assert main(["sweep", str(spec), "trials=3", "--overwrite"]) == 2
    line = one_error_line(capsys)
    assert "notes.md" in line and "trials/0/plot.png" in line
    assert (folder / "notes.md").is_file() and (folder / "trials" / "0" / "plot.png").is_file()


def test_a_sweep_is_not_continued_on_changed_data(tiny_llama, tmp_path, monkeypatch, capsys):
    spec, folder, data = interrupted_sweep(tiny_llama, tmp_path, monkeypatch)
    data.write_text(data.read_text().replace("\t1\n", "\t0\n", 3))
    capsys.readouterr()
    assert main(["sweep", str(spec)]) == 2
    line = one_error_line(capsys)
    assert "different data" in line and "trained on the earlier one" in line
    assert not (folder / "sweep.json").exists()


def test_a_retried_trial_keeps_its_identity(tmp_path):
    """Trial 0 (the base recipe) killed: its retry is the same trial (number, directory, base), so the sweep
    still compares the winner with the base and finds the retry's files."""
    import optuna

    from tasktune import sweep_study

    study = optuna.create_study(direction="maximize")
    study.enqueue_trial({"train.lora_r": 16}, user_attrs={"base": True, "base_values": {"train.learning_rate": 1e-3}})
    trial = study.ask()
    for key, value in {"identity": trial.number, "trial_dir": str(tmp_path / "trials" / "0"), "host": sweep_study.socket.gethostname(),
                       "pid": 2**22 + 7, "process": "gone"}.items():
        trial.set_user_attr(key, value)
    sweep_study.fail_dead_local_trials(study)
    retry = study.ask()
    assert retry.number == 1
    assert sweep_study.identity_of(retry) == 0 and retry.user_attrs["base"] is True
    assert retry.user_attrs["base_values"] == {"train.learning_rate": 1e-3}
    assert retry.user_attrs["trial_dir"] == str(tmp_path / "trials" / "0") and retry.user_attrs["retry_of"] == 0
    study.tell(retry, 0.5)
    board = sweep_study.leaderboard(study)
    assert [(r["trial"], r["base"]) for r in board] == [(0, True)]


def test_a_reused_pid_is_not_taken_for_the_trial_that_died():
    from tasktune.sweep_study import is_alive, process_identity

    me = os.getpid()
    assert is_alive(me, process_identity(me))
    boot, pid, start = process_identity(me).split(":")
    assert not is_alive(me, f"{boot}:{pid}:{int(start) + 1}")  # same pid, another process
    assert not is_alive(2**22 + 7, None)


def test_the_main_process_says_which_trials_it_waits_for(monkeypatch, capsys):
    import optuna

    from tasktune import sweep_study

    study = optuna.create_study()
    trial = study.ask()
    trial.set_user_attr("host", "another-host")
    trial.set_user_attr("pid", 12)
    polls = []

    def finish_after_two_polls(seconds):
        polls.append(seconds)
        if len(polls) == 2:
            study.tell(trial, 1.0)

    monkeypatch.setattr(sweep_study.time, "sleep", finish_after_two_polls)
    sweep_study.wait_for_workers(study)
    out = capsys.readouterr().out
    assert "waiting for trial(s) still running in other processes: 0 (host another-host, pid 12)" in out


# --- crashes ------------------------------------------------------------------------------------------------------

def test_a_prompt_longer_than_the_model_reads_is_one_line_and_leaves_no_run(tiny_llama, tmp_path, capsys):
    """A 50,000-character row on a 512-position model: refused before the run directory exists (it was an
    IndexError traceback with a .partial left behind)."""
    data = write_sst2_tsv(tmp_path / "train.tsv")
    long = tmp_path / "test.tsv"
    long.write_text("sentence\tlabel\nbad film \t0\n" + " ".join(["good film"] * 5000) + " \t1\n")
    assert main(run_args(tiny_llama, data, tmp_path / "runs", "r", f"data.test_path={long}")) == 2
    line = one_error_line(capsys)
    assert "test.tsv, row 1:" in line and "the model reads at most 512" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_the_same_rule_holds_when_evaluating_other_data(finished, tmp_path, capsys):
    run, _ = finished
    long = tmp_path / "long.tsv"
    long.write_text("sentence\tlabel\n" + " ".join(["good film"] * 5000) + " \t1\nbad film \t0\n")
    assert main(["eval", "--run", str(run), "--data", str(long), "--out", str(tmp_path / "out")]) == 2
    assert "the model reads at most 512" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_train_max_length_beyond_the_model_is_refused(tiny_llama, tmp_path, capsys):
    data = write_sst2_tsv(tmp_path / "train.tsv")
    assert main(run_args(tiny_llama, data, tmp_path / "runs", "r", "train.max_length=1024")) == 2
    assert "train.max_length=1024 is more than the 512 positions" in one_error_line(capsys)
