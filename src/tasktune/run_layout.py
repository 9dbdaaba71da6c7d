"""Every path of a run directory, named once, and how to read what a finished run saved beside its weights
(`models.load_adapted_model` loads them).

    runs/NAME/
      recipe.yaml  stages.json  fingerprint.json  split.json  task.yaml  run.json  memory.json  run.log
      zeroshot/{metrics.json, predictions.jsonl}     finetuned/{metrics.json, predictions.jsonl}
         .../cost/{perplexity.jsonl, controls/NAME/{metrics.json, predictions.jsonl, task.yaml}}
      adapter/{adapter_config.json, adapter_model.safetensors}   the trained weights: a peft adapter, and
              [tasktune_base.json]: how they relate to the base (QLoRA: its 4-bit base; PiSSA: converted), or
              {model.safetensors, tasktune_base.json}: `full`, every weight of the fine-tuned model
      train/{summary.json, log_history.json, checkpoints/, tensorboard/}
      params.json  report.json  report.md  report.html  plots/
      [shipped/{TYPE/{model-TYPE.gguf | adapter-f32.gguf, Modelfile, eval/}, shipped.json}]   export.gguf's files,
              each run by llama.cpp on the test split
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
    shipped = property(lambda self: self.root / "shipped")  # export.gguf: shipped/{TYPE/, shipped.json}

    STAGES = ("zeroshot", "finetuned")

    def finished_paths(self, trained: bool = False) -> tuple[Path, ...]:
        """What a finished run holds (with `trained`, also its trained weights and training summary)."""
        return (self.recipe, self.stages, self.report) + ((self.adapter, self.summary) if trained else ())

    def rendered_names(self) -> tuple[str, ...]:
        """What `report.render` rewrites, relative to the run directory (a folder ends in /)."""
        return (self.report_md.name, self.report_html.name, self.plots.name + "/")

    @classmethod
    def top_level_names(cls) -> frozenset[str]:
        """Every file and folder tasktune writes at the top of a run directory (what ownership calls the run's)."""
        layout = cls(Path("/run"))
        paths = [value.fget(layout) for value in vars(cls).values() if isinstance(value, property)]
        return frozenset({p.relative_to(layout.root).parts[0] for p in paths} | set(cls.STAGES))

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

    @staticmethod
    def perplexity_records(folder: Path) -> Path:
        """An evaluation stage's per-document NLL on held-out text (`eval.perplexity`)."""
        return Path(folder) / "cost" / "perplexity.jsonl"

    @staticmethod
    def controls(folder: Path) -> Path:
        """An evaluation stage's control tasks (`eval.controls`), one folder each: metrics.json,
        predictions.jsonl and the task.yaml it was read from."""
        return Path(folder) / "cost" / "controls"


def read_jsonl(path: Path, missing_ok: bool = False) -> list[dict]:
    """The records of a JSON-lines file tasktune wrote (blank lines skipped); [] for a missing file only when
    `missing_ok`."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


ADAPTER_BASE = "tasktune_base.json"  # beside the trained weights; peft ignores it
FULL_WEIGHTS = "model.safetensors"   # `full`: the whole fine-tuned model, saved by safetensors' save_model
