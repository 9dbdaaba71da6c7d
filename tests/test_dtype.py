"""`dtype: auto` chooses what the device computes natively, and fp16 trains with a gradient scaler."""

import math

import pytest
import torch

from tasktune.losses import get_objective
from tasktune.config import TrainConfig
from tasktune.models import choose_dtype
from tasktune.train import add_lora, fit
from test_train import rows, setup, validation


@pytest.mark.parametrize("capability, name, expected", [
    ((7, 5), "Tesla T4", torch.float16),       # no native bf16 (is_bf16_supported() says yes: emulated)
    ((7, 0), "Tesla V100", torch.float16),
    ((8, 0), "NVIDIA A100", torch.bfloat16),
    ((8, 9), "NVIDIA L4", torch.bfloat16),
    ((9, 0), "NVIDIA H100", torch.bfloat16),
])
def test_auto_on_cuda_follows_the_compute_capability(capability, name, expected):
    choice = choose_dtype("auto", cuda_capability=capability, cuda_name=name)
    assert choice.dtype == expected
    assert name in choice.reason and f"{capability[0]}.{capability[1]}" in choice.reason
    if expected == torch.float16:
        assert "gradient scaler" in choice.reason


@pytest.mark.parametrize("cpu_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cpu_follows_its_bf16_instructions(monkeypatch, cpu_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    choice = choose_dtype("auto", cpu_bf16=cpu_bf16)
    assert choice.dtype == expected and choice.reason.startswith("auto:")


def test_a_set_dtype_is_kept_and_said_so():
    choice = choose_dtype("fp16", cuda_capability=(9, 0))
    assert choice.dtype == torch.float16 and choice.reason == "dtype fp16 set in the recipe"


def test_fp16_base_trains_with_a_gradient_scaler(tiny_llama, tmp_path):
    """The pre-Ampere path, on CPU: fp16 frozen weights, fp32 adapter weights, the Trainer's scaler active; the
    loss stays finite and the adapter learns."""
    lm, task, builder, label_ids, head = setup(tiny_llama, "verbalizer", dtype="fp16")
    cfg = TrainConfig(objective="verbalizer", lora_r=4, lora_alpha=8, batch_size=8, max_steps=6, eval_steps=3,
                      logging_steps=1, learning_rate=1e-3, warmup_ratio=0.0)
    model = add_lora(lm.model, cfg, "verbalizer")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert all(p.dtype == torch.float16 for n, p in model.named_parameters() if not p.requires_grad)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    features = task.train_features(builder, rows(48), get_objective("verbalizer"), 64, label_ids)
    summary = fit(model, lm.tokenizer, features, features[:1], cfg, tmp_path, get_objective("verbalizer"),
                  lambda m: validation(task, m, builder, rows(16, seed=1), head), "accuracy", label_ids)
    assert summary["grad_scaler_scale"] is not None and summary["grad_scaler_scale"] > 0
    losses = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert losses and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_fp32_training_has_no_scaler(tiny_llama, tmp_path):
    lm, task, builder, label_ids, head = setup(tiny_llama, "verbalizer", dtype="fp32")
    cfg = TrainConfig(objective="verbalizer", lora_r=4, lora_alpha=8, batch_size=8, max_steps=2, eval_steps=2,
                      logging_steps=1, learning_rate=1e-3, warmup_ratio=0.0)
    model = add_lora(lm.model, cfg, "verbalizer")
    features = task.train_features(builder, rows(16), get_objective("verbalizer"), 64, label_ids)
    summary = fit(model, lm.tokenizer, features, features[:1], cfg, tmp_path, get_objective("verbalizer"),
                  lambda m: validation(task, m, builder, rows(8, seed=1), head), "accuracy", label_ids)
    assert summary["grad_scaler_scale"] is None
