"""The `params` stage: counts, LoRA ΔW statistics and the frozen-weights check, written to params.json."""

from __future__ import annotations

import json
from pathlib import Path

from tasktune.lora_delta import analyse, frozen_check
from tasktune.errors import TasktuneError
from tasktune.models import count_parameters
from tasktune.rundir import write_json


def parameter_report(base_path: str, adapter_dir: Path, base_count: int, merged_model) -> dict:
    """`base_count`: parameters of the model before LoRA was added (with its fresh head for seqcls);
    `merged_model`: the adapted model after `merge_and_unload` (in memory, any dtype)."""
    analysis = analyse(base_path, adapter_dir)
    merged = count_parameters(merged_model)["total"]
    if merged != base_count:
        raise AssertionError(f"merged model has {merged:,} parameters, base has {base_count:,}: merging must "
                             "not change the parameter count")
    modules = {m["module"] for m in analysis["modules"]}
    frozen = frozen_check(merged_model, base_path, modules)
    return {"counts": {"base": base_count, "merged": merged, "merged_equals_base": merged == base_count,
                       "lora": analysis["lora"]["parameters"], "lora_share": analysis["lora"]["parameters"] / base_count},
            "frozen": frozen, "analysis": analysis}


def params_for_run(run_dir: Path) -> dict:
    """Recompute params.json for an existing run directory (`tasktune params RUN_DIR`)."""
    from peft import PeftModel

    from tasktune.infer import merge_for_inference
    from tasktune.models import load_model

    run_dir = Path(run_dir)
    report_path, adapter = run_dir / "report.json", run_dir / "adapter"
    if not report_path.is_file() or not (adapter / "adapter_config.json").is_file():
        raise TasktuneError(f"{run_dir} is not a finished tasktune run (needs report.json and adapter/)")
    report = json.loads(report_path.read_text())
    seqcls = json.loads((adapter / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
    lm = load_model(report["model"], report["config"].get("dtype", "auto"), head="seqcls" if seqcls else "causal_lm",
                    num_labels=len(report["protocol"].get("labels") or [0, 1]))
    base_count = count_parameters(lm.model)["total"]
    merged = merge_for_inference(PeftModel.from_pretrained(lm.model, adapter))
    params = parameter_report(lm.path, adapter, base_count, merged)
    write_json(run_dir / "params.json", params)
    return params
