"""The "Shipped as" table, from what `shipping` measured (run files only): a run's report and an export's model
card show each GGUF file run by llama.cpp beside the adapter on the same test rows."""

from __future__ import annotations


def paired_text(test: dict) -> str:
    """A paired test of a file against the adapter (file-only right vs adapter-only right; the file's gain)."""
    if "mcnemar" in test:
        m = test["mcnemar"]
        return f"McNemar {m['wrong_to_right']} vs {m['right_to_wrong']}, p {m['p_value']:.3g}"
    if "gain" in test:
        g = test["gain"]
        return (f"{g['difference']:+.4g} [{g['interval'][0]:+.4g}, {g['interval'][1]:+.4g}], paired bootstrap p "
                f"{g['p_value']:.3g}")
    return ""


def _figure(value: float, interval) -> str:
    return f"{value:.4f}" + (f" [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "")


def shipped_lines(shipped: list[dict]) -> list[str]:
    """The "Shipped as" table: the adapter in PyTorch, then each file run by llama.cpp on the same test rows."""
    if not shipped:
        return []
    first = shipped[0]
    speed = f"{first['adapter_tokens_per_s']} tokens/s" if first.get("adapter_tokens_per_s") else "—"
    lines = ["## Shipped as (each file run by llama.cpp on the test split, against the adapter on the same rows)",
             "", "| shipped as | column | n | figure [95% CI] | same decision as the adapter | paired test (file vs "
             "adapter) | size | speed |", "|---|---|---:|---|---:|---|---:|---:|"]
    for r in first["rows"]:
        lines.append(f"| adapter ({first.get('adapter_device') or 'PyTorch'}) | {r['column']} {r['metric']} | "
                     f"{r['n']} | {_figure(r['adapter'], r.get('adapter_interval'))} | — | — | — | {speed} |")
    for s in shipped:
        kind = "adapter GGUF on the base GGUF" if s["type"] == "adapter" else f"merged {s['type']}"
        for r in s["rows"]:
            agreement = f"{100 * r['agreement']:.1f}%" if r["agreement"] is not None else "—"
            lines.append(f"| {kind} | {r['column']} {r['metric']} | {r['n']} | {_figure(r['value'], r['interval'])}"
                         f" | {agreement} | {paired_text(r['paired'] or {})} | {s['bytes'] / 2**20:.0f} MiB | "
                         f"{s['tokens_per_s']} tokens/s |")
    tok = [f"{s['type']} {s['tokenizer_agreement']['same_ids']}/{s['tokenizer_agreement']['rows']}" for s in shipped]
    lines += ["", "llama.cpp's tokenizer gave the Hugging Face token ids to the prompts of: " + ", ".join(tok) + ". "
              "Speed: the positions the test requests read over the evaluation's seconds (llama.cpp one sequence "
              "at a time on this machine's CPU threads; the adapter batched by the run's evaluation stage).", ""]
    return lines
