"""What an adaptation cost, as the report reads it: the zero-shot and fine-tuned stages' cost files (written by
`costs.measure`) paired, and the lines and columns that show the change. Reads run files only: no model, no
torch.
"""

from __future__ import annotations

from pathlib import Path

from tasktune.metrics.perplexity import perplexity_change
from tasktune.run_layout import RunLayout, read_jsonl


def paired_costs(run_dir: Path) -> dict:
    """Zero-shot vs fine-tuned perplexity and controls, paired, from a run's files."""
    from tasktune.tasks import get_task

    layout = RunLayout(run_dir)
    before, after = layout.stage("zeroshot"), layout.stage("finetuned")
    out: dict = {}
    if layout.perplexity_records(before).is_file() and layout.perplexity_records(after).is_file():
        out["perplexity"] = perplexity_change(read_jsonl(layout.perplexity_records(before)),
                                              read_jsonl(layout.perplexity_records(after)))
    controls = layout.controls(before)
    for folder in sorted(controls.glob("*")) if controls.is_dir() else []:
        other = layout.controls(after) / folder.name
        if not layout.predictions(other).is_file():
            continue
        control = get_task(str(folder / "task.yaml"))
        paired = control.paired(read_jsonl(layout.predictions(folder)), read_jsonl(layout.predictions(other)))
        first = next(iter(paired.values()), None)
        if first:
            out.setdefault("controls", {})[folder.name] = first
    return out


def cost_lines(costs: dict | None, zeroshot: dict | None, finetuned: dict | None) -> list[str]:
    """The report's "cost" lines: each control's change and the perplexity change, with intervals."""
    lines = []
    if not costs:
        return lines
    ppl = costs.get("perplexity")
    if ppl:
        z = ((zeroshot or {}).get("cost") or {}).get("perplexity", {})
        f = ((finetuned or {}).get("cost") or {}).get("perplexity", {})
        lines.append(f"- perplexity on held-out general text ({z.get('source', '')}; {ppl['n']} documents): "
                     f"{z.get('perplexity', float('nan')):.3f} → {f.get('perplexity', float('nan')):.3f}, change "
                     f"{100 * ppl['relative_change']:+.1f}% (95% paired interval [{100 * ppl['interval'][0]:+.1f}%, "
                     f"{100 * ppl['interval'][1]:+.1f}%], p {ppl['p_value']:.3g})")
    for name, paired in (costs.get("controls") or {}).items():
        gain = paired["gain"]
        before = (((zeroshot or {}).get("cost") or {}).get("controls") or {}).get(name, {})
        after = (((finetuned or {}).get("cost") or {}).get("controls") or {}).get(name, {})
        line = (f"- control `{name}` ({paired['metric']}, n = {paired['n']}): {before.get('value', float('nan')):.4f} → "
                f"{after.get('value', float('nan')):.4f}, change {gain['difference']:+.4f} (95% paired interval "
                f"[{gain['interval'][0]:+.4f}, {gain['interval'][1]:+.4f}], p {gain['p_value']:.3g})")
        if "mcnemar" in paired:
            line += f"; exact McNemar p = {paired['mcnemar']['p_value']:.3g}"
        lines.append(line)
    return lines


def cost_figures(costs: dict | None) -> dict:
    """A run's costs as comparable columns: `cost_perplexity_change` (relative) and `cost_<control>_<metric>`
    (the paired difference), each `value [low, high]` with its 95% interval (compare and sweep tables)."""
    out = {}
    ppl = (costs or {}).get("perplexity")
    if ppl:
        out["cost_perplexity_change"] = (f"{100 * ppl['relative_change']:+.1f}% [{100 * ppl['interval'][0]:+.1f}%, "
                                         f"{100 * ppl['interval'][1]:+.1f}%] (n {ppl['n']})")
    for name, paired in ((costs or {}).get("controls") or {}).items():
        gain = paired["gain"]
        out[f"cost_{name}_{paired['metric']}"] = (f"{gain['difference']:+.4f} [{gain['interval'][0]:+.4f}, "
                                                  f"{gain['interval'][1]:+.4f}] (n {paired['n']})")
    return out
