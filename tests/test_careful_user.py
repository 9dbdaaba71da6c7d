"""A careful user who makes mistakes: nothing they own is lost, no figure is silently wrong, every mistake is one
line (exit 2, naming the file or key). One test per case; docs/bad-inputs.md lists them."""

import json
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tasktune.cli import main
from tiny import run_args

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def error_lines(stderr: str) -> list[str]:
    """tasktune's own lines (a progress bar may have left the cursor mid-line before one)."""
    return [line[line.index("tasktune:"):] for line in stderr.splitlines() if "tasktune:" in line]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert err.rstrip("\n").endswith(lines[0]), f"the error must be one line, and the last: {err!r}"
    return lines[0]


def refused_before_the_model_loads(argv: list[str], where: str, expected: str, run_dir: Path, monkeypatch,
                                   capsys) -> None:
    """`tasktune ARGV` exits 2 with one line holding `where` and `expected`, loads no model, and leaves no
    `run_dir` behind."""
    from tasktune import stages

    monkeypatch.setattr(stages, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    capsys.readouterr()
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert where in line and expected in line, line
    assert not run_dir.exists()


@pytest.fixture(scope="module")
def finished(tiny_llama, tmp_path_factory):
    """One finished tiny run, shared by the tests that only read it (or copy it first)."""
    from tiny import write_sst2_tsv

    root = tmp_path_factory.mktemp("finished")
    data = write_sst2_tsv(root / "train.tsv")
    assert main(run_args(tiny_llama, data, root / "runs", "base")) == 0
    return root / "runs" / "base", data


@pytest.fixture
def squad_files(tmp_path):
    from tiny import write_squad_json

    data = write_squad_json(tmp_path / "dev.json")
    ids = [q["id"] for a in json.loads(data.read_text())["data"] for p in a["paragraphs"] for q in p["qas"]]
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps({i: "Paris" for i in ids}))
    return data, preds, ids


def score_args(data, preds, out, *extra):
    return ["score", "--task", "squad_v2", "--data", str(data), "--predictions", str(preds), "--out", str(out),
            *extra]


# --- 1. nothing a user owns is lost ------------------------------------------------------------------------------

def test_a_marker_file_anyone_can_make_does_not_make_a_directory_deletable(squad_files, tmp_path, capsys):
    data, preds, _ = squad_files
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.tex").write_text("work")
    (mine / "sub" / "data.csv").write_text("1")
    (mine / ".tasktune").write_text("notes")
    before = snapshot(mine)
    assert main(score_args(data, preds, mine, "--overwrite")) == 2
    assert "not written by tasktune" in one_error_line(capsys)
    assert snapshot(mine) == before


def test_a_forged_manifest_listing_the_users_files_is_refused(squad_files, tmp_path, capsys):
    """A manifest that lists the right sizes and hashes but is not signed with tasktune's key proves nothing."""
    from tasktune.ownership import MARKER, sha256_file

    data, preds, _ = squad_files
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("work")
    files = {"thesis.tex": {"bytes": 4, "sha256": sha256_file(mine / "thesis.tex")}}
    (mine / MARKER).write_text(json.dumps({"written_by": "tasktune", "kind": "output", "partial": False,
                                           "command": ["tasktune"], "files": files, "hmac": "0" * 64}))
    assert main(score_args(data, preds, mine, "--overwrite")) == 2
    assert "not signed by this tasktune" in one_error_line(capsys)
    assert (mine / "thesis.tex").read_text() == "work"


def test_a_file_the_user_added_to_tasktunes_output_is_kept(squad_files, tmp_path, capsys):
    data, preds, _ = squad_files
    out = tmp_path / "scored"
    assert main(score_args(data, preds, out)) == 0
    assert main(score_args(data, preds, out, "--overwrite")) == 0  # its own, unchanged: replaced
    (out / "my-notes.md").write_text("mine")
    capsys.readouterr()
    assert main(score_args(data, preds, out, "--overwrite")) == 2
    assert "my-notes.md" in one_error_line(capsys)
    assert (out / "my-notes.md").read_text() == "mine" and (out / "metrics.json").is_file()


@pytest.mark.parametrize("where", ["same", "inside"])
def test_eval_never_writes_into_the_run_it_evaluates(finished, tmp_path, capsys, where):
    run, _ = finished
    before = snapshot(run)
    out = run if where == "same" else run / "again"
    assert main(["eval", "--run", str(run), "--out", str(out), "--overwrite"]) == 2
    assert "overlaps the run" in one_error_line(capsys)
    assert snapshot(run) == before


def test_score_never_writes_into_the_folder_of_its_data(squad_files, capsys):
    data, preds, _ = squad_files
    before = snapshot(data.parent)
    assert main(score_args(data, preds, data.parent, "--overwrite")) == 2
    assert "overlaps the data" in one_error_line(capsys)
    assert snapshot(data.parent) == before


def test_recipe_reference_replaces_only_its_own_file_and_writes_mode_0644(tmp_path, capsys):
    target = tmp_path / "ref.md"
    target.write_text("my own notes")
    assert main(["recipe-reference", "--out", str(target)]) == 2
    assert "already exists" in one_error_line(capsys)
    assert main(["recipe-reference", "--out", str(target), "--overwrite"]) == 2
    assert "not written by tasktune" in one_error_line(capsys)
    assert target.read_text() == "my own notes"
    fresh = tmp_path / "fresh.md"
    old_mask = os.umask(0o022)
    try:
        assert main(["recipe-reference", "--out", str(fresh)]) == 0
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
    assert main(["recipe-reference", "--out", str(fresh), "--overwrite"]) == 0  # its own, unchanged
    fresh.write_text(fresh.read_text() + "\nmy addition\n")
    assert main(["recipe-reference", "--out", str(fresh), "--overwrite"]) == 2
    assert "my addition" in fresh.read_text()
    capsys.readouterr()
    assert main(["recipe-reference", "--out", str(tmp_path)]) == 2  # a directory
    assert "is a directory" in one_error_line(capsys)


def test_a_full_disk_never_truncates_a_finished_report(finished, tmp_path):
    import shutil

    run = tmp_path / "base"
    shutil.copytree(finished[0], run)
    html_before = (run / "report.html").read_bytes()
    assert len(html_before) > 20_000

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run([sys.executable, "-m", "tasktune", "report", str(run)], env=ENV, capture_output=True,
                          text=True, preexec_fn=small_files, timeout=300)
    assert proc.returncode == 3, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr and str(run) in lines[0], proc.stderr
    assert (run / "report.html").read_bytes() == html_before
    assert not [p for p in run.rglob("*.tmp")]


def test_two_commands_writing_one_out_directory_cannot_both_succeed(squad_files, tmp_path, capsys):
    from tasktune.rundir import RunLock

    data, preds, _ = squad_files
    out = tmp_path / "scored"
    holder = RunLock(out)
    holder.acquire()  # another tasktune process writing the same --out
    try:
        assert main(score_args(data, preds, out)) == 2
        assert "in use by another tasktune process" in one_error_line(capsys)
    finally:
        holder.release()
    assert not out.exists()
    assert main(score_args(data, preds, out)) == 0
    assert not (tmp_path / ".scored.lock").exists()  # the lock file goes with the lock


def test_overwrite_refuses_a_symlink_and_leaves_nothing_behind(squad_files, tmp_path, capsys):
    data, preds, _ = squad_files
    real = tmp_path / "real"
    assert main(score_args(data, preds, real)) == 0
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert main(score_args(data, preds, link, "--overwrite")) == 2
    assert "symbolic link" in one_error_line(capsys)
    assert link.is_symlink() and sorted(p.name for p in tmp_path.iterdir()) == before


# --- 2. no figure is silently wrong ------------------------------------------------------------------------------

def squad_variant(tmp_path, edit) -> Path:
    from tiny import squad_doc

    doc = squad_doc()
    edit(doc["data"][0]["paragraphs"][0])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["qas"][0].update(is_impossible="false"), "'is_impossible' must be a JSON boolean"),
    (lambda p: p["qas"][0]["answers"][0].update(answer_start="0"), "answer_start must be an integer"),
    (lambda p: p["qas"][1]["answers"][0].update(answer_start=35), "reads 'e Seine f', not the answer text"),
    (lambda p: p["qas"][1]["answers"][0].update(answer_start=9999), "outside the context"),
    (lambda p: p["qas"][0]["answers"][0].update(text=7), "'answers' must be a list of {text, answer_start}"),
    (lambda p: p["qas"][0]["answers"][0].pop("answer_start"), "'answers' must be a list of {text, answer_start}"),
    (lambda p: p["qas"][2].update(answers=[{"text": "Paris", "answer_start": 0}]), "is_impossible is true"),
])
def test_squad_types_and_offsets_are_checked(tmp_path, squad_files, capsys, edit, message):
    _, preds, _ = squad_files
    bad = squad_variant(tmp_path, edit)
    assert main(score_args(bad, preds, tmp_path / "out")) == 2
    line = one_error_line(capsys)
    assert message in line and str(bad) in line and "(id a0-q" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("row, message", [
    ({"is_impossible": "false", "answers": {"text": ["Paris"], "answer_start": [0]}}, "JSON boolean"),
    ({"answers": {"text": ["Paris"], "answer_start": [3]}}, "not the answer text"),
    ({"answers": {"text": ["Paris"], "answer_start": ["0"]}}, "must be an integer"),
    ({"answers": {"text": ["Paris", "France"], "answer_start": [0]}}, "2 answer text(s) but 1 answer_start"),
    ({"answers": [{"text": "France", "answer_start": 0}]}, "not the answer text"),
])
def test_squad_jsonl_and_hub_layout_are_checked_the_same_way(tmp_path, row, message):
    from tasktune.data.squad import load_jsonl
    from tasktune.errors import TasktuneError

    context = "Paris is the capital of France ."
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "q1", "title": "t", "context": context, "question": "what ?", **row}) + "\n")
    with pytest.raises(TasktuneError, match="line 1") as err:
        load_jsonl(path)
    assert message in str(err.value)


@pytest.mark.parametrize("na_value, threshold, message", [
    (float("nan"), "1.0", "expected a probability in [0, 1]"),
    (1.5, "1.0", "expected a probability in [0, 1]"),
    (-0.1, "1.0", "expected a probability in [0, 1]"),
    (0.5, "nan", "--threshold must be a finite number"),
])
def test_no_answer_probabilities_must_be_probabilities(squad_files, tmp_path, capsys, na_value, threshold, message):
    data, preds, ids = squad_files
    na = tmp_path / "na.json"
    na.write_text(json.dumps({i: (na_value if n == 0 else 0.1) for n, i in enumerate(ids)}))
    assert main(score_args(data, preds, tmp_path / "out", "--na-probs", str(na), "--threshold", threshold)) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_the_report_states_the_prompt_budget_the_run_used(tmp_path):
    import shutil

    from tasktune.report import task_of_run
    from tasktune.tasks.spec import shipped

    shutil.copyfile(shipped()["squad_v2"], tmp_path / "task.yaml")
    task = task_of_run(tmp_path, {"protocol": {}, "config": {"eval": {"max_prompt_tokens": 64}}})
    notes = " ".join(task.protocol_notes({}))
    assert "prompts ≤ 64 tokens" in notes and "384" not in notes


def test_a_reduced_validation_slice_is_said_and_an_impossible_length_refused(tiny_llama, sst2_tsv, tmp_path, capsys):
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "big", "data.val_size=100000", "train.max_steps=2")) == 0
    out = capsys.readouterr().out
    assert "data.val_size=100000 is more than half of the" in out and "using" in out
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "short", "train.max_length=1")) == 2
    assert "max_length must be >= 16" in one_error_line(capsys)


def test_a_changed_tokenizer_is_not_resumed(tiny_llama, sst2_tsv, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    out = tmp_path / "runs"
    assert main(run_args(model, sst2_tsv, out)) == 0
    (out / "r").rename(out / ".r.partial")  # as if killed before the end
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["good"], vocab["bad"] = vocab["bad"], vocab["good"]  # two token ids swapped
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    capsys.readouterr()
    assert main(run_args(model, sst2_tsv, out)) == 2
    assert "made from different model" in one_error_line(capsys)


def test_data_rows_are_escaped_in_report_md_and_html():
    from tasktune.html_page import inline
    from tasktune.report import _cell

    cell = _cell("<script>alert(1)</script> & co")
    assert "<script>" not in cell and "&lt;script&gt;" in cell
    assert inline(cell) == "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co"  # shown as text, escaped once


# --- 3. one line for every mistake ----------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=nan", "learning_rate must be a finite number"),
    ("train.target_modules=nonexistent_proj", "are not linear layers of this model"),
    ("data.test_size=0.001", "data.test_size: cannot split"),
])
def test_bad_recipe_values_fail_before_any_run_directory_exists(tiny_llama, sst2_tsv, tmp_path, capsys, override,
                                                                 message):
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path / "runs", "r", override)) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_output_dir_that_is_a_file(tiny_llama, sst2_tsv, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.write_text("a file")
    assert main(run_args(tiny_llama, sst2_tsv, runs)) == 2
    assert "output_dir" in one_error_line(capsys)
    assert runs.read_text() == "a file"


def test_an_output_place_that_cannot_be_written_is_one_line(squad_files, tmp_path, capsys, monkeypatch):
    """A read-only directory (simulated: as root, permissions do not stop writes)."""
    import errno
    import tempfile

    data, preds, _ = squad_files

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    assert main(score_args(data, preds, tmp_path / "ro" / "out")) == 2
    line = one_error_line(capsys)
    assert str(tmp_path / "ro") in line and "Permission denied" in line


def test_sigint_during_zero_shot_is_one_line_and_resumable(tiny_llama, tmp_path):
    """The signal is sent once the run says the zero-shot evaluation began (read from its unbuffered stdout),
    not after a fixed sleep: a fixed sleep landed in training on a faster machine."""
    from tiny import write_sst2_tsv

    # 2,000 rows: a test split of hundreds of examples, each scored and generated one at a time, so the
    # zero-shot stage lasts seconds on any machine, far longer than the signal takes to arrive.
    data = write_sst2_tsv(tmp_path / "train.tsv", n=2000)
    command = [sys.executable, "-m", "tasktune", *run_args(tiny_llama, data, tmp_path, "int", "eval.batch_size=1",
                                                           "eval.protocols=score,generate")]
    # SIGINT back to its default in the child: a test run started in the background by a shell without job
    # control inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler (seen: the run
    # finished with exit 0 under `nohup bash -c '... &'`).
    proc = subprocess.Popen(command, env={**ENV, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "zero-shot evaluation on" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=240)
    assert any("zero-shot evaluation on" in line for line in seen), "".join(seen) + err
    assert proc.returncode == 130 and "Traceback" not in err, err
    printed = "".join(seen) + out
    assert "zero-shot " not in printed.replace("zero-shot evaluation", ""), printed  # no zero-shot summary: cut
    assert [line for line in err.splitlines() if line.startswith("tasktune:")] == [
        "tasktune: interrupted (SIGINT) during `tasktune run`; finished stages are kept: run the same command again "
        "to resume"]
    assert (tmp_path / ".int.partial").is_dir() and not (tmp_path / ".int.lock").exists()


def small_files():
    """A full disk, as the child process sees it: writes past 60 kB fail with EFBIG (and SIGXFSZ for a compiler)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))


def test_a_full_disk_during_run_is_one_line_and_the_run_stays_resumable(tiny_llama, sst2_tsv, tmp_path):
    command = [sys.executable, "-m", "tasktune", *run_args(tiny_llama, sst2_tsv, tmp_path, "full")]
    proc = subprocess.run(command, env=ENV, capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert proc.returncode == 3, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "File too large" in lines[0] and "same command resumes it" in lines[0]
    assert (tmp_path / ".full.partial").is_dir()
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "full")) == 0  # without the limit it resumes


def test_a_full_disk_while_torch_compile_builds_kernels_is_one_line(tiny_llama, sst2_tsv, tmp_path):
    """train.compile: inductor's C++ compiler killed by the file-size limit is one line (exit 3), not
    torch's traceback, and the unfinished run is kept."""
    command = [sys.executable, "-m", "tasktune", *run_args(tiny_llama, sst2_tsv, tmp_path, "c", "train.compile=true")]
    env = {**ENV, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # a cached kernel would skip the compiler
    proc = subprocess.run(command, env=env, capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert proc.returncode == 3, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "torch.compile could not build" in lines[0] and "File size limit exceeded" in lines[0], lines[0]
    assert "same command resumes it" in lines[0] and (tmp_path / ".c.partial").is_dir()


@pytest.mark.parametrize("text, message", [
    ('a: &a ["x","x","x","x","x","x","x","x","x"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n'
     'c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n', "aliases (*name) are not allowed"),
    ("name: t\ntype: !!python/object/apply:os.system ['echo hi']\n", "could not determine a constructor"),
    ("name: t\ntemplate: '" + "x" * (1 << 21) + "'\n", "bytes; a task file is expected to be under"),
])
def test_hostile_task_specs_are_one_short_line(tmp_path, capsys, text, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    assert main(["run", "--task", str(spec), "--model", "gemma3-270m", "--print-config"]) == 2
    line = one_error_line(capsys)
    assert message in line and str(spec) in line and len(line) < 400


def test_verbalizers_that_tokenize_alike_name_the_spec(tiny_llama, sst2_tsv, tmp_path, capsys):
    from tasktune.tasks.spec import shipped

    spec = tmp_path / "alike.yaml"
    spec.write_text(shipped()["sst2"].read_text().replace('" negative"', '" zzzz"').replace('" positive"', '" yyyy"'))
    assert " zzzz" in spec.read_text()
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "alike", f"task={spec}")) == 2
    line = one_error_line(capsys)
    assert str(spec) in line and "tokenize to the same tokens" in line


def test_an_unknown_model_type_names_the_directory_and_remote_code(tiny_llama, sst2_tsv, tmp_path, capsys):
    import shutil

    model = tmp_path / "custom"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="my_custom_lm", auto_map={"AutoConfig": "custom.MyConfig"})
    (model / "config.json").write_text(json.dumps(config))
    assert main(["eval", "--task", "sst2", "--model", str(model), "--data", str(sst2_tsv), "--out",
                 str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert f"cannot load the model directory {model}" in line and "trust_remote_code" in line
    assert "not a local directory" not in line


def test_a_users_file_where_a_lock_would_go_is_never_truncated_or_deleted(squad_files, tmp_path, capsys):
    """The lock file is the one file tasktune deletes beside an output: only when it holds tasktune's pid."""
    data, preds, _ = squad_files
    mine = tmp_path / ".scored.lock"
    mine.write_text("my notes, not a pid")
    assert main(score_args(data, preds, tmp_path / "scored")) == 2
    assert "is not a tasktune lock file" in one_error_line(capsys)
    assert mine.read_text() == "my notes, not a pid" and not (tmp_path / "scored").exists()
    mine.unlink()
    (tmp_path / ".scored.lock").write_text("12345\n")  # a stale lock a killed tasktune left: reused, then removed
    assert main(score_args(data, preds, tmp_path / "scored")) == 0
    assert not (tmp_path / ".scored.lock").exists()


def test_sweep_overwrite_deletes_only_a_sweep_directory_tasktune_signed(tiny_llama, tmp_path, capsys):
    import yaml

    folder = tmp_path / "sweeps" / "tiny"
    folder.mkdir(parents=True)
    (folder / "results.csv").write_text("mine")
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "tiny", "recipe": "sst2-gemma3-270m-cpu",
                                    "output_dir": str(tmp_path / "sweeps"), "overrides": {"model": str(tiny_llama)},
                                    "space": {"train.lora_r": {"type": "categorical", "choices": [4, 8]}}}))
    assert main(["sweep", str(spec), "--overwrite"]) == 2
    assert "was not written by tasktune" in one_error_line(capsys)
    assert (folder / "results.csv").read_text() == "mine"
