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
(metrics and predictions): the measuring half, with the stages. `cost_report` pairs the two stages' files and
formats the change for the report.
"""

from __future__ import annotations

import random
from pathlib import Path

from tasktune.errors import TasktuneError
from tasktune.metrics.perplexity import perplexity_summary
from tasktune.run_layout import RunLayout

PERPLEXITY_MAX_TOKENS = 512


def perplexity_documents(source: str, excluded_contexts: set[str], limit: int, seed: int,
                         trained_titles: set[str] = frozenset()) -> tuple[list[str], str]:
    """(documents, where they came from): held-out general text, never one of `excluded_contexts`."""
    title_of: dict[str, str | None] = {}
    if source == "embedded":
        from tasktune.tasks import general_text_paragraphs

        title_of, origin = general_text_paragraphs()
        docs = [c for c in title_of if c not in excluded_contexts]
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
    summary: dict = {}
    train_texts = {row_key(r) for r in p.examples["train"] + p.examples["validation"]}
    if cfg.perplexity:
        docs, origin = run_documents(p)
        rows = document_nll(model, p.lm.tokenizer, docs)
        write_jsonl(RunLayout.perplexity_records(out_dir), rows)
        summary["perplexity"] = {**perplexity_summary(rows), "source": origin}
    for name in cfg.controls or []:
        control = get_task(name)
        rows, meta = control_rows(control, train_texts, cfg.control_rows, p.recipe.data.seed)
        builder = PromptBuilder(control, p.lm.tokenizer, cfg.prompt_format, 0, seed=p.recipe.data.seed)
        # Only the main process measures costs: no sharding, or the other processes would have to join.
        runner = Runner(model, p.lm.tokenizer, cfg.batch_size, shard=False)
        protocols = [control.validation_protocol("causal_lm")]
        metrics, records = evaluation.evaluate(control, runner, builder, rows, protocols, "causal_lm")
        folder = RunLayout.controls(out_dir) / control.name
        write_json(RunLayout.metrics(folder), {**metrics, "rows": meta})
        # The control's spec as read, so the report rebuilds it from the run directory alone.
        from tasktune.atomic import write_text

        write_text(folder / "task.yaml", control.spec.text)
        write_jsonl(RunLayout.predictions(folder), records)
        summary.setdefault("controls", {})[control.name] = {**control.figure(metrics), **meta}
    return summary
