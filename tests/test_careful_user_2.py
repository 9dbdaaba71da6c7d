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
from test_careful_user import error_lines, one_error_line, score_args, snapshot
from tiny import run_args, write_sst2_tsv

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def finished_run(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("finished2")
    data = write_sst2_tsv(root / "train.tsv")
    assert main(run_args(tiny_llama, data, root / "runs", "base")) == 0
    return root / "runs" / "base", data


@pytest.fixture
def a_run(finished_run, tmp_path):
    """A private copy of the finished run (these tests change it)."""
    copy = tmp_path / "runs" / "base"
    shutil.copytree(finished_run[0], copy, symlinks=True)
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


def test_compare_states_each_test_set_and_warns_when_they_differ(finished_run, tiny_llama, tmp_path, capsys):
    run, data = finished_run
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
