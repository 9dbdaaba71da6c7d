"""A sweep's end: the winner chosen on validation, then the test set read once each for zero-shot, the winner
and the base recipe (never for another trial), the paired tests, the leaderboard and the report."""

from __future__ import annotations

from pathlib import Path

import optuna

from tasktune.errors import TasktuneError
from tasktune.infer import merge_for_inference
from tasktune.rundir import write_json, write_text
from tasktune.run_layout import RunLayout, read_jsonl
from tasktune.stages import Prepared, evaluate_stage, load_trained, variant
from tasktune.sweep_report import leaderboard_markdown, write_sweep_report
from tasktune.sweep_spec import SweepSpec, trial_recipe
from tasktune.sweep_study import leaderboard


def evaluate_test(p: Prepared, model, out_dir: Path, head: str = "causal_lm") -> dict:
    """One evaluation on the test split (the only place a sweep reads it)."""
    return evaluate_stage(p, model, out_dir, head=head)


def final_test(spec: SweepSpec, sweep_dir: Path, study: optuna.Study, prepared: Prepared) -> dict:
    """Winner by validation; then the test set, once each: zero-shot, winner, base recipe. Test figures are
    given in the task's headline column, and the winner's and base's also in the protocol they were validated
    on (SST-2's validation ranks on every validation row: its slice holds too few whole sentences alone)."""
    board = leaderboard(study)
    ranked = [r for r in board if not r["pruned"] and r["validation"]["value"] is not None]
    if not ranked:
        raise TasktuneError(f"sweep {spec.name}: no trial finished with a validation figure (all pruned or failed)")
    if spec.constraint is not None:
        within = [r for r in ranked if r.get("feasible")]
        if not within:
            least = min((r["perplexity_increase"]["relative_change"] for r in ranked if r.get("perplexity_increase")),
                        default=None)
            raise TasktuneError(f"sweep {spec.name}: no finished trial meets `{spec.constraint}` (smallest perplexity "
                                f"increase: {'unmeasured' if least is None else f'{100 * least:+.1f}%'}); relax it, "
                                "or add train.method none (prompting) or smaller learning rates to the space")
        ranked = within
    winner = ranked[0]
    base_row = next((r for r in board if r["base"] and not r["pruned"]), None)
    pristine = {k: v.detach().clone() for k, v in prepared.lm.model.state_dict().items()}
    test = sweep_dir / "test"
    zeroshot = evaluate_test(prepared, prepared.lm.model, test / "zeroshot")
    results = {"zeroshot": prepared.task.figure(zeroshot)}
    for role, row in (("winner", winner), ("base", base_row)):
        if row is None:
            continue
        if role == "base" and row["trial"] == winner["trial"]:
            results["base"], results["base_as_validated"] = dict(results["winner"]), dict(
                results["winner_as_validated"])
            continue
        metrics = _test_trial(prepared, spec, sweep_dir, row, test / role, pristine)
        results[role] = prepared.task.figure(metrics)
        results[f"{role}_as_validated"] = prepared.task.figure(metrics, row["validation"].get("protocol"))
    paired = {}
    for role in ("base", "zeroshot"):
        if role in results and not (role == "base" and base_row and base_row["trial"] == winner["trial"]):
            other = read_jsonl(RunLayout.predictions(test / role))
            paired[f"winner_vs_{role}"] = prepared.task.paired(other, read_jsonl(RunLayout.predictions(test / "winner")))
    within = (f" among trials with {spec.constraint} (perplexity on held-out general text against the base "
              "model, no test data)") if spec.constraint else ""
    result = {"name": spec.name, "selection": "highest validation "
              f"{prepared.task.metric_for_best}{within} on the base recipe's validation slice "
              f"(n = {len(prepared.examples['validation'])}); the test set was evaluated once each for zero-shot, "
              "the winner and the base recipe, never for the other trials",
              "winner": winner, "base": base_row, "test": results, "paired": paired,
              "trials": len(board), "pruned": sum(r["pruned"] for r in board),
              "test_rows": len(prepared.examples["test"]), "validation_rows": len(prepared.examples["validation"]),
              "constraint": spec.constraint,
              "pareto_front": [r["trial"] for r in board if r.get("pareto")]}
    write_json(sweep_dir / "leaderboard.json", board)
    write_text(sweep_dir / "leaderboard.md", leaderboard_markdown(board, prepared.task.metric_for_best))
    write_sweep_report(sweep_dir, spec, study, result, board)
    return result


def _test_trial(prepared: Prepared, spec: SweepSpec, sweep_dir: Path, row: dict, out_dir: Path,
                pristine: dict) -> dict:
    """A finished trial, loaded from trials/N/ and evaluated on the test split."""
    recipe = trial_recipe(spec, row["params"], row["trial"])
    p = variant(prepared, recipe)
    if not p.adaptation.trains:
        return evaluate_test(p, p.lm.model, out_dir)  # prompting: the base model with the trial's shots
    # The trial's model as every command loads it: a plain adapter on the shared base, or a base of its own (a
    # classification head, a full fine-tune, QLoRA's dequantized 4-bit base).
    model, _, head = load_trained(p, sweep_dir / "trials" / str(row["trial"]))
    merged = merge_for_inference(model)
    try:
        return evaluate_test(p, merged, out_dir, head=head)
    finally:
        if merged is p.lm.model:
            p.lm.model.load_state_dict(pristine)  # merged into the shared base in place: back to its weights

