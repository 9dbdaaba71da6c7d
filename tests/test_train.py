import pytest
import torch
import torch.nn.functional as F

from tasktune.losses import get_objective
from tasktune.config import TrainConfig
from tasktune.infer import classify
from tasktune.models import load_model
from tasktune.tasks import PromptBuilder
from tasktune.tasks import get_task
from tasktune.evaluation import validation_metrics
from tasktune.losses import objective_loss
from tasktune.runner import Runner
from tasktune.train import LeftPadCollator, TaskTrainer, add_lora, fit
from tiny import sentiment_rows


def rows(n, seed=0):
    return [{"id": i, "text": s, "label": l, "fields": {"text": s}} for i, (s, l) in enumerate(sentiment_rows(n, seed))]


def setup(path, objective, dtype="fp32"):
    head = "seqcls" if objective == "seqcls" else "causal_lm"
    lm = load_model(str(path), dtype=dtype, head=head)
    task = get_task("sst2")
    builder = PromptBuilder(task, lm.tokenizer)
    label_ids = task.label_token_ids(builder, rows(1)[0])
    return lm, task, builder, label_ids, head



def validation(task, model, builder, examples, head):
    return validation_metrics(task, Runner(model, builder.tokenizer, 8, shard=False), builder, examples, head)

@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])
@pytest.mark.parametrize("objective", ["verbalizer", "label_lm", "lm", "seqcls"])
def test_objective_trains_and_changes_only_lora(tiny_models, tmp_path, arch, objective):
    lm, task, builder, label_ids, head = setup(tiny_models[arch], objective)
    cfg = TrainConfig(objective=objective, lora_r=4, lora_alpha=8, batch_size=8, max_steps=6, eval_steps=3,
                      logging_steps=1, learning_rate=1e-3, warmup_ratio=0.0)
    model = add_lora(lm.model, cfg, objective)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train = rows(48)
    features = task.train_features(builder, train, get_objective(objective), 64, label_ids)
    val = rows(16, seed=1)
    summary = fit(model, lm.tokenizer, features, features[:1], cfg, tmp_path, get_objective(objective),
                  lambda m: validation(task, m, builder, val, head), "accuracy", label_ids)
    assert summary["global_step"] == 6
    assert any("eval_accuracy" in h for h in summary["log_history"])
    assert (tmp_path / "log_history.json").is_file()
    for name, p in model.named_parameters():
        if name in frozen_before:
            assert torch.equal(p.cpu(), frozen_before[name].cpu()), name  # the Trainer may have moved it to a GPU
    changed = [n for n, p in model.named_parameters() if n in trainable_before
               and not torch.equal(p.cpu(), trainable_before[n].cpu())]
    assert any("lora_B" in n for n in changed)
    if objective == "seqcls":
        assert any("score" in n or "classifier" in n for n in changed)


def test_verbalizer_loss_equals_full_logit_cross_entropy_on_label_rows(tiny_models):
    lm, task, builder, label_ids, _ = setup(tiny_models["gemma2"], "verbalizer")  # soft-capped logits
    batch_rows = rows(6)
    features = task.train_features(builder, batch_rows, get_objective("verbalizer"), 64, label_ids)
    batch = LeftPadCollator(lm.tokenizer.pad_token_id)(features)
    trainer = TaskTrainer.__new__(TaskTrainer)
    trainer.objective, trainer.label_token_ids = "verbalizer", label_ids
    loss = trainer.compute_loss(lm.model, batch)
    expected = []
    for ex in batch_rows:
        ids = builder.encode(builder.render(ex))
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1, label_ids].float()
        expected.append(F.cross_entropy(logits[None], torch.tensor([ex["label"]])))
    torch.testing.assert_close(loss, torch.stack(expected).mean(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_label_lm_loss_equals_the_lm_objective_loss(tiny_models, arch):
    """label_lm is the tutorials' loss (full vocabulary, label token only) with the LM head at one position."""
    lm, task, builder, label_ids, _ = setup(tiny_models[arch], "label_lm")
    collate = LeftPadCollator(lm.tokenizer.pad_token_id)
    batch_rows = rows(6)
    label_lm = objective_loss(lm.model, collate(task.train_features(builder, batch_rows, get_objective("label_lm"), 64, label_ids)),
                              "label_lm", label_ids)
    lm_batch = collate(task.train_features(builder, batch_rows, get_objective("lm"), 64, label_ids))
    full = lm.model(input_ids=lm_batch["input_ids"], attention_mask=lm_batch["attention_mask"],
                    position_ids=lm_batch["position_ids"], labels=lm_batch["labels"]).loss
    torch.testing.assert_close(label_lm, full, atol=1e-5, rtol=1e-5)


def test_lm_labels_mask_everything_but_the_label_token(tiny_llama):
    lm, task, builder, label_ids, _ = setup(tiny_llama, "lm")
    (feature,) = task.train_features(builder, rows(1), get_objective("lm"), 64, label_ids)
    assert feature["labels"][:-1] == [-100] * (len(feature["labels"]) - 1)
    assert feature["labels"][-1] == feature["input_ids"][-1] == label_ids[rows(1)[0]["label"]]


def test_seqcls_adapter_reloads_and_scores_identically(tiny_models, tmp_path):
    from peft import PeftModel

    lm, task, builder, label_ids, _ = setup(tiny_models["gemma3"], "seqcls")
    cfg = TrainConfig(objective="seqcls", lora_r=4, batch_size=8, max_steps=3, eval_steps=3, warmup_ratio=0.0,
                      learning_rate=1e-3)
    model = add_lora(lm.model, cfg, "seqcls")
    features = task.train_features(builder, rows(24), get_objective("seqcls"), 64, label_ids)
    fit(model, lm.tokenizer, features, features[:1], cfg, tmp_path, get_objective("seqcls"),
        lambda m: validation(task, m, builder, rows(8), "seqcls"), "accuracy", label_ids)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    encoded = [builder.encode(builder.render(r)) for r in rows(10, seed=5)]
    model.eval()
    before = classify(model, encoded, lm.tokenizer.pad_token_id, 4)
    fresh = load_model(str(tiny_models["gemma3"]), dtype="fp32", head="seqcls")
    reloaded = PeftModel.from_pretrained(fresh.model, tmp_path / "adapter").eval()
    after = classify(reloaded, encoded, lm.tokenizer.pad_token_id, 4)
    torch.testing.assert_close(before, after)


def squad_features(model_dir, questions: list[tuple[str, list[str]]]):
    """The tiny model, and answer-loss features of questions about one short context."""
    from tasktune.tasks import get_task

    lm = load_model(str(model_dir), dtype="fp32")
    task = get_task("squad_v2")
    examples = [{"id": str(i), "title": "T", "context": "Paris is the capital of France .", "question": q,
                 "answers": a, "answer_starts": [0] if a else []} for i, (q, a) in enumerate(questions)]
    return lm, task.train_features(PromptBuilder(task, lm.tokenizer), examples, get_objective("answer"), 128)


@pytest.mark.parametrize("objective", ["answer", "lm"])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])
def test_target_token_losses_equal_the_full_logit_lm_loss_with_the_head_at_labelled_positions_only(
        tiny_models, arch, objective):
    """`answer` and `lm` (multi-token targets: answers of 1-3 tokens here) give the model's own full-vocabulary
    loss, and the LM head sees only the labelled positions: red if `lm` went back to the model's own forward,
    which applies the head at every position (for Gemma 3, 262,144 logits each)."""
    lm, features = squad_features(tiny_models[arch], [("what is the capital ?", ["Paris"]), ("who was born ?", []),
                                                      ("what river flows through Paris ?", ["the Seine"])])
    batch = LeftPadCollator(lm.tokenizer.pad_token_id)(features)
    rows_seen = []
    hook = lm.model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows_seen.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    with torch.no_grad():
        ours = objective_loss(lm.model, batch, objective)
        hook.remove()
        reference = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    assert 0 < labelled < batch["input_ids"].numel() // 4
    assert sum(rows_seen) in (0, labelled)  # 0: head_logits multiplied by the head's weight directly


def test_bf16_base_trains_adapter_in_mixed_precision(tiny_models):
    """With a bf16 base, LoRA matmuls run in bf16 but master weights and their gradients stay fp32, and the loss
    matches the same adapter computed in fp32 (peft's own input up-casting) within bf16 rounding."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tasktune.losses import adapter_autocast, adapter_input_casting_off

    lm, task, builder, label_ids, _ = setup(tiny_models["gemma3"], "verbalizer", dtype="bf16")
    model = add_lora(lm.model, TrainConfig(lora_r=4, lora_alpha=8), "verbalizer")
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a non-zero update, so the LoRA branch counts
    batch = LeftPadCollator(lm.tokenizer.pad_token_id)(task.train_features(builder, rows(8), get_objective("verbalizer"), 64,
                                                                             label_ids))
    trainer = TaskTrainer.__new__(TaskTrainer)
    trainer.objective, trainer.label_token_ids = "verbalizer", label_ids
    with adapter_input_casting_off(model):
        assert not any(m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer))
        with adapter_autocast(model):
            assert torch.is_autocast_enabled("cpu")
        loss = trainer.compute_loss(model, batch)
        loss.backward()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
                        for p in lora.values())
    assert all(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_A" in n)
    with torch.no_grad():
        reference = objective_loss(model, batch, "verbalizer", label_ids)  # no autocast: peft casts up to fp32
    torch.testing.assert_close(loss.detach(), reference, atol=0.05, rtol=0.05)
    # The adapter's own input casting is switched back on after the step (evaluation relies on it).
    assert all(m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer))


def test_fp32_base_gets_no_autocast(tiny_llama):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tasktune.losses import adapter_autocast, adapter_input_casting_off

    lm, *_ = setup(tiny_llama, "verbalizer")
    model = add_lora(lm.model, TrainConfig(lora_r=4, lora_alpha=8), "verbalizer")
    with adapter_input_casting_off(model), adapter_autocast(model):
        assert not torch.is_autocast_enabled("cpu")
        assert all(m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer))


@pytest.mark.parametrize("arch, dtype", [("llama", "fp32"), ("gemma3", "bf16")])
def test_gradient_checkpointing_still_trains_every_adapter(tiny_models, tmp_path, arch, dtype):
    """With recomputed activations the frozen embeddings must not cut the gradient, and (bf16 base) the
    recomputed adapter inputs must match the saved ones: every LoRA matrix moves."""
    from tasktune.infer import unwrap

    lm, task, builder, label_ids, head = setup(tiny_models[arch], "label_lm", dtype=dtype)
    cfg = TrainConfig(objective="label_lm", lora_r=4, lora_alpha=8, batch_size=8, max_steps=2, eval_steps=2,
                      logging_steps=1, learning_rate=1e-3, warmup_ratio=0.0, gradient_checkpointing=True)
    model = add_lora(lm.model, cfg, "label_lm")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    features = task.train_features(builder, rows(16), get_objective("label_lm"), 64, label_ids)
    fit(model, lm.tokenizer, features, features[:1], cfg, tmp_path, get_objective("label_lm"),
        lambda m: validation(task, m, builder, rows(8, seed=1), head), "accuracy", label_ids)
    assert unwrap(model).is_activation_checkpointing
    unchanged = [n for n, p in model.named_parameters() if n in before and torch.equal(p.cpu(), before[n].cpu())]
    assert before and not unchanged, unchanged


def test_collator_rounds_lengths_up_without_changing_the_loss(tiny_models):
    """pad_to_multiple_of adds left padding only: same tokens, labels, positions of real tokens, same loss."""
    lm, features = squad_features(tiny_models["llama"], [("what is the capital ?", ["Paris"]), ("who ?", []),
                                                         ("what river flows through Paris , the capital ?",
                                                          ["the Seine"])])
    exact = LeftPadCollator(lm.tokenizer.pad_token_id)(features)
    rounded = LeftPadCollator(lm.tokenizer.pad_token_id, 16)(features)
    width = exact["input_ids"].shape[1]
    assert rounded["input_ids"].shape[1] % 16 == 0 and rounded["input_ids"].shape[1] > width
    for key in ("input_ids", "attention_mask", "labels", "position_ids"):
        assert torch.equal(rounded[key][:, -width:], exact[key]), key
    assert not rounded["attention_mask"][:, :-width].any() and (rounded["labels"][:, :-width] == -100).all()
    with torch.no_grad():
        torch.testing.assert_close(objective_loss(lm.model, rounded, "answer"), objective_loss(lm.model, exact, "answer"))


def test_the_best_checkpoint_keeps_its_own_validation_records(tiny_llama, tmp_path):
    """ValidationRecords hands back the records of the pass that made a checkpoint the best, which is the
    checkpoint the Trainer reloads at the end (not the last pass): the sweep reads a trial's figure from it."""
    from safetensors.torch import load_file

    from tasktune.train import ValidationRecords

    lm, task, builder, label_ids, head = setup(tiny_llama, "label_lm")
    cfg = TrainConfig(objective="label_lm", lora_r=4, lora_alpha=8, lora_dropout=0.1, batch_size=8, max_steps=8,
                      eval_steps=2, logging_steps=1, learning_rate=1e-3, warmup_ratio=0.0, patience=5)
    model = add_lora(lm.model, cfg, "label_lm")
    features = task.train_features(builder, rows(48), get_objective("label_lm"), 64, label_ids)
    validations, scripted = ValidationRecords(), iter([0.6, 0.9, 0.7, 0.8])  # the best is the 2nd of 4 passes

    def validate(m):
        validations.latest = [{"pass": len(validations.by_step) + 1}]
        return {"accuracy": next(scripted)}

    summary = fit(model, lm.tokenizer, features, features[:1], cfg, tmp_path, get_objective("label_lm"), validate, "accuracy",
                  label_ids, callbacks=[validations])
    assert sorted(validations.by_step) == [2, 4, 6, 8]
    assert summary["best_checkpoint"] == "checkpoint-4"
    assert validations.of_checkpoint(summary["best_checkpoint"]) == [{"pass": 2}]
    assert validations.of_checkpoint("checkpoint-10") is None and validations.of_checkpoint(None) is None
    saved = load_file(tmp_path / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    now = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)  # what was reloaded


def test_train_compile_compiles_the_training_steps_only(tiny_llama, tmp_path):
    """train.compile: the decoder layers run compiled in the training steps (graphs are compiled), eager in the
    validations and after training, and the trained adapter matches eager training's within float tolerance."""
    import torch._dynamo

    from tasktune.infer import unwrap

    # an earlier test in this process may have compiled the same layer code for the same shapes; its cached
    # graphs would be reused and nothing counted as compiled here
    torch._dynamo.reset()
    trained, graphs = {}, {}
    for compiled in (False, True):
        lm, task, builder, label_ids, head = setup(tiny_llama, "label_lm")
        cfg = TrainConfig(objective="label_lm", lora_r=4, lora_alpha=8, lora_dropout=0.0, batch_size=8,
                          max_steps=4, eval_steps=2, logging_steps=1, learning_rate=1e-3, warmup_ratio=0.0,
                          compile=compiled, seed=3)
        torch.manual_seed(3)
        model = add_lora(lm.model, cfg, "label_lm")
        layers = unwrap(model).model.layers
        eager_in_validation = []

        def validate(m):
            eager_in_validation.append(all(layer._compiled_call_impl is None for layer in layers))
            return validation(task, m, builder, rows(8, seed=1), head)

        features = task.train_features(builder, rows(40), get_objective("label_lm"), 64, label_ids)
        summary = fit(model, lm.tokenizer, features, features[:1], cfg, tmp_path / str(compiled), get_objective("label_lm"),
                      validate, "accuracy", label_ids)
        assert eager_in_validation == [True, True]
        assert all(layer._compiled_call_impl is None for layer in layers)  # eager after training
        trained[compiled] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
        graphs[compiled] = summary["compiled_graphs"], summary["compiling_steps"]
    assert graphs[False] == (None, 0) and graphs[True][0] >= 1 and graphs[True][1] >= 1
    assert trained[True].keys() == trained[False].keys()
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in trained[True].values())
    for name, value in trained[True].items():
        torch.testing.assert_close(value, trained[False][name], atol=1e-4, rtol=1e-3)


def test_step_timings_count_the_first_step_and_the_compiling_ones_over_the_median():
    from tasktune.train import step_timings

    steps = [(5.0, True), (1.0, False), (1.2, False), (3.0, True), (0.9, False)]
    assert step_timings(steps) == {"median_step_s": 1.0, "compiling_steps": 2, "compile_warmup_s": 6.0}
    assert step_timings([(2.0, False)]) == {"median_step_s": 2.0, "compiling_steps": 0, "compile_warmup_s": 0.0}
    assert step_timings([])["compile_warmup_s"] is None
