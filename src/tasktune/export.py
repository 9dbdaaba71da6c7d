"""Export a run as an adapter-only or merged model with a Hugging Face model card, and optionally push it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from tasktune.errors import TasktuneError
from tasktune.report import task_of_run
from tasktune.rundir import StagingDir, require_finished_run

HUB_TASK_TYPES = {"classification": ("text-classification", "Text Classification"),
                  "extractive_qa": ("question-answering", "Question Answering")}


def dataset_of(report: dict, task) -> tuple[str, str]:
    """(type, name) of the model-index dataset: the hub id when the data came from the hub or is the embedded copy
    of the task's hub dataset; otherwise the local file, named as such."""
    origin = report["data"].get("origin", "path")
    if task.spec.data.hub and origin in ("hub", "embedded"):
        return task.spec.data.hub, f"{task.name} ({origin})"
    return task.name, f"local file {Path(report['data']['source'].split(', ')[0]).name}"


# Models tasktune loads from PyPI packages, and the hub repository they were converted from.
ALIAS_HUB_IDS = {"gemma3-270m": "google/gemma-3-270m"}


def hub_id_of(model: str) -> str | None:
    """The hub id for `base_model` metadata; None for local paths, which mean nothing to the hub."""
    if model in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[model]
    if Path(model).expanduser().exists() or model.endswith(".gguf") or model.count("/") != 1:
        return None
    return model


def model_index(report: dict, name: str, task) -> list[dict]:
    task_type, task_name = HUB_TASK_TYPES[task.type]
    dataset_type, dataset_name = dataset_of(report, task)
    ft = report.get("finetuned") or {}
    metrics = []
    if task.type == "classification":
        protocol = "score" if "score" in ft else "classifier"
        for key in ("accuracy", "f1", "precision", "recall"):
            if key in ft.get(protocol, {}):
                metrics.append({"type": key, "value": round(ft[protocol][key], 4),
                                "name": f"{key} ({protocol} protocol, {'weighted' if key != 'accuracy' else 'test split'})"})
    else:
        for key in ("exact", "f1", "HasAns_f1", "NoAns_f1"):
            if key in ft:
                metrics.append({"type": key, "value": round(ft[key], 2), "name": f"{task.name} {key} (greedy, raw)"})
    return [{"name": name, "results": [{"task": {"type": task_type, "name": task_name},
                                         "dataset": {"name": dataset_name, "type": dataset_type,
                                                     "split": "tasktune 80:20 test split"},
                                         "metrics": metrics}]}]


def model_card(report: dict, name: str, merged: bool, task) -> str:
    dataset_type, _ = dataset_of(report, task)
    meta = {
        "library_name": "transformers" if merged else "peft",
        "base_model": hub_id_of(report["model"]),
        "tags": ["tasktune", "lora", task.name] + ([] if merged else ["peft"]),
        "datasets": [dataset_type] if dataset_type != task.name else None,
        "model-index": model_index(report, name, task),
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    cfg = report["config"]
    zs, ft = report.get("zeroshot") or {}, report.get("finetuned") or {}
    from tasktune.report import comparison_table
    body = [
        f"# {name}", "",
        f"{'Merged LoRA fine-tune' if merged else 'LoRA adapter'} of `{report['model']}` for {report['task']}, made "
        "with [tasktune](https://pypi.org/project/tasktune/).", "",
        "## Results (same test split and protocol before and after fine-tuning)", "",
        comparison_table(task, zs, ft),
        "## Training", "",
        f"- data: `{report['data']['source']}` ({report['data'].get('train')} training examples, split seed "
        f"{cfg['data']['seed']})",
        f"- objective `{cfg['train']['objective']}`, LoRA r={cfg['train']['lora_r']} alpha={cfg['train']['lora_alpha']} "
        f"dropout={cfg['train']['lora_dropout']} on {', '.join(cfg['train']['target_modules'])}",
        f"- AdamW lr {cfg['train']['learning_rate']} ({cfg['train']['lr_scheduler']}), batch {cfg['train']['batch_size']}"
        f" × {cfg['train']['grad_accum']}, {report['training'].get('global_step')} steps, dtype {report['dtype']}",
        "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", "",
        "## Intended use", "",
        f"Research and demonstration of task adaptation for {report['task']} in English, with the prompt recorded "
        "in the report (the model expects the same prompt format).", "",
        "## Limitations", "",
        "- Trained and evaluated on one split of one dataset: expect lower figures on other domains.",
        "- Small base models make confident mistakes; do not use for decisions about people.",
        f"- The base model's licence and terms of use apply ({report['model']}).", "",
    ]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + "\n".join(body)


def export_run(run_dir: Path, out: Path, merge: bool = False, overwrite: bool = False) -> Path:
    from tasktune.models import load_model

    run_dir = require_finished_run(Path(run_dir), needs=("report.json", "adapter/adapter_config.json"))
    adapter = run_dir / "adapter"
    staging = StagingDir(Path(out), overwrite=overwrite, kind="export")  # refuse a bad --out before loading
    report = json.loads((run_dir / "report.json").read_text())
    seqcls = json.loads((adapter / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
    # Merging happens in the float weights the run used (GGUF models are dequantized at conversion).
    lm = load_model(report["model"], report["dtype"], head="seqcls" if seqcls else "causal_lm",
                    num_labels=len(report["protocol"].get("labels") or [0, 1]))
    with staging as work:
        if merge:
            from peft import PeftModel

            model = PeftModel.from_pretrained(lm.model, adapter).merge_and_unload()
            model.save_pretrained(work, safe_serialization=True)
        else:
            for file in adapter.iterdir():
                if file.name != "README.md":
                    shutil.copy2(file, work / file.name)
            if getattr(lm.model, "generation_config", None) is not None:
                lm.model.generation_config.save_pretrained(work)
        lm.tokenizer.save_pretrained(work)
        (work / "tasktune_report.json").write_text(json.dumps(report, indent=1))
        name = Path(out).name
        (work / "README.md").write_text(model_card(report, name, merge, task_of_run(run_dir, report)),
                                        encoding="utf-8")
    return Path(out)


def push(folder: Path, repo_id: str) -> str:
    """Upload an export; the token comes from HF_TOKEN / the hub login and is never printed or written."""
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=os.environ.get("HF_TOKEN") or None)
        api.create_repo(repo_id, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                 commit_message="Upload tasktune export", ignore_patterns=[".tasktune"])
    except Exception as exc:
        message = str(exc)
        token = os.environ.get("HF_TOKEN")
        if token:
            message = message.replace(token, "***")
        raise TasktuneError(f"could not push {folder} to the Hugging Face Hub as {repo_id!r} (offline, no token, "
                            f"or no write access?); the export in {folder} is intact: {message}") from None
    return str(getattr(info, "commit_url", repo_id))
