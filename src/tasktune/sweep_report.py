"""A sweep's report.md and self-contained report.html: the headline (winner vs base recipe vs zero-shot, on test),
the selection rule, the leaderboard, the validation figure per trial, a parallel-coordinates plot, Optuna's
parameter importances and, when the space varies `data.limit_train`, the learning curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from tasktune.atomic import write_text  # noqa: E402
from tasktune.html_page import markdown_to_html  # noqa: E402
from tasktune.plots import save_figure  # noqa: E402


def _figure(f: dict | None) -> str:
    if not f or f.get("value") is None:
        return "—"
    interval = f.get("interval")
    return f"{f['value']:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "") + \
        (f" (n = {f['n']:,})" if f.get("n") else "")


def trials_plot(board: list[dict], metric: str, path: Path) -> Path | None:
    rows = sorted((r for r in board if r["validation"]["value"] is not None), key=lambda r: r["trial"])
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for pruned, colour, label in ((False, "tab:blue", "finished"), (True, "tab:grey", "pruned")):
        part = [r for r in rows if r["pruned"] == pruned]
        if not part:
            continue
        x = [r["trial"] for r in part]
        y = [r["validation"]["value"] for r in part]
        low = [v - (r["validation"]["interval"] or (v, v))[0] for v, r in zip(y, part)]
        high = [(r["validation"]["interval"] or (v, v))[1] - v for v, r in zip(y, part)]
        ax.errorbar(x, y, yerr=[low, high], fmt="o", color=colour, label=label, capsize=3)
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric} (95% interval)")
    ax.legend()
    return save_figure(fig, path)


def parallel_plot(study, path: Path) -> Path | None:
    from optuna.trial import TrialState

    try:
        from optuna.visualization.matplotlib import plot_parallel_coordinate

        if len(study.get_trials(states=(TrialState.COMPLETE,))) < 2:
            return None
        ax = plot_parallel_coordinate(study)
    except Exception:  # noqa: BLE001 (optuna refuses some spaces, e.g. a single categorical value)
        return None
    return save_figure(ax.figure, path)


def importances(study) -> dict:
    import optuna
    from optuna.trial import TrialState

    if len(study.get_trials(states=(TrialState.COMPLETE,))) < 3:
        return {}
    try:
        return optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(
            seed=0))
    except Exception:  # noqa: BLE001 (too few distinct values: no importance can be estimated)
        return {}


def learning_curve(board: list[dict], metric: str, path: Path) -> tuple[Path | None, list[dict]]:
    """Validation figure against the number of training rows (trials that vary `data.limit_train`)."""
    points = [r for r in board if "data.limit_train" in r["params"] and r["validation"]["value"] is not None
              and not r["pruned"]]
    if len({r["params"]["data.limit_train"] for r in points}) < 2:
        return None, []
    by_size: dict = {}
    for r in points:
        by_size.setdefault(r["params"]["data.limit_train"], []).append(r)
    curve = []
    for size in sorted(by_size):
        best = max(by_size[size], key=lambda r: r["validation"]["value"])
        curve.append({"rows": size, "trials": len(by_size[size]), **best["validation"]})
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = [c["rows"] for c in curve]
    y = [c["value"] for c in curve]
    err = [[v - (c["interval"] or (v, v))[0] for v, c in zip(y, curve)],
           [(c["interval"] or (v, v))[1] - v for v, c in zip(y, curve)]]
    ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3)
    ax.set_xscale("log")
    ax.set_xlabel("training rows (data.limit_train)")
    ax.set_ylabel(f"best validation {metric} (95%)")
    return save_figure(fig, path), curve


def write_sweep_report(sweep_dir: Path, spec, study, result: dict, board: list[dict]) -> None:
    from tasktune.report import paired_lines

    metric = result["winner"]["validation"].get("metric") or "metric"
    plots = sweep_dir / "plots"
    test = result["test"]
    winner, base = result["winner"], result["base"]
    lines = [f"# Sweep {spec.name}: base recipe `{spec.recipe}`", "",
             "## Headline (test set, evaluated once each)", "",
             f"Test figures in the task's headline column (`{(test.get('winner') or {}).get('protocol')}`), and in the "
             f"column trials were ranked on (`{winner['validation'].get('protocol')}`, every row) beside the "
             "validation figure that chose them.", "",
             f"| | test {metric} [95%] (headline) | test, as ranked [95%] | validation [95%] |", "|---|---:|---:|---:|",
             f"| winner (trial {winner['trial']}) | {_figure(test.get('winner'))} | "
             f"{_figure(test.get('winner_as_validated'))} | {_figure(winner['validation'])} |",
             f"| base recipe (trial {base['trial'] if base else '—'}) | {_figure(test.get('base'))} | "
             f"{_figure(test.get('base_as_validated'))} | {_figure(base['validation']) if base else '—'} |",
             f"| zero-shot | {_figure(test.get('zeroshot'))} | — | — |", ""]
    for name, paired in result["paired"].items():
        lines.append(f"Paired, {name.replace('_', ' ')}:")
        lines += paired_lines(paired)
        lines.append("")
    as_ranked = test.get("winner_as_validated") or {}
    optimism = (winner["validation"]["value"] - as_ranked["value"] if as_ranked.get("value") is not None else None)
    front = result.get("pareto_front") or []
    lines += [f"Selection rule: {result['selection']}.",
              (f"Pareto front (validation {metric} against perplexity increase, whatever the limit): trials "
               + ", ".join(map(str, front)) + "." if front else ""),
              (f"Optimism of choosing: the winner's validation figure exceeds its test figure by {optimism:+.4f}."
               if optimism is not None else ""), "",
              "Winner's parameters: " + ", ".join(f"`{k}={v}`" for k, v in winner["params"].items()), "",
              f"## Leaderboard ({result['trials']} trials, {result['pruned']} pruned; ranked on validation)", "",
              leaderboard_markdown(board, metric)]
    made = [("Validation figure per trial", trials_plot(board, metric, plots / "trials.png")),
            ("Parallel coordinates", parallel_plot(study, plots / "parallel.png"))]
    curve_path, curve = learning_curve(board, metric, plots / "learning_curve.png")
    if curve_path:
        made.append(("Learning curve (validation, no test data)", curve_path))
        lines += ["## How many labels", "", "| training rows | trials | best validation [95%] |", "|---:|---:|---:|"]
        lines += [f"| {c['rows']:,} | {c['trials']} | {_figure(c)} |" for c in curve]
        lines.append("")
    weights = importances(study)
    if weights:
        lines += ["## Parameter importances (Optuna, fANOVA)", "", "| parameter | importance |", "|---|---:|"]
        lines += [f"| `{k}` | {v:.3f} |" for k, v in weights.items()]
        lines.append("")
    figures = [(title, path) for title, path in made if path is not None]
    if figures:
        lines += ["## Plots", ""] + [f"![{title}]({path.relative_to(sweep_dir)})" for title, path in figures]
    markdown = "\n".join(lines) + "\n"
    write_text(sweep_dir / "report.md", markdown)
    headline = (f"<div class='big'>{metric} {test['winner']['value']:.4g} (winner, test)</div>"
                f"<div>base recipe {test.get('base', {}).get('value', float('nan')):.4g}, zero-shot "
                f"{test['zeroshot']['value']:.4g}; n = {result['test_rows']:,} test examples</div>")
    write_text(sweep_dir / "report.html", markdown_to_html(markdown, sweep_dir, headline))


def _fmt_figure(figure: dict) -> str:
    value = figure.get("value")
    if value is None:
        return "—"
    interval = figure.get("interval")
    return f"{value:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")


def _cost_text(r: dict) -> str:
    cost = r.get("perplexity_increase")
    if cost is None:
        return "—"
    low, high = cost["interval"]
    return (f"{100 * cost['relative_change']:+.1f}% [{100 * low:+.1f}%, {100 * high:+.1f}%]"
            + ("" if r.get("feasible") else " over the limit") + (" · Pareto" if r.get("pareto") else ""))


def leaderboard_markdown(board: list[dict], metric: str) -> str:
    keys = list(dict.fromkeys(k for r in board for k in r["params"]))
    costs = any("perplexity_increase" in r for r in board)  # the sweep has a constraint: show the cost column
    cost_head, cost_rule = (" perplexity increase [95%] |", "---:|") if costs else ("", "")
    lines = [f"| rank | trial | {' | '.join(f'`{k}`' for k in keys)} | validation {metric} [95%] | n |{cost_head} "
             "steps | wall s | pruned |", "|---:|---:|" + "---|" * len(keys) + "---:|---:|" + cost_rule + "---:|---:|---|"]
    for rank, r in enumerate(board, 1):
        cells = [_param_text(r["params"].get(k)) for k in keys]
        tag = " (base)" if r["base"] else (" (resumed after a kill)" if r["retry_of"] is not None else "")
        cost = f" {_cost_text(r)} |" if costs else ""
        lines.append(f"| {rank} | {r['trial']}{tag} | {' | '.join(cells)} | {_fmt_figure(r['validation'])} | "
                     f"{r['validation'].get('n') or '—'} |{cost} {r['steps'] if r['steps'] is not None else '—'} | "
                     f"{r['wall_s'] if r['wall_s'] is not None else '—'} | {'yes' if r['pruned'] else 'no'} |")
    return "\n".join(lines) + "\n"


def _param_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)
