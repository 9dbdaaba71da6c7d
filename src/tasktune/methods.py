"""Adaptation methods (`train.method`): how a base model is wrapped for training, and what the parameter
analysis counts for it. One registry; a plug-in adds a method with `register_method`.

Built in, all through peft's LoRA family (an adapter saved beside the frozen base, merged for inference):
- `lora`: low-rank update B·A scaled by alpha / r (the default).
- `dora`: weight-decomposed LoRA: the LoRA update gives the direction, plus one trainable magnitude per output
  row of each target (peft `use_dora`).
- `rslora`: rank-stabilised scaling alpha / sqrt(r) (peft `use_rslora`), for larger ranks.
- `none`: no training, in a sweep only: the base model with `eval.shots` examples in the prompt, ranked on the
  same validation slice, so "does fine-tuning beat prompting" is answered in the same table.

Not built in yet (the analysis and the sweep's reuse of one base assume a frozen base and an A·B adapter):
full fine-tuning, IA3, PiSSA (which rewrites the base weights at initialisation) and QLoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tasktune.errors import TasktuneError


@dataclass(frozen=True)
class Method:
    name: str
    lora_options: dict = field(default_factory=dict)   # extra peft LoraConfig arguments
    magnitude_vectors: bool = False                      # DoRA: one trainable vector of out-features per target
    trains: bool = True                                  # False: `none`, prompting only (sweeps)
    description: str = ""

    def peft_config(self, train_cfg, seqcls: bool):
        from peft import LoraConfig, TaskType

        return LoraConfig(
            r=train_cfg.lora_r, lora_alpha=train_cfg.lora_alpha, lora_dropout=train_cfg.lora_dropout,
            target_modules=list(train_cfg.target_modules), bias="none",
            # SEQ_CLS makes peft train and save the fresh `score` head with the adapter (modules_to_save).
            task_type=TaskType.SEQ_CLS if seqcls else TaskType.CAUSAL_LM, **self.lora_options)

    def expected_parameters(self, r: int, shapes: list[tuple[int, int]]) -> int:
        """The trainable count its formula gives for these target weight shapes (out, in)."""
        return sum(r * (out + inp) + (out if self.magnitude_vectors else 0) for out, inp in shapes)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise TasktuneError(f"train.method {name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]


for _method in (
    Method("lora", description="low-rank update B·A × alpha/r on the target projections"),
    Method("dora", {"use_dora": True}, magnitude_vectors=True,
           description="weight-decomposed LoRA: LoRA direction plus a trainable magnitude per output row"),
    Method("rslora", {"use_rslora": True}, description="LoRA with rank-stabilised scaling alpha/sqrt(r)"),
    Method("none", trains=False, description="no training: the base model prompted with eval.shots examples, so "
                                             "k-shot prompting competes with fine-tuning in a sweep"),
):
    register_method(_method)
