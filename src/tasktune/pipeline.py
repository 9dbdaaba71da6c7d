"""The whole job for one recipe: data → task → model → zero-shot eval → LoRA → same-protocol eval → report.

Everything that can be checked (recipe, data file, model, verbalizers) is checked before the run
directory is created; the directory itself is staged and renamed into place only when complete.
"""

from __future__ import annotations

import json
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tasktune import __version__
from tasktune.config import Recipe
from tasktune.infer import merge_for_inference
from tasktune.models import LoadedModel, count_parameters, load_model
from tasktune.params import parameter_report
from tasktune.rundir import RunDir, sha256_file, write_json, write_jsonl
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
    lm = load_model(recipe.model, recipe.dtype, trust_remote_code=recipe.trust_remote_code)
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
    """LoRA fine-tuning (resuming from a checkpoint when one exists); writes adapter/ and train/summary.json."""
    from tasktune.train import add_lora, fit

    cfg = p.recipe.train
    head = "seqcls" if cfg.objective == "seqcls" else "causal_lm"
    base = base_for_training(p, head)
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
    summary.pop("log_history")
    summary.update(parameters=params, base_parameters_before_lora=base_count, head=head)
    write_json(work / "train" / "summary.json", summary)
    return model, summary, head


def base_for_training(p: Prepared, head: str) -> torch.nn.Module:
    if head == "seqcls":
        return load_model(p.recipe.model, p.recipe.dtype, head="seqcls",
                          trust_remote_code=p.recipe.trust_remote_code).model
    return p.lm.model


def load_trained(p: Prepared, work: Path) -> tuple[torch.nn.Module, dict, str]:
    """The train stage's results when it already finished in an earlier (interrupted) invocation."""
    from peft import PeftModel

    summary = json.loads((work / "train" / "summary.json").read_text())
    model = PeftModel.from_pretrained(base_for_training(p, summary["head"]), work / "adapter")
    return model, summary, summary["head"]


def data_fingerprint(source: str) -> dict:
    """sha256 of every local data file the run read (hub datasets are named, not hashed)."""
    return {path: sha256_file(Path(path)) for path in source.split(", ") if Path(path).is_file()}


def run(recipe: Recipe, overwrite: bool = False, train_only: bool = False) -> Path:
    p = prepare(recipe)
    run_dir = RunDir(recipe.run_dir, recipe.to_dict(), overwrite=overwrite)
    if run_dir.complete:
        print(f"[tasktune] {recipe.run_dir} is already complete for this recipe; nothing to do")
        return recipe.run_dir
    work = run_dir.start()
    if run_dir.resumed:
        print(f"[tasktune] resuming {run_dir.work} (finished stages are kept)")
    if not run_dir.done("split"):
        write_json(work / "split.json", {"source": p.source, "data_sha256": data_fingerprint(p.source),
                                         "seed": recipe.data.seed, **p.split,
                                         "limited": {k: [e["id"] for e in v] for k, v in p.examples.items()}})
        run_dir.mark("split")
    base_params = count_parameters(p.lm.model)
    zeroshot = None
    if not train_only:
        if run_dir.done("zeroshot"):
            zeroshot = json.loads((work / "zeroshot" / "metrics.json").read_text())
        else:
            print(f"[tasktune] zero-shot evaluation on {len(p.examples['test'])} test examples")
            zeroshot = evaluate_stage(p, p.lm.model, work / "zeroshot")
            run_dir.mark("zeroshot")
        print(f"[tasktune] zero-shot  {p.task.summary(zeroshot)}")
    start = time.perf_counter()
    if run_dir.done("train"):
        model, training, head = load_trained(p, work)
    else:
        model, training, head = train_stage(p, work)
        run_dir.mark("train")
    p.timings["train_s"] = training.get("train_runtime_s") or time.perf_counter() - start
    merged = merge_for_inference(model)
    if not run_dir.done("params"):
        start = time.perf_counter()
        write_json(work / "params.json", parameter_report(p.lm.path, work / "adapter",
                                                          training["base_parameters_before_lora"], merged))
        p.timings["params_s"] = time.perf_counter() - start
        run_dir.mark("params")
    finetuned = None
    if not train_only:
        if run_dir.done("finetuned"):
            finetuned = json.loads((work / "finetuned" / "metrics.json").read_text())
        else:
            print(f"[tasktune] fine-tuned evaluation on {len(p.examples['test'])} test examples")
            finetuned = evaluate_stage(p, merged, work / "finetuned", head=head)
            run_dir.mark("finetuned")
        print(f"[tasktune] fine-tuned {p.task.summary(finetuned)}")
    from tasktune.report import write_report

    write_report(work, recipe=recipe, prepared=p, zeroshot=zeroshot, finetuned=finetuned,
                 training=training, base_params=base_params, versions=versions())
    run_dir.finish()
    print(f"[tasktune] wrote {recipe.run_dir}")
    return recipe.run_dir
