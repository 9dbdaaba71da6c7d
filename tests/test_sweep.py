"""`tasktune sweep`: a tiny-model search that chooses on validation, reads the test set once per reported model,
resumes after a kill to the same leaderboard, and shares one study between worker processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasktune.cli import main

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def write_sweep(folder: Path, model: Path, data: Path, **extra) -> Path:
    spec = {
        "name": "tiny", "recipe": "sst2-gemma3-270m-cpu", "output_dir": str(folder / "sweeps"),
        "overrides": {"model": str(model), "data.path": str(data), "dtype": "fp32", "data.val_size": 16,
                      "eval.controls": [], "eval.perplexity": None, "train.compile": False,
                      "data.limit_train": None, "data.train_sentences": None, "data.limit_validation": None,
                      "data.limit_test": None, "eval.limit_generate": None,
                      "eval.protocols": ["score"], "train.max_steps": 12, "train.eval_steps": 4,
                      "train.batch_size": 4, "train.lora_dropout": 0.1},
        "space": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
                  "train.lora_r": {"type": "categorical", "choices": [4, 8]}},
        "sampler": "tpe", "trials": 6, "pruner": "median", "seed": 0, **extra}
    path = folder / "tiny-sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture
def sweep_inputs(tiny_llama, tmp_path):
    from tiny import write_sst2_tsv

    return tiny_llama, write_sst2_tsv(tmp_path / "train.tsv", n=120)


def rows_of(sweep_dir: Path) -> list[tuple]:
    """The leaderboard as what was tried and what it scored (trial numbers and wall times aside)."""
    board = json.loads((sweep_dir / "leaderboard.json").read_text())
    return sorted((json.dumps(r["params"], sort_keys=True), r["validation"]["value"], r["pruned"], r["steps"])
                  for r in board)


def test_a_sweep_chooses_on_validation_and_reads_the_test_set_once_per_reported_model(sweep_inputs, tmp_path,
                                                                                       monkeypatch):
    from tasktune import sweep_final

    model, data = sweep_inputs
    reads = []
    real = sweep_final.evaluate_test

    def counted(p, m, out_dir, head="causal_lm"):
        reads.append(out_dir.name)
        return real(p, m, out_dir, head)

    monkeypatch.setattr(sweep_final, "evaluate_test", counted)
    assert main(["sweep", str(write_sweep(tmp_path, model, data))]) == 0
    folder = tmp_path / "sweeps" / "tiny"
    result = json.loads((folder / "sweep.json").read_text())
    board = json.loads((folder / "leaderboard.json").read_text())
    assert len(board) == 6 and result["trials"] == 6
    assert sorted(reads) == sorted(["zeroshot", "winner"] + (["base"] if result["base"]["trial"] !=
                                                            result["winner"]["trial"] else []))
    assert reads.count("winner") == 1 and reads.count("base") <= 1  # fine-tuned models on test: winner and base
    assert board[0]["trial"] == result["winner"]["trial"]
    finished = [r for r in board if not r["pruned"]]
    assert result["winner"]["validation"]["value"] == max(r["validation"]["value"] for r in finished)
    assert result["base"]["base"] and result["base"]["params"]["train.lora_r"] == 16  # the base recipe itself
    assert (folder / "trials" / "0" / "adapter" / "adapter_config.json").is_file()
    assert not (folder / "trials" / "0" / "finetuned").exists()  # trials have no test stage
    assert result["test"]["winner"]["n"] == result["test_rows"] > 0
    assert "winner_vs_zeroshot" in result["paired"]
    report = (folder / "report.md").read_text()
    assert "Selection rule" in report and "Leaderboard" in report and (folder / "report.html").stat().st_size > 1000
    assert main(["sweep", str(write_sweep(tmp_path, model, data))]) == 0  # finished: nothing redone
    assert json.loads((folder / "sweep.json").read_text()) == result


def test_the_trained_base_model_is_left_clean_between_trials(sweep_inputs, tmp_path):
    """Every trial wraps the one loaded model; a fresh adapter each time, and the base weights unchanged."""
    from safetensors.torch import load_file

    model, data = sweep_inputs
    assert main(["sweep", str(write_sweep(tmp_path, model, data, trials=2, pruner="none",
                                          space={"train.lora_r": {"type": "categorical", "choices": [4, 8]}}))]) == 0
    folder = tmp_path / "sweeps" / "tiny"
    board = json.loads((folder / "leaderboard.json").read_text())
    by_r = {r["params"]["train.lora_r"]: r for r in board}
    # Trial 0 is the base recipe (r=16); trial 1 drew r=4 or 8 and trained on the same base.
    assert 16 in by_r and len(by_r) == 2
    zero = load_file(folder / "trials" / "0" / "adapter" / "adapter_model.safetensors")
    assert any(v.shape[0] == 16 or v.shape[1] == 16 for v in zero.values())


def test_methods_with_a_base_of_their_own_compete_in_a_sweep(sweep_inputs, tmp_path, monkeypatch):
    """full, PiSSA and QLoRA load their own base per trial; the one shared base stays bit-identical through
    them (PiSSA rewrites its base, full trains every weight), and the winner and the base recipe are tested."""
    from tasktune.lora_delta import tensor_hash
    from tasktune.sweep_trials import Trials

    model, data = sweep_inputs
    hashes = []
    real = Trials.run

    def watched(self, trial):
        def state():
            return {k: tensor_hash(v) for k, v in self.base.lm.model.state_dict().items()}

        hashes.append(state())
        try:
            return real(self, trial)
        finally:
            hashes.append(state())

    monkeypatch.setattr(Trials, "run", watched)
    spec = write_sweep(tmp_path, model, data, trials=5, pruner="none", sampler="grid",
                       space={"train.method": {"type": "categorical", "choices": ["lora", "full", "pissa", "qlora"]}})
    assert main(["sweep", str(spec)]) == 0
    folder = tmp_path / "sweeps" / "tiny"
    board = json.loads((folder / "leaderboard.json").read_text())
    assert sorted(r["params"]["train.method"] for r in board) == ["full", "lora", "lora", "pissa", "qlora"]
    assert all(not r["pruned"] and r["validation"]["value"] is not None for r in board)
    assert len(hashes) == 10 and all(h == hashes[0] for h in hashes)
    result = json.loads((folder / "sweep.json").read_text())
    assert result["test"]["winner"]["n"] == result["test_rows"] > 0


def test_a_trial_figure_is_its_best_checkpoint_validation_pass(sweep_inputs, tmp_path, monkeypatch):
    """A trial's figure is the best checkpoint's own validation pass, equal to a fresh pass over the trained
    model; a second pass runs only where the evaluated model is not the one validated in training (full: cast
    to the run's dtype; PiSSA, QLoRA: evaluated as saved)."""
    from tasktune import sweep_trials

    model, data = sweep_inputs
    real_figure, real_release = sweep_trials.validate_stage, sweep_trials.release_base
    second_passes, fresh = [], []

    def counted(p, m, head):
        second_passes.append(p.recipe.train.method)
        return real_figure(p, m, head)

    def release(p, m):  # the trained model, before the trial lets go of it: one pass more, for the comparison
        fresh.append(real_figure(p, m, "causal_lm"))
        return real_release(p, m)

    monkeypatch.setattr(sweep_trials, "validate_stage", counted)
    monkeypatch.setattr(sweep_trials, "release_base", release)
    spec = write_sweep(tmp_path, model, data, trials=5, pruner="none", sampler="grid",
                       space={"train.method": {"type": "categorical", "choices": ["lora", "full", "pissa", "qlora"]}})
    body = yaml.safe_load(spec.read_text())
    body["overrides"].update({"train.max_steps": 16, "train.learning_rate": 3e-3})  # 4 validations per trial
    spec.write_text(yaml.safe_dump(body, sort_keys=False))
    assert main(["sweep", str(spec)]) == 0
    folder = tmp_path / "sweeps" / "tiny"
    records = [json.loads((folder / "trials" / str(n) / "trial.json").read_text()) for n in range(5)]
    assert [r["validation"] for r in records] == fresh
    assert sorted(second_passes) == ["full", "pissa", "qlora"]
    summaries = [json.loads((folder / "trials" / str(n) / "train" / "summary.json").read_text()) for n in range(5)]
    reused = [s for s, r in zip(summaries, records) if r["params"]["train.method"] == "lora"]
    assert len(reused) == 2 and all(s["best_validation"] == r["validation"] for s, r in zip(summaries, records)
                                    if r["params"]["train.method"] == "lora")


def test_a_killed_sweep_resumes_to_the_same_leaderboard(sweep_inputs, tmp_path):
    model, data = sweep_inputs
    reference = tmp_path / "ref"
    reference.mkdir()
    assert main(["sweep", str(write_sweep(reference, model, data))]) == 0
    killed = tmp_path / "killed"
    killed.mkdir()
    spec = write_sweep(killed, model, data)
    proc = subprocess.Popen([sys.executable, "-m", "tasktune", "sweep", str(spec)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / "sweeps" / "tiny" / "trials" / "3" / "train" / "checkpoints" / "checkpoint-4"
    deadline = time.time() + 240
    while not (checkpoint / "tasktune_complete.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the sweep finished before the kill")
    assert not (killed / "sweeps" / "tiny" / "sweep.json").exists()
    assert main(["sweep", str(spec)]) == 0  # the same command continues it
    assert rows_of(killed / "sweeps" / "tiny") == rows_of(reference / "sweeps" / "tiny")
    board = json.loads((killed / "sweeps" / "tiny" / "leaderboard.json").read_text())
    assert any(r["retry_of"] == 3 for r in board), "the interrupted trial is retried, not lost"


def test_two_workers_share_one_study_without_running_a_trial_twice(sweep_inputs, tmp_path):
    model, data = sweep_inputs
    spec = write_sweep(tmp_path, model, data, pruner="none", trials=8)
    overrides = yaml.safe_load(spec.read_text())
    overrides["overrides"]["train.max_steps"] = 60  # trials long enough for the second process to join
    spec.write_text(yaml.safe_dump(overrides, sort_keys=False))
    folder = tmp_path / "sweeps" / "tiny"
    main_proc = subprocess.Popen([sys.executable, "-m", "tasktune", "sweep", str(spec)], env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (folder / "study.db").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the study exists once the file does and the main process has created it
    worker = subprocess.run([sys.executable, "-m", "tasktune", "sweep", "--worker", str(folder)], env=ENV,
                            capture_output=True, text=True, timeout=600)
    _, err = main_proc.communicate(timeout=600)
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert main_proc.returncode == 0, err[-2000:]
    import optuna

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder / 'study.db'}")
    done = [t for t in study.trials if t.state.is_finished() and t.state.name in ("COMPLETE", "PRUNED")]
    # Optuna's trial budget is checked as each trial ends: with two processes it can overshoot by one.
    assert 8 <= len(done) <= 9
    pids = {t.user_attrs["pid"] for t in done}
    assert len(pids) == 2, "both processes ran trials"
    dirs = [t.user_attrs["trial_dir"] for t in done]
    assert len(set(dirs)) == len(dirs)  # no trial ran twice
    assert all(json.loads((Path(d) / "trial.json").read_text())["trial"] == int(Path(d).name) for d in dirs)


@pytest.mark.parametrize("edit, message", [
    ({"space": {"data.seed": {"type": "int", "low": 1, "high": 3}}}, "data.seed cannot vary between trials"),
    ({"space": {"data.limit_validation": {"type": "categorical", "choices": [8, 16]}}},
     "data.limit_validation cannot vary between trials"),
    ({"space": {"data.train_sentences": {"type": "categorical", "choices": [0.5, 2.0]}}},
     "train_sentences must be in [0, 1], got 2.0"),
    ({"space": {"train.learning_rate": {"type": "float", "low": 1e-3, "high": 1e-4}}}, "expected low < high"),
    ({"space": {"train.lora_r": {"type": "categorical", "choices": []}}}, "choices must be a non-empty list"),
    ({"space": {"train.nonsense": {"type": "int", "low": 1, "high": 3}}}, "unknown key(s) ['train.nonsense']"),
    ({"space": {"train.lora_r": {"type": "int", "low": 0, "high": 8}}}, "lora_r must be > 0"),
    ({"sampler": "bayes"}, "sampler 'bayes' is not one of"),
    ({"trials": 0}, "trials must be >= 1"),
    ({"budget": 3}, "unknown key(s) ['budget']"),
    ({"constraint": "accuracy >= 0.9"}, "must read `perplexity_increase <= LIMIT`"),
])
def test_bad_sweep_files_are_one_line_before_anything_loads(sweep_inputs, tmp_path, capsys, edit, message):
    model, data = sweep_inputs
    spec = write_sweep(tmp_path, model, data, **edit)
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(spec) in err and err.count("\n") == 1, err
    assert not (tmp_path / "sweeps").exists()


def test_a_sweep_refuses_a_base_recipe_that_ships_gguf(sweep_inputs, tmp_path, capsys):
    """export.gguf is the run's last stage; a sweep runs no such stage, so it says so rather than ignore it."""
    pytest.importorskip("llama_cpp")
    model, data = sweep_inputs
    spec = write_sweep(tmp_path, model, data)
    edited = yaml.safe_load(spec.read_text())
    edited["overrides"].update({"model": str(tmp_path / "base.gguf"), "export.gguf": ["q8_0"]})
    spec.write_text(yaml.safe_dump(edited))
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "export.gguf is a run's last stage, which a sweep does not run" in err and err.count("\n") == 1, err
    assert not (tmp_path / "sweeps").exists()


def test_shipped_sweeps_are_valid_and_copy_like_recipes(tmp_path, capsys):
    from tasktune import recipes
    from tasktune.sweep_spec import load_sweep

    names = recipes.shipped_sweeps()
    assert {"sst2-gemma3-270m-cpu", "squad2-gemma3-270m-cpu"} <= set(names)
    for name in names:
        spec = load_sweep(name)
        assert spec.space and spec.trials >= 1
    assert main(["sweeps", "cp", "sst2-gemma3-270m-cpu", str(tmp_path / "mine.yaml")]) == 0
    assert main(["sweeps", "cp", "sst2-gemma3-270m-cpu", str(tmp_path / "mine.yaml")]) == 2  # never replaces


POSTGRES = os.environ.get("TASKTUNE_TEST_POSTGRES")


@pytest.mark.skipif(not POSTGRES, reason="no PostgreSQL server: .ci/run starts one from Debian's packages and sets "
                                         "TASKTUNE_TEST_POSTGRES")
def test_a_sweep_on_a_real_postgresql_server(sweep_inputs, tmp_path):
    import optuna

    model, data = sweep_inputs
    name = f"tiny-pg-{os.getpid()}-{int(time.time())}"
    spec = write_sweep(tmp_path, model, data, name=name, trials=3, storage=POSTGRES, pruner="none")
    assert main(["sweep", str(spec)]) == 0
    study = optuna.load_study(study_name=name, storage=POSTGRES)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 3
    assert not (tmp_path / "sweeps" / name / "study.db").exists()  # the study lives in the server


def test_the_python_api_runs_a_sweep(sweep_inputs, tmp_path):
    import tasktune

    model, data = sweep_inputs
    result = tasktune.sweep(str(write_sweep(tmp_path, model, data, trials=2, pruner="none")))
    assert result["trials"] == 2 and result.leaderboard[0]["trial"] == result["winner"]["trial"]
    assert result.path == tmp_path / "sweeps" / "tiny"


def test_prompting_competes_with_fine_tuning_in_one_table(sweep_inputs, tmp_path):
    """train.method=none: the base model with eval.shots examples, ranked on the same validation slice."""
    model, data = sweep_inputs
    spec = write_sweep(tmp_path, model, data, trials=5, pruner="none", sampler="grid",
                       space={"train.method": {"type": "categorical", "choices": ["lora", "none"]},
                              "eval.shots": {"type": "categorical", "choices": [0, 2]}})
    assert main(["sweep", str(spec)]) == 0
    board = json.loads((tmp_path / "sweeps" / "tiny" / "leaderboard.json").read_text())
    prompting = [r for r in board if r["params"].get("train.method") == "none"]
    assert prompting and all(r["steps"] == 0 and r["validation"]["value"] is not None for r in prompting)
    assert not any((tmp_path / "sweeps" / "tiny" / "trials" / str(r["trial"]) / "adapter").exists()
                   for r in prompting)


def test_method_none_is_refused_outside_a_sweep(sweep_inputs, tmp_path, capsys):
    model, data = sweep_inputs
    args = ["run", "sst2-gemma3-270m-cpu", "eval.controls=[]", "eval.perplexity=null", f"model={model}", f"data.path={data}", f"output_dir={tmp_path}",
            "train.method=none", "dtype=fp32"]
    assert main(args) == 2
    assert "trains nothing: it is for sweeps" in capsys.readouterr().err


def test_a_cost_constraint_chooses_the_best_trial_within_it(sweep_inputs, tmp_path, monkeypatch):
    """`constraint: perplexity_increase <= 5%`: every finished trial's perplexity on held-out text is measured
    against the base model (paired, with its interval), trials over the limit rank below those within it, the
    winner is the best within it, and the Pareto front is reported. The measurement is real; to make the
    constraint bite whatever the tiny model learns, every trial but the base recipe's is then put over it."""
    from tasktune.sweep_trials import Trials

    measured = []
    real = Trials.perplexity_increase

    def over_unless_base(self, p, model, head):
        change = real(self, p, model, head)
        measured.append(change)
        is_base = p.recipe.train.learning_rate == self.base.recipe.train.learning_rate
        return {**change, "relative_change": 0.0 if is_base else 0.5}

    monkeypatch.setattr(Trials, "perplexity_increase", over_unless_base)
    model, data = sweep_inputs
    spec = write_sweep(tmp_path, model, data, trials=4, pruner="none", constraint="perplexity_increase <= 5%")
    assert main(["sweep", str(spec)]) == 0
    folder = tmp_path / "sweeps" / "tiny"
    result = json.loads((folder / "sweep.json").read_text())
    board = json.loads((folder / "leaderboard.json").read_text())
    assert len(measured) == 4 and all(m["n"] > 0 and m["interval"][0] <= m["relative_change"] <= m["interval"][1]
                                      for m in measured)
    assert [r["feasible"] for r in board] == [True, False, False, False] and board[0]["base"]
    assert result["winner"]["trial"] == board[0]["trial"] and result["constraint"] == "perplexity_increase <= 5%"
    best_overall = max(board, key=lambda r: r["validation"]["value"])
    assert best_overall["trial"] in result["pareto_front"] and board[0]["trial"] in result["pareto_front"]
    report = (folder / "report.md").read_text()
    assert "perplexity increase [95%]" in report and "over the limit" in report and "Pareto front" in report
    assert "among trials with perplexity_increase <= 5%" in result["selection"]
