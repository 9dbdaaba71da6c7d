"""LoRA fine-tuning on the Hugging Face Trainer with task-aware losses.

Objectives (SST-2):
- `verbalizer`: hidden state of the last prompt token × the LM-head rows of the verbalizers, cross-entropy
  over the labels. Full-vocabulary logits are never materialised.
- `label_lm`: the same loss value as `lm` (full-vocabulary cross-entropy on the label token), with the LM head
  applied at the last prompt position only: the model keeps *writing* the label word, which `verbalizer`
  (a two-way contrast) does not teach.
- `lm`: causal-LM loss on the label token only, through the model's own full-vocabulary forward (what most
  tutorials do); kept for comparison.
- `seqcls`: a fresh classification head (`AutoModelForSequenceClassification`), saved with the adapter.
- `answer` (SQuAD v2): LM loss on the answer tokens only, with the LM head applied at those positions only.

Early stopping reads a task metric computed by the task's own batched evaluation (not Trainer logit
accumulation), through `TaskTrainer.evaluate`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import signal
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

from tasktune.infer import head_logits, last_hidden_state, left_pad, position_ids_from_mask, unwrap
from tasktune.errors import TrainingInterrupted
from tasktune.rundir import sha256_file, write_json


def add_lora(model, train_cfg, objective: str):
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=train_cfg.lora_r, lora_alpha=train_cfg.lora_alpha, lora_dropout=train_cfg.lora_dropout,
        target_modules=list(train_cfg.target_modules), bias="none",
        # SEQ_CLS makes peft train and save the fresh `score` head with the adapter (modules_to_save).
        task_type=TaskType.SEQ_CLS if objective == "seqcls" else TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, config)


class LeftPadCollator:
    """Left-pads `input_ids`; `labels` are class ids (one per row) or token labels padded with -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        ids, mask = left_pad([f["input_ids"] for f in features], self.pad_id)
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}
        labels = [f["labels"] for f in features]
        if isinstance(labels[0], list):
            padded, _ = left_pad(labels, -100)
            batch["labels"] = padded
        else:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


def answer_positions_loss(model, input_ids, attention_mask, position_ids, labels) -> torch.Tensor:
    """Causal-LM loss over the positions whose next token is labelled, LM head at those positions only."""
    lm = unwrap(model)
    backbone = getattr(lm, lm.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = head_logits(model, hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep])


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
    """Around forward *and* backward: peft leaves adapter inputs in the base dtype (bf16 bases only)."""
    if _bf16_base_device(model) is None:
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


def adapter_autocast(model):
    """Around the forward only: the fp32 adapter weights are cast to bf16 for their matmuls (bf16 bases only)."""
    device = _bf16_base_device(model)
    return contextlib.nullcontext() if device is None else torch.autocast(device_type=device, dtype=torch.bfloat16)


def objective_loss(model, inputs: dict, objective: str, label_token_ids: list[int] | None = None) -> torch.Tensor:
    """The training loss of `objective` for one collated batch (see the module docstring)."""
    ids, mask, pos, labels = (inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"],
                              inputs["labels"])
    data_parallel = hasattr(model, "module")  # wrapped by DDP under accelerate launch / torchrun
    if objective in ("verbalizer", "label_lm"):
        rows = label_token_ids if objective == "verbalizer" else None  # two label rows, or the whole vocabulary
        if data_parallel:
            # DDP synchronises gradients only through its own forward, so the loss goes through the model's
            # forward, with LM-head logits for the last position only.
            last = torch.tensor([ids.shape[1] - 1], device=ids.device)  # an index tensor: contiguous gather
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=last,
                           use_cache=False).logits[:, -1]
            logits = logits if rows is None else logits[:, rows]
        else:
            logits = head_logits(model, last_hidden_state(model, ids, mask), rows=rows)
        # Rows carry class ids; label_lm's targets are the verbalizers' token ids.
        targets = labels if rows is not None else torch.tensor(label_token_ids, device=labels.device)[labels]
        return F.cross_entropy(logits.float(), targets)
    if objective == "answer" and not data_parallel:
        return answer_positions_loss(model, ids, mask, pos, labels)
    if objective == "answer":
        # As above for DDP: logits only for the window from the first answer position to the end.
        first = int((labels != -100).float().argmax(dim=1).min())
        window = torch.arange(max(first - 1, 0), ids.shape[1] - 1, device=ids.device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=window,
                       use_cache=False).logits.float()
        targets = labels[:, window + 1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    # lm and seqcls: the model's own forward and loss
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels, use_cache=False).loss


class TaskTrainer(Trainer):
    # Our losses are means over the micro-batch; let the Trainer divide by accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, objective: str, label_token_ids: list[int] | None = None,
                 validate: Callable[[torch.nn.Module], dict] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective, self.label_token_ids, self.validate = objective, label_token_ids, validate

    def training_step(self, model, inputs, num_items_in_batch=None):
        with adapter_input_casting_off(model):
            return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with adapter_autocast(model):
            loss = objective_loss(model, inputs, self.objective, self.label_token_ids)
        return (loss, None) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        was_training = self.model.training
        self.model.eval()
        metrics = self.validate(self.model)
        self.model.train(was_training)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


SEAL = "tasktune_complete.json"


class SealCheckpoints(TrainerCallback):
    """After the Trainer writes checkpoint-N, record every file's size and sha256 in it. A checkpoint without
    a matching seal (killed mid-write, truncated, corrupted) is never resumed from."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                     for f in sorted(folder.iterdir()) if f.is_file() and f.name != SEAL}
            write_json(folder / SEAL, {"step": state.global_step, "files": files})


def complete_checkpoint(folder: Path) -> bool:
    seal = folder / SEAL
    try:
        files = json.loads(seal.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == meta["bytes"]
               and sha256_file(folder / name) == meta["sha256"] for name, meta in files.items())


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest sealed checkpoint whose files still match their seal; damaged ones are skipped."""
    found = sorted((p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for folder in found:
        if complete_checkpoint(folder):
            return folder
        print(f"[tasktune] skipping incomplete or damaged checkpoint {folder}")
    return None


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM: finish the current step, save a checkpoint, stop; the run can then be resumed."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def on_step_end(self, args, state, control, **kwargs):
        if self.received:
            control.should_save = True
            control.should_training_stop = True


def training_arguments(train_cfg, output_dir: Path, metric: str) -> TrainingArguments:
    report_to = ["tensorboard"] if importlib.util.find_spec("tensorboard") else "none"
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=train_cfg.batch_size,
        gradient_accumulation_steps=train_cfg.grad_accum,
        learning_rate=train_cfg.learning_rate,
        weight_decay=train_cfg.weight_decay,
        num_train_epochs=train_cfg.epochs,
        max_steps=train_cfg.max_steps or -1,
        warmup_steps=train_cfg.warmup_ratio,
        lr_scheduler_type=train_cfg.lr_scheduler,
        optim="adamw_torch",
        logging_steps=train_cfg.logging_steps,
        eval_strategy="steps",
        eval_steps=train_cfg.eval_steps,
        save_strategy="steps",
        save_steps=train_cfg.eval_steps,
        save_total_limit=3,
        load_best_model_at_end=True,
        metric_for_best_model=metric,
        greater_is_better=True,
        train_sampling_strategy=("sequential" if not train_cfg.shuffle else
                                 "group_by_length" if train_cfg.group_by_length else "random"),
        remove_unused_columns=False,
        activation_checkpointing=train_cfg.gradient_checkpointing,
        seed=train_cfg.seed,
        data_seed=train_cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        report_to=report_to,
        save_only_model=False,  # optimizer, scheduler and RNG states too, for exact resumption
        # Early-stopping patience (and any other callback state) continues where the checkpoint left it.
        restore_callback_states_from_checkpoint=True,
    )


def fit(model, tokenizer, train_features: list[dict], val_features: list[dict], train_cfg, output_dir: Path,
        objective: str, validate: Callable, metric: str, label_token_ids: list[int] | None = None) -> dict:
    """Train `model` (already LoRA-wrapped) in place and return the Trainer's log history and timings.

    Resumes from the last complete checkpoint in `output_dir/checkpoints` when there is one.
    """
    checkpoints = output_dir / "checkpoints"
    args = training_arguments(train_cfg, checkpoints, metric)
    stopper = StopOnSignal()
    trainer = TaskTrainer(
        model=model, args=args, train_dataset=train_features, eval_dataset=val_features,
        data_collator=LeftPadCollator(tokenizer.pad_token_id), processing_class=tokenizer,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=train_cfg.patience), SealCheckpoints(), stopper],
        objective=objective, label_token_ids=label_token_ids, validate=validate,
    )
    resume = last_complete_checkpoint(checkpoints) if checkpoints.is_dir() else None
    if resume:
        print(f"[tasktune] resuming training from {resume}")
    stopper.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        stopper.uninstall()
    if stopper.received:
        raise TrainingInterrupted(stopper.received, trainer.state.global_step)
    history = trainer.state.log_history
    if trainer.is_world_process_zero():
        (output_dir / "log_history.json").write_text(json.dumps(history, indent=1))
    return {
        "global_step": trainer.state.global_step,
        "best_metric": trainer.state.best_metric,
        "best_checkpoint": Path(trainer.state.best_model_checkpoint).name if trainer.state.best_model_checkpoint else None,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "train_loss": result.metrics.get("train_loss"),
        "log_history": history,
    }
