"""What a run ships, measured: the run's model written as GGUF (the adaptation merged, or llama.cpp's LoRA adapter
for the base GGUF) and each file run by llama.cpp on the run's test split with the run's own requests, paired with
the adapter's predictions on the same rows.

Two ways in, one code path: `tasktune export RUN --gguf TYPE [--eval]` (an export folder, its card's "Shipped as"
table) and a recipe's `export.gguf: [TYPES]` (the run's last stage: `shipped/` in the run, and the "Shipped as"
table in its report, `shipped_report.py`). The refusals are `gguf_export.check_export`."""

from __future__ import annotations

import json
from pathlib import Path


def check_run_can_ship(p) -> None:
    """A recipe's export.gguf once the run is prepared (before training): the objective as chosen, and the
    architecture from the model's config."""
    from tasktune import gguf_export

    for gguf_type in p.recipe.export.gguf:
        gguf_export.check_export(gguf_type, head=p.adaptation.head, method=p.adaptation.method,
                                 base_model=p.recipe.model, evaluate=True)
    gguf_export.architecture_of(p.lm.model.config)


def file_name(gguf_type: str) -> str:
    return "adapter-f32.gguf" if gguf_type == "adapter" else f"model-{gguf_type}.gguf"


def write_gguf(adapted, base_path: Path | None, folder: Path, gguf_type: str):
    """The file of one GGUF type in `folder` (the caller's staging folder), and an Ollama Modelfile beside it;
    returns gguf_export's `Written`."""
    from tasktune import gguf_export
    from tasktune.infer import merge_for_inference
    from tasktune.rundir import write_text

    name = file_name(gguf_type)
    if gguf_type == "adapter":
        written = gguf_export.write_adapter(adapted.model, folder / name)
    elif gguf_type in gguf_export.LLAMA_CPP_TYPES:  # f16 first, quantized by llama.cpp, then removed
        f16 = gguf_export.write_model(merge_for_inference(adapted.model), base_path, folder / "f16.tmp.gguf", "f16")
        written = gguf_export.quantize_with_llama_cpp(f16, folder / name, gguf_type)
    else:
        written = gguf_export.write_model(merge_for_inference(adapted.model), base_path, folder / name, gguf_type)
    stop = [adapted.lm.tokenizer.eos_token] if adapted.lm.tokenizer.eos_token else []
    write_text(folder / "Modelfile", gguf_export.modelfile(name, gguf_type == "adapter", stop))
    return written


def evaluated_tokens(p) -> int:
    """The positions the run's test requests make a model read (each prompt plus what is scored or generated, at
    most the generation budget): the numerator of a protocol's tokens/s."""
    return sum(r.positions for protocol in p.task.protocols(p.recipe.eval.protocols)
               for r in p.task.requests(p.builder, p.examples["test"], protocol)[0])


def measure_file(p, run_dir: Path, folder: Path, file: Path, base_path: Path | None, gguf_type: str) -> dict:
    """The file run by llama.cpp on the run's test split (into folder/eval), and what a "Shipped as" table shows:
    each report column's figure with its interval beside the adapter's, how often their decisions agree, the
    paired test of the file against the adapter, the tokenizer agreement, size and speed."""
    from tasktune.run_layout import RunLayout
    from tasktune.stages import evaluate_gguf_stage

    model, adapter = (base_path, file) if gguf_type == "adapter" else (file, None)
    (folder / "eval").mkdir()
    metrics = evaluate_gguf_stage(p, folder / "eval", model, adapter, {"run": str(run_dir), "rows": "test split"},
                                  against=run_dir)
    finetuned = json.loads(RunLayout(run_dir).stage_metrics("finetuned").read_text())
    comparison = metrics["against_adapter"]
    rows = []
    for column, _ in p.task.report_columns(metrics):
        shipped, adapter_figure = p.task.figure(metrics, column), p.task.figure(finetuned, column)
        agree = comparison["agreement"].get(column)
        rows.append({"column": column, "metric": shipped["metric"], "n": shipped["n"], "value": shipped["value"],
                     "interval": shipped["interval"], "adapter": adapter_figure["value"],
                     "adapter_interval": adapter_figure["interval"],
                     "agreement": agree["same"] / agree["n"] if agree else None,
                     "paired": comparison["paired"].get(column)})
    tokens = evaluated_tokens(p)
    return {"type": gguf_type, "file": file.name, "bytes": file.stat().st_size,
            "base": p.recipe.model if gguf_type == "adapter" else None, "runtime": "llama.cpp", "rows": rows,
            "tokenizer_agreement": {k: v for k, v in metrics["tokenizer_agreement"].items() if k != "differ"},
            "seconds": metrics["seconds"], "tokens_per_s": round(tokens / metrics["seconds"], 1),
            "adapter_seconds": finetuned.get("seconds"),
            "adapter_tokens_per_s": round(tokens / finetuned["seconds"], 1) if finetuned.get("seconds") else None,
            "adapter_device": finetuned.get("device")}


def shipped_stage(p, run_dir: Path) -> list[dict]:
    """A run's `export.gguf`: each type written to shipped/TYPE/ in the (unfinished, locked) run directory and
    measured there; shipped/shipped.json holds the rows the report's table reads. The stage writes into a hidden
    folder of its own and renames it into place when every type is done, so an interrupted stage leaves no
    half-written shipped/ (its folder is removed on any error; the rename is atomic)."""
    import os
    import shutil
    import tempfile

    from tasktune.atomic import fsync_dir, umask
    from tasktune.models import base_gguf, load_adapted_model
    from tasktune.run_layout import RunLayout
    from tasktune.rundir import write_json

    layout = RunLayout(run_dir)
    if (layout.shipped / "shipped.json").is_file():  # renamed into place just before an interruption
        return json.loads((layout.shipped / "shipped.json").read_text())
    # Named as an atomic write's leftover of `shipped` (.shipped.XXXX.tmp), which a resumed run accepts.
    staging = Path(tempfile.mkdtemp(prefix=f".{layout.shipped.name}.", suffix=".tmp", dir=run_dir))
    try:
        staging.chmod(0o777 & ~umask())  # mkdtemp's 0700, made what any other folder of the run gets
        shipped = []
        with base_gguf(p.recipe.model) as base_path:
            for gguf_type in p.recipe.export.gguf:
                print(f"[tasktune] shipping as GGUF {gguf_type}: written, then run by llama.cpp on the test split")
                folder = staging / gguf_type
                folder.mkdir()
                adapted = load_adapted_model(layout.adapter, p.recipe.model, p.recipe.dtype,
                                             num_labels=p.task.seqcls_labels(),
                                             trust_remote_code=p.recipe.trust_remote_code)  # merging is in place
                written = write_gguf(adapted, base_path, folder, gguf_type)
                del adapted
                row = measure_file(p, run_dir, folder, written.path, base_path, gguf_type)
                shipped.append({**row, "file": f"{gguf_type}/{written.path.name}"})
        write_json(staging / "shipped.json", shipped)
        os.replace(staging, layout.shipped)
        fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # made just above, with a unique name
        raise
    return shipped
