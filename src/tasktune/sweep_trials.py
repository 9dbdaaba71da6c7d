"""A sweep's trials: each trains the base recipe's prepared run with its own recipe (`stages.variant`) into
trials/N/, and is ranked on its validation figure; the test set is never read here."""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path

import optuna
from transformers import TrainerCallback

from tasktune.rundir import mark_as_ours, write_json
from tasktune.stages import Prepared, release_base, train_stage, training_features, validate_stage, variant
from tasktune.sweep_spec import SweepSpec, trial_recipe
from tasktune.sweep_study import identity_of, process_identity


class Trials:
    """One loaded model and one split for every trial; a fresh adapter per trial (methods with a base of their
    own, `methods.Method.own_base`, load it per trial and leave the shared one untouched)."""

    def __init__(self, spec: SweepSpec, sweep_dir: Path, prepared: Prepared):
        self.spec, self.dir, self.base = spec, sweep_dir, prepared
        self.features: dict[tuple, list[dict]] = {}
        self._base_perplexity: tuple[list[str], list[dict]] | None = None

    def perplexity_increase(self, p: Prepared, model, head: str) -> dict | None:
        """The trial model's perplexity on held-out general text against the base model's, paired over
        documents (`metrics.perplexity.perplexity_change`); None for a model without its LM head (a
        classification head)."""
        from tasktune import costs
        from tasktune.metrics.perplexity import perplexity_change

        if head != "causal_lm":
            return None
        if self._base_perplexity is None:  # the base model's, once per process
            # Not the base run's own documents: a trial may train on more rows (data.limit_train) than the base
            # recipe, so no context of the whole training split may be among them.
            base = self.base
            by_id = {r["id"]: r for r in base.rows}
            split_rows = {part: [by_id[i] for i in ids if i in by_id] for part, ids in base.split.items()}
            documents, _ = costs.held_out_documents(base.recipe, base.examples, split_rows)
            self._base_perplexity = documents, costs.document_nll(self.base.lm.model, self.base.lm.tokenizer, documents)
        documents, base_nll = self._base_perplexity
        change = perplexity_change(base_nll, costs.document_nll(model, p.lm.tokenizer, documents))
        return {k: change[k] for k in ("relative_change", "interval", "p_value", "n")}

    def train_features(self, p: Prepared) -> list[dict]:
        """The trial's tokenized training rows, tokenized once for every trial that makes them alike."""
        cfg = p.recipe.train
        key = (cfg.objective, cfg.max_length, p.recipe.eval.shots, p.recipe.eval.prompt_format,
               tuple(p.recipe.eval.verbalizers or ()), p.recipe.eval.max_prompt_tokens, p.recipe.data.limit_train,
               p.recipe.data.train_sentences, cfg.questions_per_context)
        if key not in self.features:
            self.features[key] = training_features(p)
        return self.features[key]

    def run(self, trial) -> float:
        """Train one trial into trials/N/ (resuming a retried trial's checkpoints), validate it, return the
        validation figure. Pruned trials stop at a validation step."""
        base_values = trial.user_attrs.get("base_values") or {}
        # The base recipe's own values where the space does not hold them (a rank outside the choices, say):
        # trial 0 is then the base recipe itself, not its nearest point in the space.
        params = {param.key: base_values[param.key] if param.key in base_values else param.suggest(trial)
                  for param in self.spec.space}
        identity = identity_of(trial)
        folder = Path(trial.user_attrs.get("trial_dir") or self.dir / "trials" / str(identity))
        trial.set_user_attr("identity", identity)
        trial.set_user_attr("trial_dir", str(folder))
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("process", process_identity(os.getpid()))
        recipe = trial_recipe(self.spec, params, identity)
        p = variant(self.base, recipe)
        if not folder.is_dir():
            folder.mkdir(parents=True)
            mark_as_ours(folder, "trial")
        write_json(folder / "recipe.json", recipe.to_dict())
        start = time.perf_counter()
        limit = self.spec.perplexity_limit
        cost = None
        if not p.adaptation.trains:  # prompting: the base model with eval.shots examples
            figure = validate_stage(p, p.lm.model, "causal_lm")
            summary = {"global_step": 0, "train_runtime_s": 0.0}
            cost = {"relative_change": 0.0, "interval": [0.0, 0.0], "p_value": 1.0, "n": 0} if limit is not None \
                else None
        else:
            model, summary, head = train_stage(p, folder, features=self.train_features(p),
                                               callbacks=(PruneOnValidation(trial, p.task.metric_for_best),))
            try:
                # The best checkpoint's own validation pass when it saw this model; else one pass now.
                figure = summary.get("best_validation") or validate_stage(p, model, head)
                if limit is not None:
                    cost = self.perplexity_increase(p, model, head)
            finally:
                release_base(p, model)  # the shared base, clean for the next trial
        record = {"trial": identity, "params": params, "validation": figure, "steps": summary["global_step"],
                  "wall_s": round(time.perf_counter() - start, 2), "train_s": summary.get("train_runtime_s"),
                  "compile_warmup_s": summary.get("compile_warmup_s"),
                  "pruned": False}
        if limit is not None:
            # Unmeasurable (a classification head has no LM head to read text with) counts as outside the limit.
            record["perplexity_increase"] = cost
            record["feasible"] = cost is not None and cost["relative_change"] <= limit
            trial.set_user_attr("constraint", [cost["relative_change"] - limit if cost is not None else math.inf])
        write_json(folder / "trial.json", record)
        trial.set_user_attr("record", record)
        if figure["value"] is None:
            raise optuna.TrialPruned("no validation figure")
        return figure["value"]


class PruneOnValidation(TrainerCallback):
    """Report each validation's figure to Optuna and stop the trial when its pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial, self.metric = trial, metric

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(f"eval_{self.metric}")
        if value is None:
            return
        self.trial.report(float(value), state.global_step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {state.global_step} (validation {self.metric} {value:.4f})")
