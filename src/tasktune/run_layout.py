"""Every path of a run directory, named once, and the one way to load a finished run's adapted model.

    runs/NAME/
      recipe.yaml  stages.json  fingerprint.json  split.json  task.yaml  run.json  memory.json  run.log
      zeroshot/{metrics.json, predictions.jsonl}     finetuned/{metrics.json, predictions.jsonl}
      adapter/{adapter_config.json, adapter_model.safetensors[, tasktune_base.json: a QLoRA adapter's 4-bit base]}
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


BASE_QUANTIZATION = "tasktune_base.json"  # beside a QLoRA adapter: {"quantization": "nf4"}; peft ignores it


def adapter_base_quantization(adapter_dir: Path) -> str | None:
    """How the adapter's base was quantized for training (`nf4` for QLoRA), else None."""
    from tasktune.errors import TasktuneError

    path = Path(adapter_dir) / BASE_QUANTIZATION
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("quantization")
    if value != "nf4":
        raise TasktuneError(f"{path}: quantization must be \"nf4\", got {value!r}")
    return value


def adapter_head(adapter_dir: Path) -> str:
    """`seqcls` for an adapter saved with a classification head, else `causal_lm`."""
    from tasktune.errors import TasktuneError

    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        raise TasktuneError(f"{adapter_dir} is not a LoRA adapter directory (no adapter_config.json)")
    return "seqcls" if json.loads(config.read_text()).get("task_type") == "SEQ_CLS" else "causal_lm"


@dataclass
class AdaptedModel:
    model: object          # the base wrapped with the run's adapter (peft)
    head: str              # causal_lm | seqcls
    lm: object | None      # the LoadedModel of the base, when this call loaded it
    base_parameters: int   # the base's parameter count before the adapter was added


def load_adapted_model(adapter_dir: Path, model: str, dtype: str, num_labels: int = 2, base=None,
                       trust_remote_code: bool = False) -> AdaptedModel:
    """A finished run's model: its base (loaded here, or `base` when a causal-LM base is already loaded; a
    seqcls head always loads its own) with the run's adapter, the one way every command loads it."""
    from peft import PeftModel

    from tasktune.models import count_parameters, load_model

    head = adapter_head(adapter_dir)
    quantized = adapter_base_quantization(adapter_dir)
    lm = None
    if base is None or head == "seqcls" or quantized:
        # A QLoRA adapter goes onto the 4-bit base it was trained on, dequantized (then merged like LoRA).
        lm = load_model(model, dtype, head=head, num_labels=num_labels, trust_remote_code=trust_remote_code,
                        quantization=f"{quantized}-dequantized" if quantized else None)
        base = lm.model
    count = count_parameters(base)["total"]
    return AdaptedModel(PeftModel.from_pretrained(base, adapter_dir), head, lm, count)
