"""What an adaptation cost: the same measurements on the base and the adapted model, in the same run, on the same
rows, so that the change has a paired interval.

- `eval.perplexity`: token-level perplexity on general text. `embedded`: Wikipedia paragraphs, the contexts of
  the embedded SQuAD v2 files that no training, validation or test example of the run holds (a SQuAD run
  leaves its own out; how many of the rest come from articles it trains on is counted and shown); or a text
  file of the user's (documents separated by blank lines). Interval by bootstrap over documents. Chosen while
  the run is prepared, before any model loads, so a source without documents fails first.
- `eval.controls`: other tasks (a shipped task's name or a spec path), each evaluated with its own protocol on
  `eval.control_rows` seeded rows of its own data; rows of the run's own training part are never used (and the
  overlap is counted and shown).

Each evaluation stage writes `cost/perplexity.jsonl` (per-document NLL and tokens) and `cost/controls/NAME/`
(metrics and predictions); `paired_costs` compares the zero-shot and fine-tuned stages.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

from tasktune.errors import TasktuneError

PERPLEXITY_MAX_TOKENS = 512


def perplexity_documents(source: str, excluded_contexts: set[str], limit: int, seed: int,
                         trained_titles: set[str] = frozenset()) -> tuple[list[str], str]:
    """(documents, where they came from): held-out general text, never one of `excluded_contexts`."""
    title_of: dict[str, str | None] = {}
    if source == "embedded":
        from tasktune.data import squad
        from tasktune.tasks.spec import load_spec

        rows, origin = squad.load(load_spec("squad_v2"), None)
        title_of = {r["context"]: r.get("title") for r in rows}
        docs = [c for c in dict.fromkeys(r["context"] for r in rows) if c not in excluded_contexts]
        if not docs:
            raise TasktuneError(f"eval.perplexity: every Wikipedia paragraph of {origin} is a context of this run's "
                                "data; give a text file of general text (documents separated by blank lines)")
    else:
        path = Path(source)
        if not path.is_file():
            raise TasktuneError(f"eval.perplexity: {source} is neither `embedded` nor a text file")
        docs = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        if not docs:
            raise TasktuneError(f"eval.perplexity: {path} has no documents (non-empty blocks separated by blank "
                                "lines)")
        origin = str(path)
    if len(docs) > limit:
        docs = random.Random(seed).sample(docs, limit)
    elif len(docs) < limit:  # said, as for the row limits: the figure's n is then not the recipe's
        print(f"[tasktune] eval.perplexity_docs={limit} is more than the {len(docs)} documents "
              f"{'left held out' if source == 'embedded' else 'of ' + origin}: using all {len(docs)}")
    if source == "embedded":
        related = sum(title_of[d] in trained_titles for d in docs)
        origin = (f"Wikipedia paragraphs of {origin} that no example of this run holds"
                  + (f" ({related} of {len(docs)} from articles it trains on)" if related else ""))
    return docs, origin


def held_out_documents(recipe, examples: dict[str, list[dict]], split_rows: dict[str, list[dict]] | None = None
                       ) -> tuple[list[str], str]:
    """The documents of a run's eval.perplexity (else the embedded paragraphs): never a context of the run's
    examples, nor (given `split_rows`, the whole split before row limits, as a sweep whose trials vary
    data.limit_train needs) of any row of the split's training and validation parts."""
    cfg = recipe.eval
    excluded = {r["context"] for part in examples.values() for r in part if "context" in r}
    trained = [r for part in ("train", "validation") for r in examples.get(part, [])]
    if split_rows is not None:
        trained += [r for part in ("train", "validation") for r in split_rows.get(part, [])]
        excluded |= {r["context"] for r in trained if "context" in r}
    titles = {r["title"] for r in trained if r.get("title")}
    return perplexity_documents(cfg.perplexity or "embedded", excluded, cfg.perplexity_docs, recipe.data.seed, titles)


def run_documents(p) -> tuple[list[str], str]:
    """The held-out documents of a prepared run (chosen in `prepare`, before the model loaded)."""
    return p.documents if p.documents is not None else held_out_documents(p.recipe, p.examples)


def document_nll(model, tokenizer, docs: list[str]) -> list[dict]:
    """Summed negative log-likelihood and token count of each document (its first PERPLEXITY_MAX_TOKENS
    tokens), the LM head applied in chunks so that full-vocabulary logits never exist for a whole document."""
    import torch

    from tasktune.infer import head_logits, unwrap

    lm = unwrap(model)
    backbone = getattr(lm, lm.base_model_prefix)
    out = []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for doc in docs:
            ids = tokenizer(doc, add_special_tokens=True)["input_ids"][:PERPLEXITY_MAX_TOKENS]
            if len(ids) < 2:
                continue
            x = torch.tensor([ids], device=lm.device)  # on the model's device (the GPU after training)
            hidden = backbone(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).last_hidden_state[0]
            nll = 0.0
            for start in range(0, len(ids) - 1, 64):
                stop = min(start + 64, len(ids) - 1)
                logits = head_logits(model, hidden[start:stop]).float()
                targets = x[0, start + 1:stop + 1]
                nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            out.append({"nll": nll, "tokens": len(ids) - 1})
    model.train(was_training)
    return out


def perplexity_summary(rows: list[dict]) -> dict:
    from tasktune.metrics.intervals import bootstrap_weights, percentile_interval

    nll = np.asarray([r["nll"] for r in rows], dtype=np.float64)
    tokens = np.asarray([r["tokens"] for r in rows], dtype=np.float64)
    weights = bootstrap_weights(len(rows)).astype(np.float64)
    samples = np.exp((weights @ nll) / (weights @ tokens))
    return {"perplexity": float(math.exp(nll.sum() / tokens.sum())), "ci95": percentile_interval(samples),
            "documents": len(rows), "tokens": int(tokens.sum())}


def perplexity_change(before: list[dict], after: list[dict]) -> dict:
    """The relative perplexity change after/before - 1 with a paired bootstrap over documents."""
    from tasktune.metrics.intervals import bootstrap_weights, percentile_interval

    b = np.asarray([r["nll"] for r in before], dtype=np.float64)
    a = np.asarray([r["nll"] for r in after], dtype=np.float64)
    tokens = np.asarray([r["tokens"] for r in before], dtype=np.float64)
    weights = bootstrap_weights(len(before)).astype(np.float64)
    samples = np.exp((weights @ (a - b)) / (weights @ tokens)) - 1
    share = min(float((samples <= 0).mean()), float((samples >= 0).mean()))
    return {"test": "paired bootstrap over documents", "relative_change": float(math.exp((a - b).sum() / tokens.sum()) - 1),
            "interval": percentile_interval(samples), "p_value": min(1.0, 2 * share), "n": len(before)}


def row_key(row: dict) -> str:
    """What makes two rows the same example, across task types: the text, or the question with its context."""
    return row.get("text") or row.get("question", "") + "\n" + row.get("context", "")


def control_rows(control, run_train_texts: set[str], limit: int, seed: int) -> tuple[list[dict], dict]:
    """A control task's evaluation rows: seeded, never one of the run's training rows (same file or not)."""
    rows, source = control.load(None)
    overlap = sum(row_key(r) in run_train_texts for r in rows)
    kept = [r for r in rows if row_key(r) not in run_train_texts]
    if len(kept) > limit:
        kept = [kept[i] for i in sorted(random.Random(seed).sample(range(len(kept)), limit))]
    return kept, {"source": source, "rows": len(kept), "excluded_as_training_rows": overlap}


def measure(p, model, out_dir: Path, head: str = "causal_lm") -> dict:
    """Perplexity and controls of one model (one evaluation stage); {} when the recipe asks for neither."""
    from tasktune import evaluation
    from tasktune.atomic import write_json, write_jsonl
    from tasktune.runner import Runner
    from tasktune.tasks import PromptBuilder, get_task

    cfg = p.recipe.eval
    if not cfg.perplexity and not cfg.controls:
        return {}
    out_dir = Path(out_dir) / "cost"
    summary: dict = {}
    train_texts = {row_key(r) for r in p.examples["train"] + p.examples["validation"]}
    if cfg.perplexity:
        docs, origin = run_documents(p)
        rows = document_nll(model, p.lm.tokenizer, docs)
        write_jsonl(out_dir / "perplexity.jsonl", rows)
        summary["perplexity"] = {**perplexity_summary(rows), "source": origin}
    for name in cfg.controls or []:
        control = get_task(name)
        rows, meta = control_rows(control, train_texts, cfg.control_rows, p.recipe.data.seed)
        builder = PromptBuilder(control, p.lm.tokenizer, cfg.prompt_format, 0, seed=p.recipe.data.seed)
        # Only the main process measures costs: no sharding, or the other processes would have to join.
        runner = Runner(model, p.lm.tokenizer, cfg.batch_size, shard=False)
        protocols = [control.validation_protocol("causal_lm")]
        metrics, records = evaluation.evaluate(control, runner, builder, rows, protocols, "causal_lm")
        folder = out_dir / "controls" / control.name
        write_json(folder / "metrics.json", {**metrics, "rows": meta})
        # The control's spec as read, so the report rebuilds it from the run directory alone.
        from tasktune.atomic import write_text

        write_text(folder / "task.yaml", control.spec.text)
        write_jsonl(folder / "predictions.jsonl", records)
        summary.setdefault("controls", {})[control.name] = {**control.figure(metrics), **meta}
    return summary


def paired_costs(run_dir: Path) -> dict:
    """Zero-shot vs fine-tuned perplexity and controls, paired, from a run's files."""
    from tasktune.tasks import get_task

    def _read_jsonl(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    run_dir = Path(run_dir)
    before, after = run_dir / "zeroshot" / "cost", run_dir / "finetuned" / "cost"
    out: dict = {}
    if (before / "perplexity.jsonl").is_file() and (after / "perplexity.jsonl").is_file():
        out["perplexity"] = perplexity_change(_read_jsonl(before / "perplexity.jsonl"),
                                              _read_jsonl(after / "perplexity.jsonl"))
    for folder in sorted((before / "controls").glob("*")) if (before / "controls").is_dir() else []:
        other = after / "controls" / folder.name
        if not (other / "predictions.jsonl").is_file():
            continue
        control = get_task(str(folder / "task.yaml"))
        paired = control.paired(_read_jsonl(folder / "predictions.jsonl"), _read_jsonl(other / "predictions.jsonl"))
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
