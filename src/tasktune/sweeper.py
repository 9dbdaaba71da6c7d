"""`tasktune sweep SWEEP.yaml`: find the best adaptation within a budget, choose it on validation, prove it on
test once.

A sweep file names a base recipe, a search `space` over recipe keys, a sampler, a budget and a pruner. Optuna
runs the search (the engine; tasktune schedules nothing itself): an SQLite file in the sweep directory by
default, or any RDB URL (`storage: postgresql://...`) that `tasktune sweep --worker SWEEP_DIR` processes on other
machines join. Honest selection:

- every trial shares the base recipe's split and the one loaded model (re-wrapped with a fresh adapter per
  trial, the same initialisation for the same seed); tokenized rows are cached across trials;
- trials are ranked on the validation slice only (each trial's best validation figure, with its interval);
- the test set is evaluated once at the end: zero-shot, the winner and the base recipe; never another trial.
  The report gives the winner's test figure with its interval, the paired tests winner vs base and winner vs
  zero-shot, and the winner's validation figure beside its test figure (the optimism of choosing).

The directory `sweeps/NAME/` is locked and signed like a run directory: `spec.json` (the resolved sweep),
`study.db`, `trials/N/` (a run directory without the test stages), `leaderboard.json` / `.md`, `test/`,
`sweep.json`, `report.md` / `report.html` and `plots/`. Killing a sweep and re-running the same command
continues it: finished trials are kept and the interrupted one is retried from its last checkpoint.

This module is the command: a loop of `stages` over trials, with Optuna. Its parts, one concept each:
`sweep_spec` (the sweep file and each trial's recipe), `sweep_study` (Optuna's study, sampler, retries and
leaderboard), `sweep_trials` (train and validate one trial), `sweep_final` (the winner, and the test set read
once), `sweep_report` (the report, from files).
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from tasktune.errors import TasktuneError
from tasktune.ownership import seal
from tasktune.rundir import RunLock, mark_as_ours, read_marker, remove_ours, write_json, write_text
from tasktune.run_layout import RunLayout
from tasktune.stages import Prepared, check_fingerprint, prepare, run_fingerprint
from tasktune.sweep_final import final_test
from tasktune.sweep_spec import SweepSpec, base_recipe, in_space, load_sweep, saved_spec, spec_to_dict, value_at
from tasktune.sweep_study import fail_dead_local_trials, open_study, wait_for_workers
from tasktune.sweep_trials import Trials


def sweep(path: str, overrides: list[str] = (), overwrite: bool = False) -> Path:
    """`tasktune sweep FILE`: run (or continue) the sweep, then the once-only test evaluation and the report."""
    spec = load_sweep(path, overrides)
    sweep_dir = spec.sweep_dir
    resolved = json.dumps(spec_to_dict(spec), indent=1, sort_keys=True)
    lock = RunLock(sweep_dir)
    lock.acquire()
    try:
        if sweep_dir.exists():
            same = (sweep_dir / "spec.json").is_file() and (sweep_dir / "spec.json").read_text() == resolved
            if not same and not overwrite:
                raise TasktuneError(f"{sweep_dir} holds another sweep; choose another name or pass --overwrite")
            if not same:
                remove_ours(sweep_dir, allow_partial=True)  # checks, then deletes: the one deletion path
            elif read_marker(sweep_dir)[0] is None:
                raise TasktuneError(f"{sweep_dir}: {read_marker(sweep_dir)[1]}; refusing to write into it")
        if (sweep_dir / "sweep.json").is_file():
            print(f"[tasktune] {sweep_dir} is already complete for this sweep; nothing to do")
            return sweep_dir
        if not sweep_dir.exists():
            sweep_dir.mkdir(parents=True)
            mark_as_ours(sweep_dir, "sweep")
            write_text(sweep_dir / "spec.json", resolved)
        base = base_recipe(spec)
        prepared = prepare(base)
        check_sweep_fingerprint(sweep_dir, prepared)
        study = open_study(spec, sweep_dir, create=True)
        fail_dead_local_trials(study)
        if not study.trials:  # the base recipe competes as trial 0, so its adapter exists for the test
            defaults = {param.key: value_at(base, param.key) for param in spec.space}
            study.enqueue_trial({k: v for k, v in defaults.items() if in_space(spec, k, v)},
                                user_attrs={"base": True, "base_values": {
                                    k: v for k, v in defaults.items() if not in_space(spec, k, v)}})
        optimize(spec, sweep_dir, study, prepared)
        wait_for_workers(study)
        result = final_test(spec, sweep_dir, study, prepared)
        write_json(sweep_dir / "sweep.json", result)
        seal(sweep_dir, "sweep")
        print(f"[tasktune] wrote {sweep_dir} (winner: trial {result['winner']['trial']})")
        return sweep_dir
    finally:
        lock.release()


def check_sweep_fingerprint(sweep_dir: Path, prepared: Prepared) -> None:
    """A sweep continues only on the data, model and task spec its trials were trained on (as a run resumes)."""
    fingerprint = run_fingerprint(prepared)
    if RunLayout(sweep_dir).fingerprint.is_file():
        check_fingerprint(sweep_dir, fingerprint, "its trials were trained on the earlier one: pass --overwrite to "
                                                  "start the sweep again, or give it another name")
    else:
        write_json(RunLayout(sweep_dir).fingerprint, fingerprint)


def worker(sweep_dir: str) -> Path:
    """`tasktune sweep --worker SWEEP_DIR`: join a sweep's study and run trials until its budget is spent."""
    folder = Path(sweep_dir)
    spec = saved_spec(folder)
    prepared = prepare(base_recipe(spec))
    check_sweep_fingerprint(folder, prepared)
    study = open_study(spec, folder, create=False)
    optimize(spec, folder, study, prepared)
    print(f"[tasktune] worker done: {len(study.trials)} trials in {spec.name}")
    return folder


def optimize(spec: SweepSpec, sweep_dir: Path, study: optuna.Study, prepared: Prepared) -> None:
    """Run trials in this process until the sweep's budget (trials, timeout) is spent, counting other
    workers' finished trials."""
    trials = Trials(spec, sweep_dir, prepared)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    remaining = spec.trials - len(study.get_trials(deepcopy=False, states=done))
    if remaining <= 0:
        return
    study.optimize(trials.run, n_trials=remaining + len(study.get_trials(deepcopy=False,
                                                                           states=(TrialState.WAITING,))),
                   timeout=spec.timeout, callbacks=[MaxTrialsCallback(spec.trials, states=done)],
                   catch=(), gc_after_trial=True)


