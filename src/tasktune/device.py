"""Where this process computes: one place decides it for every stage and every command.

The device is accelerate's `PartialState().device`, the same state the Trainer and the evaluation runner shard
with: `cuda:LOCAL_RANK` under `accelerate launch` / `torchrun` on a CUDA machine, `cuda:0` when run plainly there,
the CPU elsewhere. Models are placed on it when they load (`models.load_model`), and every tensor tasktune
creates follows `model.device`, so nothing here is consulted again after loading.
"""

from __future__ import annotations

import torch
from accelerate import PartialState


def process_state() -> PartialState:
    """This process's place among those started by accelerate launch / torchrun (one, when run plainly).
    On machines without CUDA the processes join a gloo group, as the Trainer's `use_cpu` expects."""
    return PartialState(cpu=not torch.cuda.is_available())


def compute_device() -> torch.device:
    """The device this process's models live on."""
    return torch.device(process_state().device)


def place(model: torch.nn.Module) -> torch.nn.Module:
    """Move a freshly loaded model onto this process's device (a no-op on a CPU machine, where it already is)."""
    device = compute_device()
    if describe(model) != str(device):
        model.to(device)
    return model


def describe(model: torch.nn.Module) -> str:
    """The device a model's weights are on, as recorded in each stage's output (`cuda:0`, `cpu`)."""
    return str(next(model.parameters()).device)
