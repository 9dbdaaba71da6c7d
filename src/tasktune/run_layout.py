"""Every path of a run directory, named once, and the one way to load a finished run's adapted model.

    runs/NAME/
      recipe.yaml  stages.json  fingerprint.json  split.json  task.yaml  run.json  memory.json  run.log
      zeroshot/{metrics.json, predictions.jsonl}     finetuned/{metrics.json, predictions.jsonl}
      adapter/{adapter_config.json, adapter_model.safetensors}   the trained weights: a peft adapter, and
              [tasktune_base.json]: how they relate to the base (QLoRA: its 4-bit base; PiSSA: converted), or
              {model.safetensors, tasktune_base.json}: `full`, every weight of the fine-tuned model
      train/{summary.json, log_history.json, checkpoints/, tensorboard/}
      params.json  report.json  report.md  report.html  plots/
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    recipe = property(lambda self: self.root / "recipe.yaml")
    stages = property(lambda self: self.root / "stages.json")
    fingerprint = property(lambda self: self.root / "fingerprint.json")
    split = property(lambda self: self.root / "split.json")
    task_spec = property(lambda self: self.root / "task.yaml")
    facts = property(lambda self: self.root / "run.json")
    memory = property(lambda self: self.root / "memory.json")
    log = property(lambda self: self.root / "run.log")
    adapter = property(lambda self: self.root / "adapter")
    adapter_config = property(lambda self: self.root / "adapter" / "adapter_config.json")
    train = property(lambda self: self.root / "train")
    summary = property(lambda self: self.root / "train" / "summary.json")
    log_history = property(lambda self: self.root / "train" / "log_history.json")
    checkpoints = property(lambda self: self.root / "train" / "checkpoints")
    params = property(lambda self: self.root / "params.json")
    report = property(lambda self: self.root / "report.json")
    report_md = property(lambda self: self.root / "report.md")
    report_html = property(lambda self: self.root / "report.html")
    plots = property(lambda self: self.root / "plots")

    def stage(self, name: str) -> Path:
        """zeroshot/ or finetuned/: an evaluation stage's folder."""
        return self.root / name

    def stage_metrics(self, name: str) -> Path:
        return self.metrics(self.stage(name))

    def stage_predictions(self, name: str) -> Path:
        return self.predictions(self.stage(name))

    @staticmethod
    def metrics(folder: Path) -> Path:
        return Path(folder) / "metrics.json"

    @staticmethod
    def predictions(folder: Path) -> Path:
        return Path(folder) / "predictions.jsonl"


ADAPTER_BASE = "tasktune_base.json"  # beside the trained weights; peft ignores it
FULL_WEIGHTS = "model.safetensors"   # `full`: the whole fine-tuned model, saved by safetensors' save_model
# What ADAPTER_BASE may say: QLoRA's 4-bit base ({"quantization": "nf4"} alone before commit bdb1bbc), a PiSSA
# adapter converted to plain LoRA on the original base, a full fine-tune's head.
_ADAPTER_BASE_KEYS = {"method": str, "quantization": str, "trained_rank": int, "head": str}


def read_adapter_base(adapter_dir: Path) -> dict:
    """The ADAPTER_BASE record beside a run's trained weights ({} for a plain peft adapter), checked."""
    from tasktune.errors import TasktuneError

    path = Path(adapter_dir) / ADAPTER_BASE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TasktuneError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise TasktuneError(f"{path}: expected a JSON object, got {type(record).__name__}")
    for key, value in record.items():
        expected = _ADAPTER_BASE_KEYS.get(key)
        if expected is None or type(value) is not expected:
            raise TasktuneError(f"{path}: key {key!r} is not one of {sorted(_ADAPTER_BASE_KEYS)} with its type "
                                f"(got {value!r})")
    checks = {"quantization": ("nf4",), "method": ("qlora", "pissa", "full"), "head": ("causal_lm", "seqcls")}
    for key, allowed in checks.items():
        if key in record and record[key] not in allowed:
            raise TasktuneError(f"{path}: {key} must be one of {list(allowed)}, got {record[key]!r}")
    if record.get("method") == "full" and "head" not in record:
        raise TasktuneError(f"{path}: a full fine-tune's record needs its head (causal_lm or seqcls)")
    return record


def adapter_base_quantization(adapter_dir: Path) -> str | None:
    """How the adapter's base was quantized for training (`nf4` for QLoRA), else None."""
    return read_adapter_base(adapter_dir).get("quantization")


def is_full_fine_tune(adapter_dir: Path) -> bool:
    """The run trained every weight (`full`): adapter/ holds the whole model, not a peft adapter."""
    return read_adapter_base(adapter_dir).get("method") == "full"


def adapter_head(adapter_dir: Path) -> str:
    """`seqcls` for an adapter saved with a classification head, else `causal_lm`."""
    from tasktune.errors import TasktuneError

    record = read_adapter_base(adapter_dir)
    if record.get("method") == "full":
        if not (Path(adapter_dir) / FULL_WEIGHTS).is_file():
            raise TasktuneError(f"{adapter_dir} is a full fine-tune without its weights ({FULL_WEIGHTS})")
        return record["head"]
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        raise TasktuneError(f"{adapter_dir} is not an adapter directory (no adapter_config.json, and no "
                            f"{ADAPTER_BASE} of a full fine-tune)")
    return "seqcls" if json.loads(config.read_text()).get("task_type") == "SEQ_CLS" else "causal_lm"


@dataclass
class AdaptedModel:
    model: object          # the base wrapped with the run's adapter (peft), or the fully fine-tuned model
    head: str              # causal_lm | seqcls
    lm: object | None      # the LoadedModel of the base, when this call loaded it
    base_parameters: int   # the base's parameter count before the adapter was added


def load_adapted_model(adapter_dir: Path, model: str, dtype: str, num_labels: int = 2, base=None,
                       trust_remote_code: bool = False) -> AdaptedModel:
    """A finished run's model: its base (loaded here, or `base` when a causal-LM base is already loaded; a
    seqcls head always loads its own) with the run's adapter, the one way every command loads it. A full
    fine-tune is a base of its own with every weight replaced by the run's."""
    from peft import PeftModel

    from tasktune.models import count_parameters, load_model

    head = adapter_head(adapter_dir)
    record = read_adapter_base(adapter_dir)
    if record.get("method") == "full":
        from safetensors.torch import load_model as load_weights

        lm = load_model(model, dtype, head=head, num_labels=num_labels, trust_remote_code=trust_remote_code)
        count = count_parameters(lm.model)["total"]
        try:
            load_weights(lm.model, Path(adapter_dir) / FULL_WEIGHTS)  # strict: every weight, the same shapes
        except RuntimeError as exc:
            from tasktune.errors import TasktuneError

            reason = " ".join(str(exc).split())[:300]
            raise TasktuneError(f"{Path(adapter_dir) / FULL_WEIGHTS}: the fine-tuned weights do not fit the base "
                                f"model {model!r}: {reason}") from exc
        return AdaptedModel(lm.model, head, lm, count)
    quantized = record.get("quantization")
    lm = None
    if base is None or head == "seqcls" or quantized:
        # A QLoRA adapter goes onto the 4-bit base it was trained on, dequantized (then merged like LoRA).
        lm = load_model(model, dtype, head=head, num_labels=num_labels, trust_remote_code=trust_remote_code,
                        quantization=f"{quantized}-dequantized" if quantized else None)
        base = lm.model
    count = count_parameters(base)["total"]
    return AdaptedModel(PeftModel.from_pretrained(base, adapter_dir), head, lm, count)
