"""Device discipline, proven without a GPU: every stage computes where the model is.

The model is put on torch's `meta` device (no data, but every op checks its operands' devices): a tensor that
tasktune builds on the CPU and feeds to it fails with "Expected all tensors to be on the same device", exactly as
a CPU tensor fed to a model on `cuda:0` does. A path that keeps to `model.device` runs every forward and stops
only where it reads numbers back (`.cpu()`, `.item()`), which a meta tensor cannot give. The tiny Gemma 2 loads
with eager attention (tasktune's choice for Gemma 2), whose mask needs no data, so the whole forward runs.
"""

from __future__ import annotations

import pytest
import torch

from tasktune import costs, device, infer
from tasktune.config import load_recipe
from tasktune.losses import get_objective
from tasktune.models import load_model
from tasktune.train import LeftPadCollator
from tiny import TINY_RUN_OVERRIDES, TINY_RUN_RECIPE

META = torch.device("meta")
# What a meta tensor cannot do: give its data back, or run an op whose output shape depends on it (a boolean mask).
DATA_READ = ("Cannot copy out of meta tensor", "cannot be called on meta tensors",
             "a correct data-independent implementation does not exist")


@pytest.fixture
def on_meta(monkeypatch):
    """This process's device is `meta`: models load there, as they would onto `cuda:0`."""
    monkeypatch.setattr(device, "compute_device", lambda: META)


@pytest.fixture
def meta_lm(on_meta, tiny_models):
    return load_model(str(tiny_models["gemma2"]), dtype="fp32")


class ForwardInputs:
    """Records the device of every tensor passed to the backbone's forward (so a test knows the model was reached
    and with what)."""

    def __init__(self, model):
        lm = infer.unwrap(model)
        self.devices: list[torch.device] = []
        self.handle = getattr(lm, lm.base_model_prefix).register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        self.devices += [t.device for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]


def runs_off_cpu(model, call) -> None:
    """`call()` reaches the model with every input on the model's device, and fails, if at all, only where it
    reads data back from it."""
    inputs = ForwardInputs(model)
    try:
        call()
    except (RuntimeError, NotImplementedError) as exc:
        message = str(exc)
        assert any(text in message for text in DATA_READ) and "same device" not in message, message
    finally:
        inputs.handle.remove()
    assert inputs.devices, "the model was never called"
    assert set(inputs.devices) == {META}, f"tensors fed to the model from {set(inputs.devices)}"


def test_load_model_places_the_model_on_this_process_device(meta_lm):
    assert {p.device for p in meta_lm.model.parameters()} == {META}
    assert device.describe(meta_lm.model) == "meta"


def test_a_cpu_tensor_fed_to_an_off_cpu_model_is_caught(meta_lm):
    """The premise of this file: the check goes red when a stage builds its input on the CPU."""
    lm = meta_lm.model
    with pytest.raises(AssertionError, match="tensors fed to the model from"):
        runs_off_cpu(lm, lambda: lm.model(input_ids=torch.tensor([[1, 5, 6]]), use_cache=False))


def test_scoring_runs_on_the_model_device(meta_lm):
    lm = meta_lm.model
    runs_off_cpu(lm, lambda: infer.score_tokens(lm, [[1, 5, 6], [1, 7]], [5, 6], 0))
    runs_off_cpu(lm, lambda: infer.score_continuations(lm, [[1, 5, 6], [1, 7]], [[5, 6], [7]], 0))


def test_generation_runs_on_the_model_device(meta_lm, monkeypatch):
    """transformers' `generate` reads data before its first forward (special tokens), so here what tasktune
    hands to `generate` is what is checked."""
    lm = meta_lm.model
    handed: list[torch.device] = []
    original = lm.generate

    def generate(**kwargs):
        handed.extend(v.device for v in kwargs.values() if isinstance(v, torch.Tensor))
        return original(**kwargs)

    monkeypatch.setattr(lm, "generate", generate)
    with pytest.raises(RuntimeError, match="meta tensors"):  # the data read inside `generate`
        infer.generate(lm, meta_lm.tokenizer, [[1, 5, 6], [1, 7]], 3, first_token_id=5)
    assert handed and set(handed) == {META}


def test_perplexity_runs_on_the_model_device(meta_lm):
    """Red on the `document_nll` that built its input with `torch.tensor([ids])` on the CPU."""
    lm = meta_lm.model
    runs_off_cpu(lm, lambda: costs.document_nll(lm, meta_lm.tokenizer, ["the film was good", "a dull plot"]))


def test_control_task_runs_on_the_model_device(on_meta, tiny_models, sst2_tsv, tmp_path):
    """The control-task path of `costs.measure`, from a prepared run whose model loaded on the device."""
    from tasktune.stages import prepare

    recipe = load_recipe(TINY_RUN_RECIPE, [*TINY_RUN_OVERRIDES, f"model={tiny_models['gemma2']}",
                                           f"data.path={sst2_tsv}", "eval.controls=[sst2]", "eval.control_rows=4",
                                           f"output_dir={tmp_path}"])
    p = prepare(recipe, training=False)
    assert device.describe(p.lm.model) == "meta"
    runs_off_cpu(p.lm.model, lambda: costs.measure(p, p.lm.model, tmp_path / "cost"))


@pytest.mark.parametrize("objective", ["verbalizer", "label_lm", "lm"])
def test_training_batches_run_on_the_model_device(meta_lm, objective):
    """A collated training batch, moved where the Trainer moves it (the model's device), through each loss and
    its backward: no tensor the loss builds is left on the CPU."""
    from tasktune.train import add_lora

    config = load_recipe(TINY_RUN_RECIPE).train
    model = add_lora(meta_lm.model, config, objective)
    features = [{"input_ids": [1, 5, 6, 7], "labels": 1 if objective != "lm" else [-100, -100, -100, 7]},
                {"input_ids": [1, 8], "labels": 0 if objective != "lm" else [-100, 8]}]
    batch = {k: v.to(META) for k, v in LeftPadCollator(0, multiple=8)(features).items()}
    loss = get_objective(objective).loss

    def step():
        value = loss(model, batch, [5, 6])
        value.backward()
        assert value.device == META

    runs_off_cpu(model, step)


def test_evaluation_halves_its_batch_on_out_of_memory(tiny_models, monkeypatch, capsys):
    """A batch that does not fit the card is halved until one fits (and said), with the same results as that
    batch size from the start; later groups start from what fitted."""
    from tasktune.runner import Runner
    from tasktune.inference_requests import Score

    lm = load_model(str(tiny_models["llama"]), dtype="fp32")
    requests = [Score(context=(1, 5 + i % 7, 6), continuations=((5,), (6,))) for i in range(12)]
    expected, _, _ = Runner(lm.model, lm.tokenizer, 4).run(requests)
    real = infer.score_tokens
    tried = []

    def card_fits_four(model, encoded, token_ids, pad_id, batch_size=16, desc="score"):
        tried.append(batch_size)
        if batch_size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, encoded, token_ids, pad_id, batch_size, desc)

    monkeypatch.setattr(infer, "score_tokens", card_fits_four)
    runner = Runner(lm.model, lm.tokenizer, 16)
    results, _, _ = runner.run(requests)
    assert tried == [16, 8, 4] and runner.batch_size == 4
    torch.testing.assert_close(torch.tensor(results), torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert "out of memory at evaluation batch 16: trying 8" in capsys.readouterr().out
    runner.run(requests)
    assert tried[3:] == [4]
