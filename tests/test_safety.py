"""Safe with people's files: outputs never replace what tasktune did not write; one process per run; a run is
resumed only from the same data and model; clear one-line errors for unfinished runs and out-of-memory."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tasktune.cli import main
from tiny import run_args
from tasktune.rundir import MARKER, RunLock, write_json

ROOT = Path(__file__).parents[1]


def eval_args(model, data, out, *extra):
    return ["eval", "--task", "sst2", "--model", str(model), "--data", str(data), "--limit", "8",
            "--protocol", "score", "--dtype", "fp32", "--out", str(out), *extra]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def user_dir(tmp_path):
    """A directory full of someone's work."""
    d = tmp_path / "results"
    (d / "sub").mkdir(parents=True)
    (d / "thesis.tex").write_text("years of work")
    (d / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return d


@pytest.mark.parametrize("overwrite", [False, True])
def test_eval_out_never_replaces_a_directory_tasktune_did_not_write(tiny_llama, sst2_tsv, user_dir, capsys,
                                                                    overwrite):
    before = snapshot(user_dir)
    extra = ["--overwrite"] if overwrite else []
    assert main(eval_args(tiny_llama, sst2_tsv, user_dir, *extra)) == 2
    err = capsys.readouterr().err
    assert str(user_dir) in err and err.count("\n") == 1
    assert ("not written by tasktune" in err) if overwrite else ("not empty" in err)
    assert snapshot(user_dir) == before
    assert sorted(p.name for p in user_dir.parent.iterdir()) == ["results", "train.tsv"]  # nothing half-written


@pytest.mark.parametrize("where", ["cwd", "parent", "home"])
def test_eval_out_refuses_the_working_directory_its_parents_and_home(tiny_llama, sst2_tsv, tmp_path, monkeypatch,
                                                                     capsys, where):
    work = tmp_path / "project" / "inner"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "project"))
    (tmp_path / "project" / MARKER).write_text("{}")  # even a marker does not make these replaceable
    (work / MARKER).write_text("{}")
    out = {"cwd": ".", "parent": "..", "home": str(tmp_path / "project")}[where]
    assert main(eval_args(tiny_llama, sst2_tsv, out, "--overwrite")) == 2
    assert "refusing" in capsys.readouterr().err
    assert (work / "notes.txt").read_text() == "keep me"


def test_eval_out_overwrite_replaces_only_its_own_output(tiny_llama, sst2_tsv, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(eval_args(tiny_llama, sst2_tsv, out)) == 0
    assert (out / MARKER).is_file() and (out / "metrics.json").is_file()
    assert main(eval_args(tiny_llama, sst2_tsv, out)) == 2  # exists: refused without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(eval_args(tiny_llama, sst2_tsv, out, "--overwrite")) == 0  # its own, unchanged: replaced
    assert json.loads((out / "metrics.json").read_text())["score"]["n"] == 8
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ev")]  # no leftovers, no lock file
    capsys.readouterr()
    (out / "metrics.json").write_text("edited by hand")  # now the user's: --overwrite refuses, naming it
    assert main(eval_args(tiny_llama, sst2_tsv, out, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "metrics.json (changed)" in err and err.count("\n") == 1
    assert (out / "metrics.json").read_text() == "edited by hand"


def test_eval_out_may_be_an_empty_existing_directory(tiny_llama, sst2_tsv, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(eval_args(tiny_llama, sst2_tsv, out)) == 0
    assert (out / "metrics.json").is_file()


def test_score_and_compare_follow_the_same_rule(shared_data, user_dir, capsys):
    dev = shared_data / "squad_v2" / "dev-v2.0.part.json"
    preds = user_dir.parent / "preds.json"
    preds.write_text("{}")
    before = snapshot(user_dir)
    assert main(["score", "--task", "squad_v2", "--data", str(dev), "--predictions", str(preds),
                 "--out", str(user_dir), "--overwrite"]) == 2
    assert main(["compare", str(user_dir), "--out", str(user_dir.parent / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "is not a finished tasktune run" in err
    assert snapshot(user_dir) == before


@pytest.mark.parametrize("command", ["report", "params", "export", "compare", "eval"])
def test_commands_on_a_directory_that_is_not_a_finished_run(tmp_path, capsys, command):
    unfinished = tmp_path / ".r.partial"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text("name: r\n")
    argv = {"report": ["report", str(tmp_path / "r")], "params": ["params", str(tmp_path / "r")],
            "export": ["export", str(tmp_path / "r"), "--out", str(tmp_path / "x")],
            "compare": ["compare", str(tmp_path / "r"), "--out", str(tmp_path / "c")],
            "eval": ["eval", "--run", str(tmp_path / "r"), "--out", str(tmp_path / "e")]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "re-run its command to resume" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.partial"]


def test_resume_refuses_changed_data(tiny_llama, sst2_tsv, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(run_args(tiny_llama, sst2_tsv, out)) == 0
    with sst2_tsv.open("a") as f:
        f.write("a late extra row \t1\n")
    assert main(run_args(tiny_llama, sst2_tsv, out)) == 2
    assert "made from different data" in capsys.readouterr().err
    # The same for an unfinished run.
    (out / "r").rename(out / ".r.partial")
    assert main(run_args(tiny_llama, sst2_tsv, out)) == 2
    assert "made from different data" in capsys.readouterr().err
    assert main(run_args(tiny_llama, sst2_tsv, out, "r", "--overwrite")) == 0
    assert not (out / ".r.partial").exists()


def test_resume_refuses_another_model(tiny_models, sst2_tsv, tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(run_args(tiny_models["llama"], sst2_tsv, out, "r", "train.max_steps=2")) == 0
    (out / "r").rename(out / ".r.partial")
    other = tmp_path / "llama-copy"
    import shutil

    shutil.copytree(tiny_models["llama"], other)
    assert main(run_args(other, sst2_tsv, out, "r", "train.max_steps=2")) == 2  # recipe differs (model path)
    # Same recipe text, different weights behind the same path:
    from tiny import make_tiny_model

    make_tiny_model(other, "llama", seed=1)
    (out / ".r.partial" / "recipe.yaml").write_text(
        (out / ".r.partial" / "recipe.yaml").read_text().replace(str(tiny_models["llama"]), str(other)))
    assert main(run_args(other, sst2_tsv, out, "r", "train.max_steps=2")) == 2
    assert "made from different model" in capsys.readouterr().err


def test_resume_flag_fails_when_there_is_nothing_to_resume(tiny_llama, sst2_tsv, tmp_path, capsys):
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "r", "--resume")) == 2
    assert "--resume: there is no unfinished run of this recipe to resume" in capsys.readouterr().err
    assert not (tmp_path / ".r.partial").exists() and not (tmp_path / "r").exists()


def test_second_process_on_the_same_run_is_refused(tiny_llama, sst2_tsv, tmp_path, capsys):
    lock = RunLock(tmp_path / "r")
    lock.acquire()
    try:
        assert main(run_args(tiny_llama, sst2_tsv, tmp_path)) == 2
        assert f"in use by another tasktune process (pid {os.getpid()})" in capsys.readouterr().err
    finally:
        lock.release()
    assert not (tmp_path / "r").exists() and not (tmp_path / ".r.partial").exists()


def test_a_killed_process_leaves_no_stale_lock(tmp_path):
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from tasktune.rundir import RunLock; "
            "RunLock(sys.argv[2]).acquire(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "src"), str(tmp_path / "r")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(Exception, match="in use by another tasktune process"):
        RunLock(tmp_path / "r").acquire()
    proc.kill()
    proc.wait()
    lock = RunLock(tmp_path / "r")
    lock.acquire()  # the kernel released the dead process's lock
    lock.release()


def test_concurrent_atomic_writes_never_collide(tmp_path):
    target = tmp_path / "stages.json"
    errors = []

    def writer(n):
        try:
            for i in range(200):
                write_json(target, {"writer": n, "i": i})
        except Exception as exc:  # a shared temp name makes os.replace fail here
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(target.read_text())["i"] == 199
    assert [p.name for p in tmp_path.iterdir()] == ["stages.json"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_a_failed_library_write_removes_only_its_own_temp_file(tmp_path, failure):
    """atomic.write_with (a library's save function into a temp file of ours): when the writer fails, the one
    file it deletes is the temp file mkstemp made for it. The file it was replacing, a look-alike temp file of
    someone else's and every other file stay byte for byte; a full disk names the target."""
    from tasktune.atomic import write_with

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"the previous weights")
    lookalike = tmp_path / ".model.safetensors.someone.tmp"  # the pattern our temp files have, not ours
    lookalike.write_bytes(b"not ours")
    other = tmp_path / "notes.txt"
    other.write_text("keep")
    made = []

    def failing_writer(tmp):
        made.append(Path(tmp))
        Path(tmp).write_bytes(b"half a file")
        raise failure

    with pytest.raises(type(failure)) as raised:
        write_with(target, failing_writer)
    if isinstance(failure, OSError):
        assert raised.value.filename == str(target)
    assert len(made) == 1 and made[0].parent == tmp_path and not made[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, lookalike.name, other.name])
    assert target.read_bytes() == b"the previous weights" and lookalike.read_bytes() == b"not ours"
    assert other.read_text() == "keep"
    write_with(target, lambda tmp: Path(tmp).write_bytes(b"new"))  # and a writer that succeeds replaces it
    assert target.read_bytes() == b"new" and lookalike.exists()


def test_out_of_memory_is_one_line_naming_the_batch_size(tiny_llama, sst2_tsv, tmp_path, monkeypatch, capsys):
    import tasktune.train as train

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(train, "objective_loss", no_memory)
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "r", "train.batch_size=4")) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if "tasktune: error:" in line]
    assert len(errors) == 1 and "out of memory" in errors[0] and "train.batch_size=4" in errors[0]
    assert "gradient_checkpointing" in errors[0]
    assert (tmp_path / ".r.partial" / "stages.json").is_file()  # kept, resumable
    monkeypatch.undo()
    assert main(run_args(tiny_llama, sst2_tsv, tmp_path, "r", "train.batch_size=4")) == 0


def test_remove_ours_deletes_only_marked_directories_outside_protected_places(user_dir, tmp_path, monkeypatch):
    """The one deletion of a named directory in tasktune (`rundir.remove_ours`) re-checks the marker itself."""
    from tasktune.errors import TasktuneError
    from tasktune.rundir import mark_as_ours, remove_ours

    before = snapshot(user_dir)
    with pytest.raises(TasktuneError, match="not written by tasktune"):
        remove_ours(user_dir)
    assert snapshot(user_dir) == before
    mark_as_ours(user_dir, "output")
    monkeypatch.chdir(user_dir)
    with pytest.raises(TasktuneError, match="working directory"):
        remove_ours(user_dir)  # even marked, never the working directory
    assert (user_dir / "thesis.tex").read_text() == "years of work"
    monkeypatch.chdir(tmp_path)
    ours = tmp_path / "ours"
    ours.mkdir()
    mark_as_ours(ours, "output")
    remove_ours(ours)
    assert not ours.exists()
