"""The training losses, one per objective (`train.objective`), for any number of labels.

- `verbalizer`: hidden state of the last prompt token × the LM-head rows of the labels' verbalizers,
  cross-entropy over the labels. Full-vocabulary logits are never materialised.
- `label_lm`: the same loss value as `lm` (full-vocabulary cross-entropy on the label token), with the LM head
  applied at the last prompt position only: the model keeps *writing* the label word, which `verbalizer`
  (a contrast between the labels) does not teach.
- `lm`: causal-LM loss on the verbalizer's tokens only (the objective for multi-token verbalizers): the same
  value as the model's own forward with `labels` (what most tutorials do), with the LM head applied at the
  labelled positions only, not at every position of the prompt (for Gemma 3, 262,144 logits per position).
- `seqcls`: a fresh classification head (`AutoModelForSequenceClassification`), saved with the adapter.
- `answer` (extractive QA): LM loss on the answer tokens only, with the LM head applied at those positions only.

Mixed precision for the adapter lives here too (`adapter_input_casting_off`, `adapter_autocast`): it decides
what dtype the loss is computed in.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from tasktune.infer import head_logits, last_hidden_state, unwrap


def _last_position_logits(model, batch: dict, rows: list[int] | None) -> torch.Tensor:
    """LM-head logits at each row's last prompt position, for the vocabulary `rows` (all when None)."""
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    if _data_parallel(model):
        # DDP synchronises gradients only through its own forward, so the loss goes through the model's
        # forward, with LM-head logits for the last position only.
        last = torch.tensor([ids.shape[1] - 1], device=ids.device)  # an index tensor: contiguous gather
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=last,
                       use_cache=False).logits[:, -1]
        return logits if rows is None else logits[:, rows]
    return head_logits(model, last_hidden_state(model, ids, mask), rows=rows)


def verbalizer_loss(model, batch: dict, label_token_ids: list[int]) -> torch.Tensor:
    """Cross-entropy over the labels' verbalizer rows of the LM head (one class id per row in `labels`)."""
    logits = _last_position_logits(model, batch, label_token_ids)
    return F.cross_entropy(logits.float(), batch["labels"])


def label_lm_loss(model, batch: dict, label_token_ids: list[int]) -> torch.Tensor:
    """Full-vocabulary cross-entropy on the label's verbalizer token, at the last prompt position only."""
    logits = _last_position_logits(model, batch, None)
    targets = torch.tensor(label_token_ids, device=batch["labels"].device)[batch["labels"]]
    return F.cross_entropy(logits.float(), targets)


def target_token_loss(model, batch: dict, label_token_ids=None) -> torch.Tensor:
    """Causal-LM loss over the positions whose next token is labelled, LM head at those positions only (`lm`,
    `answer`)."""
    ids, mask, pos, labels = batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["labels"]
    if _data_parallel(model):
        # As above for DDP: logits only for the window from the first answer position to the end.
        first = int((labels != -100).float().argmax(dim=1).min())
        window = torch.arange(max(first - 1, 0), ids.shape[1] - 1, device=ids.device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=window,
                       use_cache=False).logits.float()
        targets = labels[:, window + 1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    lm = unwrap(model)
    backbone = getattr(lm, lm.base_model_prefix)
    hidden = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = head_logits(model, hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep])


def model_loss(model, batch: dict, label_token_ids=None) -> torch.Tensor:
    """`seqcls`: the model's own forward and loss (class ids for its classification head)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=batch["position_ids"], labels=batch["labels"], use_cache=False).loss


@dataclass(frozen=True)
class Objective:
    """A training objective (`train.objective`): everything the rest of tasktune needs to know about it.
    Which task types it applies to is theirs to declare (`TaskType.objectives`).

    `single_token_verbalizers`: it reads one LM-head row per label, so every verbalizer must be one token.
    `head`: `causal_lm`, or `seqcls` for a fresh classification head trained and saved with the adapter.
    `labels`: what a training feature carries, one class id per row (`class_id`) or the target tokens with
    -100 elsewhere (`tokens`)."""

    name: str
    loss: Callable
    single_token_verbalizers: bool = False
    head: str = "causal_lm"
    labels: str = "class_id"
    description: str = ""


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective, task_types: tuple[str, ...] = ()) -> Objective:
    """Add an objective, and offer it to these task types (a plug-in registers its own the same way): one
    entry, read by config, the task types, the pipeline and the Trainer."""
    from tasktune.tasks.base import task_type

    OBJECTIVES[objective.name] = objective
    for name in task_types:
        kind = task_type(name)
        if objective.name not in kind.objectives:
            kind.objectives = (*kind.objectives, objective.name)
    return objective


def get_objective(name: str) -> Objective:
    from tasktune.errors import TasktuneError

    if name not in OBJECTIVES:
        raise TasktuneError(f"train.objective {name!r} is not one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def objectives_for(task_type_name: str) -> list[str]:
    from tasktune.tasks.base import task_type

    return [name for name in task_type(task_type_name).objectives if name in OBJECTIVES]


for _objective in (
    Objective("verbalizer", verbalizer_loss, single_token_verbalizers=True,
              description="last prompt token x the labels' LM-head rows, cross-entropy over the labels"),
    Objective("label_lm", label_lm_loss, single_token_verbalizers=True,
              description="full-vocabulary cross-entropy on the label token, LM head at the last position only"),
    Objective("lm", target_token_loss, labels="tokens",
              description="causal-LM loss on the verbalizer's tokens (multi-token verbalizers), LM head at those "
                          "positions only"),
    Objective("seqcls", model_loss, head="seqcls",
              description="a sequence-classification head trained with the adapter"),
    Objective("answer", target_token_loss, labels="tokens",
              description="LM loss on the answer tokens, LM head at those positions only"),
):
    OBJECTIVES[_objective.name] = _objective


def objective_loss(model, batch: dict, objective: Objective | str, label_token_ids: list[int] | None = None
                   ) -> torch.Tensor:
    """The training loss of `objective` (resolved, or its name: benchmarks and tests) for one collated batch."""
    resolved = get_objective(objective) if isinstance(objective, str) else objective
    return resolved.loss(model, batch, label_token_ids)


def _data_parallel(model) -> bool:
    """Wrapped by DDP or FSDP (accelerate launch / torchrun): the loss must go through the wrapper's forward."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, (torch.nn.parallel.DistributedDataParallel, FullyShardedDataParallel))


def _bf16_base_device(model) -> str | None:
    """The device type of a bf16 base model (DDP wrappers and peft unwrapped), else None."""
    base = unwrap(getattr(model, "module", model))  # DDP wraps the peft model in `.module`
    embeddings = base.get_input_embeddings()
    if embeddings is None or embeddings.weight.dtype != torch.bfloat16:
        return None
    return embeddings.weight.device.type


# Mixed precision for the adapter. peft casts every LoRA input up to the adapter's fp32 and keeps that copy, and
# an fp32 output, for backward: with a bf16 base that is most of a step's activation memory. With that cast
# switched off and the forward under bf16 autocast, the adapter matmuls run in bf16 (weights cast on the fly)
# while master weights, gradients and optimizer state stay fp32. Measured on SST-2 training
# (bench/train_sst2.py): peak RSS 2,997 -> 2,526 MiB at the same speed. fp32 and fp16 bases are left as they are
# (fp16 would need a gradient scaler). Two context managers, because their scopes differ: the cast must stay off
# through backward (gradient checkpointing recomputes the forward there, and the recomputed tensors must match
# the saved ones), while autocast must cover the forward only (the checkpoint re-enters it itself).


def adapter_input_casting_off(model):
    """Around forward *and* backward: peft leaves adapter inputs in the base dtype (bf16 bases with LoRA-family
    adapters only: peft's switch exists on LoRA layers, an IA3 layer has no input cast to switch off)."""
    configs = getattr(getattr(model, "module", model), "peft_config", {}) or {}
    lora = bool(configs) and all(str(getattr(c, "peft_type", "")).endswith("LORA") for c in configs.values())
    if _bf16_base_device(model) is None or not lora:
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


def adapter_autocast(model):
    """Around the forward only: the fp32 adapter weights are cast to bf16 for their matmuls (bf16 bases only)."""
    device = _bf16_base_device(model)
    return contextlib.nullcontext() if device is None else torch.autocast(device_type=device, dtype=torch.bfloat16)
