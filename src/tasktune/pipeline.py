"""The whole job for one recipe: data → task → model → zero-shot eval → LoRA → same-protocol eval → report.

Everything that can be checked (recipe, data file, model, verbalizers) is checked before the run
directory is created; the directory itself is staged and renamed into place only when complete.
"""

from __future__ import annotations

import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from tasktune import __version__
from tasktune.config import Recipe
from tasktune.infer import merge_for_inference
from tasktune.models import LoadedModel, count_parameters, load_model
from tasktune.params import parameter_report
from tasktune.rundir import StagingDir, write_json, write_jsonl
from tasktune.tasks import PromptBuilder, get_task


def versions() -> dict:
    import peft
    import transformers

    return {"tasktune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def sample(items: list, limit: int | None, seed: int) -> list:
    """A seeded random subset in the original order, or all items."""
    if limit is None or limit >= len(items):
        return list(items)
    keep = set(random.Random(seed).sample(range(len(items)), limit))
    return [x for i, x in enumerate(items) if i in keep]


@dataclass
class Prepared:
    recipe: Recipe
    task: object
    source: str
    split: dict[str, list[int]]
    examples: dict[str, list[dict]]
    lm: LoadedModel
    builder: PromptBuilder
    label_token_ids: list[int] | None
    timings: dict = field(default_factory=dict)


def prepare(recipe: Recipe) -> Prepared:
    """Load and check everything the run needs; writes nothing."""
    timings = {}
    start = time.perf_counter()
    task = get_task(recipe.task, recipe.eval.verbalizers)
    rows, source = task.load(recipe.data.path)
    split = task.split(rows, recipe.data)
    by_id = {r["id"]: r for r in rows}
    examples = {part: [by_id[i] for i in ids] for part, ids in split.items()}
    examples["train"] = sample(examples["train"], recipe.data.limit_train, recipe.data.seed)
    examples["test"] = sample(examples["test"], recipe.data.limit_test, recipe.data.seed)
    timings["data_s"] = time.perf_counter() - start

    start = time.perf_counter()
    lm = load_model(recipe.model, recipe.dtype)
    timings["model_load_s"] = time.perf_counter() - start
    if hasattr(task, "max_prompt_tokens"):
        task.max_prompt_tokens = recipe.eval.max_prompt_tokens
    builder = PromptBuilder(task, lm.tokenizer, recipe.eval.prompt_format, recipe.eval.shots,
                            shot_pool=examples["train"], seed=recipe.data.seed)
    label_ids = task.label_token_ids(builder, examples["test"][0]) if hasattr(task, "label_token_ids") else None
    return Prepared(recipe, task, source, split, examples, lm, builder, label_ids, timings)


def evaluate_stage(p: Prepared, model, out_dir: Path, head: str = "causal_lm") -> dict:
    cfg = p.recipe.eval
    test = p.examples["test"]
    generate_ids = {ex["id"] for ex in sample(test, cfg.limit_generate, p.recipe.data.seed)}
    start = time.perf_counter()
    extra = {}
    if hasattr(p.task, "calibrate"):  # SQuAD v2: abstention threshold chosen on the validation slice
        extra["na_threshold"] = p.task.calibrate(model, p.builder, p.examples["validation"], cfg.batch_size)
    metrics, records = p.task.evaluate(model, p.builder, test, cfg.protocols, cfg.batch_size, head=head,
                                       generate_ids=generate_ids, **extra)
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    write_json(out_dir / "metrics.json", metrics)
    write_jsonl(out_dir / "predictions.jsonl", records)
    return metrics


def train_stage(p: Prepared, work: Path) -> tuple[torch.nn.Module, dict, str]:
    from tasktune.train import add_lora, fit

    cfg = p.recipe.train
    head = "seqcls" if cfg.objective == "seqcls" else "causal_lm"
    base = load_model(p.recipe.model, p.recipe.dtype, head="seqcls").model if head == "seqcls" else p.lm.model
    base_count = count_parameters(base)["total"]
    torch.manual_seed(cfg.seed)  # LoRA initialisation
    model = add_lora(base, cfg, cfg.objective)
    params = count_parameters(model)
    features = p.task.train_features(p.builder, p.examples["train"], cfg.objective, cfg.max_length,
                                     p.label_token_ids)
    val_features = features[:1]  # the Trainer wants an eval set; validation runs through `validate`

    def validate(m):
        return p.task.validation_metrics(m, p.builder, p.examples["validation"], p.recipe.eval.batch_size,
                                         head=head)

    summary = fit(model, p.lm.tokenizer, features, val_features, cfg, work / "train", cfg.objective, validate,
                  p.task.metric_for_best, p.label_token_ids)
    model.save_pretrained(work / "adapter")  # safetensors
    summary["parameters"] = params
    summary["base_parameters_before_lora"] = base_count
    return model, summary, head


def run(recipe: Recipe, overwrite: bool = False, train_only: bool = False) -> Path:
    p = prepare(recipe)
    with StagingDir(recipe.run_dir, overwrite=overwrite) as work:
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        write_json(work / "split.json", {"source": p.source, "seed": recipe.data.seed,
                                         **{k: v for k, v in p.split.items()},
                                         "limited": {k: [e["id"] for e in v] for k, v in p.examples.items()}})
        base_params = count_parameters(p.lm.model)
        zeroshot = None
        if not train_only:
            print(f"[tasktune] zero-shot evaluation on {len(p.examples['test'])} test examples")
            zeroshot = evaluate_stage(p, p.lm.model, work / "zeroshot")
            print(f"[tasktune] zero-shot  {p.task.summary(zeroshot)}")
        start = time.perf_counter()
        model, training, head = train_stage(p, work)
        p.timings["train_s"] = time.perf_counter() - start
        finetuned = None
        merged = merge_for_inference(model)
        start = time.perf_counter()
        write_json(work / "params.json", parameter_report(p.lm.path, work / "adapter",
                                                                training["base_parameters_before_lora"], merged))
        p.timings["params_s"] = time.perf_counter() - start
        if not train_only:
            print(f"[tasktune] fine-tuned evaluation on {len(p.examples['test'])} test examples")
            finetuned = evaluate_stage(p, merged, work / "finetuned", head=head)
            print(f"[tasktune] fine-tuned {p.task.summary(finetuned)}")
        from tasktune.report import write_report

        write_report(work, recipe=recipe, prepared=p, zeroshot=zeroshot, finetuned=finetuned,
                     training=training, base_params=base_params, versions=versions())
    print(f"[tasktune] wrote {recipe.run_dir}")
    return recipe.run_dir

