"""The Optuna study behind a sweep: its storage (SQLite in the sweep directory, or any RDB URL workers on other
machines join), a sampler seeded per trial, trials of dead local processes retried as themselves, and the
leaderboard the finished trials make."""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tasktune.errors import TasktuneError
from tasktune.sweep_spec import SweepSpec


def storage_url(spec: SweepSpec, sweep_dir: Path) -> str:
    return spec.storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"


def open_study(spec: SweepSpec, sweep_dir: Path, create: bool):
    url = storage_url(spec, sweep_dir)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        # Heartbeats mark a trial whose process died as failed; the retry callback queues it again with the same
        # parameters (its directory, and so its checkpoints, are reused).
        storage = optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=20, grace_period=60,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
    except Exception as exc:  # SQLAlchemy raises many types; all mean "cannot open this storage"
        raise TasktuneError(f"sweep storage {url}: cannot open it ({' '.join(str(exc).split())[:300]})") from None
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
              "hyperband": lambda: optuna.pruners.HyperbandPruner(),
              "none": lambda: optuna.pruners.NopPruner()}[spec.pruner]()
    kwargs = dict(study_name=spec.name, storage=storage, direction="maximize", pruner=pruner,
                  sampler=TrialSeededSampler(spec))
    if create:
        return optuna.create_study(load_if_exists=True, **kwargs)
    try:
        return optuna.load_study(**{k: v for k, v in kwargs.items() if k != "direction"})
    except KeyError:
        raise TasktuneError(f"{url}: no study {spec.name!r} yet; start the sweep with `tasktune sweep FILE` "
                            "before adding workers") from None


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """The configured sampler, made afresh for every trial with seed + the number of trials that have not
    failed. A process's sampler state is then no part of the outcome: a sweep killed and resumed asks the
    same questions as one never killed, and two workers sampling at once get different seeds."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.inner = self._make(spec.seed)

    def _make(self, seed: int) -> optuna.samplers.BaseSampler:
        spec = self.spec
        if spec.sampler == "grid":
            return optuna.samplers.GridSampler({p.key: p.grid() for p in spec.space}, seed=seed)
        if spec.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if spec.constraint is not None:  # TPE models feasibility from each trial's constraint value
            return optuna.samplers.TPESampler(seed=seed, constraints_func=constraint_values)
        return optuna.samplers.TPESampler(seed=seed)

    def before_trial(self, study, trial):
        alive = [t for t in study.get_trials(deepcopy=False)
                 if t.state != TrialState.FAIL and t.number <= trial.number]
        # The grid keeps one seed: Optuna's GridSampler gives trial n the n-th point of an order it shuffles
        # with its seed, so a seed per trial would repeat points and skip others (seen: a 4-point grid ran
        # `lora` twice and never `full`). Its choices depend only on the study then.
        self.inner = self._make(self.spec.seed if self.spec.sampler == "grid" else self.spec.seed + len(alive))
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self.inner.after_trial(study, trial, state, values)


def constraint_values(trial) -> list[float]:
    """Optuna's constraint convention: <= 0 is feasible (pruned and failed trials count as feasible)."""
    return trial.user_attrs.get("constraint", [0.0])


IDENTITY_ATTRS = ("identity", "base", "base_values", "trial_dir")  # what a retried trial keeps of the one it retries


def identity_of(trial) -> int:
    """The number a trial is known by (its directory, recipe name and leaderboard row): its own, or for a retry
    of a killed trial, the number of the trial it retries."""
    return trial.user_attrs.get("identity", trial.number)


def fail_dead_local_trials(study) -> None:
    """Trials left RUNNING by a process of this machine that no longer exists (killed): failed now rather than
    after the heartbeat's grace period, and queued again as the same trial (number, directory, base or not,
    parameters)."""
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host or is_alive(t.user_attrs.get("pid"), t.user_attrs.get("process")):
            continue
        # Optuna has no public call to fail one trial of another process; its storage API is what
        # fail_stale_trials itself uses.
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        kept = {k: t.user_attrs[k] for k in IDENTITY_ATTRS if k in t.user_attrs}
        study.enqueue_trial(t.params, user_attrs={**kept, "identity": identity_of(t), "retry_of": t.number},
                            skip_if_exists=False)


def process_identity(pid: int) -> str | None:
    """This boot's id, the pid and the process's start time (clock ticks after boot, /proc/PID/stat field 22):
    a pid alone is reused (in a container tasktune may be pid 1 every time); the three together are not. None
    where /proc does not tell."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        start = stat.rsplit(")", 1)[1].split()[19]  # after the command name, which may hold spaces
    except (OSError, IndexError):
        return None
    return f"{boot}:{pid}:{start}"


def is_alive(pid, process: str | None = None) -> bool:
    """Whether the process that ran a trial still runs: the pid exists and, where its identity was recorded,
    it is the same process (not a new one given the same pid)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if process is not None:
        return process_identity(pid) == process
    return True


def wait_for_workers(study, poll_s: float = 2.0, say_every_s: float = 60.0) -> None:
    """Wait for trials other processes are running, saying which (at once, then every minute)."""
    said = -math.inf
    while True:
        fail_dead_local_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        if time.monotonic() - said >= say_every_s:
            shown = ", ".join(f"{identity_of(t)} (host {t.user_attrs.get('host')}, pid {t.user_attrs.get('pid')})"
                              for t in running)
            print(f"[tasktune] waiting for trial(s) still running in other processes: {shown}", flush=True)
            said = time.monotonic()
        time.sleep(poll_s)


def leaderboard(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        record = t.user_attrs.get("record") or {}
        validation = record.get("validation") or {"value": t.value, "interval": None, "n": None}
        last_step = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"trial": identity_of(t), "params": record.get("params", t.params), "validation": validation,
                     "steps": record.get("steps", last_step), "wall_s": record.get("wall_s") or (
                         round((t.datetime_complete - t.datetime_start).total_seconds(), 2)
                         if t.datetime_complete else None),
                     "pruned": t.state == TrialState.PRUNED, "base": bool(t.user_attrs.get("base")),
                     "retry_of": t.user_attrs.get("retry_of")})
        if "perplexity_increase" in record:
            rows[-1].update(perplexity_increase=record["perplexity_increase"], feasible=record["feasible"])
    rows.sort(key=lambda r: (r["pruned"], not r.get("feasible", True),
                             -(r["validation"]["value"] if r["validation"]["value"] is not None else -math.inf),
                             r["trial"]))
    mark_pareto_front(rows)
    return rows


def mark_pareto_front(rows: list[dict]) -> None:
    """`pareto: true` on the finished trials no other beats on both validation figure (higher) and perplexity
    increase (lower): the trade-offs worth choosing between, whatever the limit."""
    measured = [r for r in rows if not r["pruned"] and r["validation"]["value"] is not None
                and r.get("perplexity_increase") is not None]
    for r in measured:
        v, c = r["validation"]["value"], r["perplexity_increase"]["relative_change"]
        r["pareto"] = not any(o["validation"]["value"] >= v and o["perplexity_increase"]["relative_change"] <= c
                              and (o["validation"]["value"] > v or o["perplexity_increase"]["relative_change"] < c)
                              for o in measured)


