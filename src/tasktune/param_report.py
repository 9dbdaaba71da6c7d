"""The `params` stage: counts, ΔW statistics of the method and the frozen-weights check, written to params.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tasktune.lora_delta import frozen_check
from tasktune.methods import adapter_base_quantization, saved_method
from tasktune.errors import TasktuneError
from tasktune.models import count_parameters
from tasktune.rundir import write_json


def parameter_report(base_path: str, adapter_dir: Path, base_count: int, merged_model) -> dict:
    """`base_count`: parameters of the model before LoRA was added (with its fresh head for seqcls);
    `merged_model`: the adapted model after `merge_and_unload` (in memory, any dtype)."""
    method = saved_method(adapter_dir)
    analysis = method.analyse(base_path, adapter_dir)
    merged = count_parameters(merged_model)["total"]
    if merged != base_count:
        raise AssertionError(f"merged model has {merged:,} parameters, base has {base_count:,}: merging must "
                             "not change the parameter count")
    modules = {m["module"] for m in analysis["modules"]}
    if method.whole_model:  # every weight was trained: any may differ from the base
        modules = {name.rsplit(".", 1)[0] for name in merged_model.state_dict()}
    reference = None
    if adapter_base_quantization(adapter_dir):
        # QLoRA: the merged model's base is the dequantized 4-bit base; that, not the original weights, is what
        # must be unchanged outside the targets.
        from tasktune.models import load_model

        dtype = next(merged_model.parameters()).dtype
        reference = load_model(base_path, {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32"),
                               quantization="nf4-dequantized").model.state_dict()
    frozen = frozen_check(merged_model, base_path, modules, reference=reference)
    trained = analysis["adapter"]["parameters"]
    return {"counts": {"base": base_count, "merged": merged, "merged_equals_base": merged == base_count,
                       "adapter": trained, "adapter_share": trained / base_count},
            "frozen": frozen, "analysis": analysis}


def params_for_run(run_dir: Path) -> dict:
    """Recompute params.json for an existing run directory (`tasktune params RUN_DIR`)."""
    from tasktune.infer import merge_for_inference
    from tasktune.models import load_adapted_model
    from tasktune.run_layout import RunLayout

    layout = RunLayout(run_dir)
    if not layout.report.is_file() or not layout.adapter.is_dir():
        raise TasktuneError(f"{run_dir} is not a finished tasktune run (needs report.json and adapter/)")
    report = json.loads(layout.report.read_text())
    adapted = load_adapted_model(layout.adapter, report["model"], report["config"].get("dtype", "auto"),
                                 num_labels=len(report["protocol"].get("labels") or [0, 1]))
    merged = merge_for_inference(adapted.model)
    params = parameter_report(adapted.lm.path, layout.adapter, adapted.base_parameters, merged)
    write_json(layout.params, params)
    return params
