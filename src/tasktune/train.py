"""LoRA fine-tuning on the Hugging Face Trainer: the Trainer glue (arguments, collator, a Trainer whose loss
is the objective's and whose evaluation is the task's), around `losses.py` and `checkpoints.py`.

Early stopping reads a task metric computed by the task's own batched evaluation (not Trainer logit
accumulation), through `TaskTrainer.evaluate`.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments

from tasktune.atomic import write_json
from tasktune.checkpoints import SealCheckpoints, StopOnSignal, last_complete_checkpoint
from tasktune.errors import TasktuneError, TrainingInterrupted
from tasktune.infer import left_pad, position_ids_from_mask, unwrap
from tasktune.losses import Objective, adapter_autocast, adapter_input_casting_off, get_objective, objective_loss

def add_lora(model, train_cfg, objective: str):
    """Wrap `model` with the peft config of the recipe's method (LoRA, DoRA, rsLoRA, IA3), both named: the
    benchmarks' and tests' shortcut (a run wraps through its resolved `Adaptation`, in `stages.train_stage`)."""
    from peft import get_peft_model

    from tasktune.methods import get_method

    config = get_method(train_cfg.method).peft_config(train_cfg, seqcls=get_objective(objective).head == "seqcls")
    return get_peft_model(model, config)


class CompiledLayers:
    """`train.compile`: each decoder layer (with its adapter modules) compiled by torch.compile, as torchtune
    compiles per layer (the Trainer's `torch_compile` wraps the whole model's forward, which the objectives
    bypass by calling the backbone). The compiled code runs inside training steps only (`active`): validation
    and the evaluations run eager, since their no-grad graphs, batch shapes and generation would each compile
    again; `remove` leaves the layers as they were (a sweep's shared base trains the next trial eager or
    compiled afresh). nn.Module.compile keeps its compiled callable in `_compiled_call_impl` (torch 2.x, private,
    no public way to switch it off); that attribute is what is switched here."""

    def __init__(self, model):
        import torch._dynamo

        base = unwrap(model)
        backbone = getattr(base, base.base_model_prefix, base)
        self.layers = list(getattr(backbone, "layers", []))
        if not self.layers:
            raise TasktuneError(f"train.compile: no decoder layers found in {type(base).__name__}")
        self.compiled = []
        for layer in self.layers:
            layer.compile()
            self.compiled.append(layer._compiled_call_impl)
            layer._compiled_call_impl = None
        self.graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    @contextlib.contextmanager
    def active(self):
        for layer, compiled in zip(self.layers, self.compiled):
            layer._compiled_call_impl = compiled
        try:
            yield
        finally:
            for layer in self.layers:
                layer._compiled_call_impl = None

    def graphs(self) -> int:
        """Graphs compiled since the layers were wrapped (recompiles for new shapes included)."""
        import torch._dynamo

        return torch._dynamo.utils.counters["stats"]["unique_graphs"] - self.graphs_before

    def remove(self) -> None:
        self.compiled = [None] * len(self.layers)


def step_timings(steps: list[tuple[float, bool]]) -> dict:
    """What compiling and warm-up cost inside training: the excess over the median ordinary step of the first
    micro-batch and of every one that compiled a graph (train.compile recompiles for a new batch shape).
    Host time: on CUDA, where kernels run asynchronously, it is the compile alone."""
    if not steps:
        return {"median_step_s": None, "compiling_steps": 0, "compile_warmup_s": None}
    ordinary = [s for i, (s, compiled) in enumerate(steps) if i and not compiled] or [steps[0][0]]
    median = statistics.median(ordinary)
    extra = [s - median for i, (s, compiled) in enumerate(steps) if i == 0 or compiled]
    return {"median_step_s": round(median, 4), "compiling_steps": sum(c for _, c in steps),
            "compile_warmup_s": round(max(sum(extra), 0.0), 2)}


class LeftPadCollator:
    """Left-pads `input_ids`; `labels` are class ids (one per row) or token labels padded with -100.

    `multiple`: each batch's length is rounded up to a multiple of it. On a CPU every new shape gets its own
    compiled kernels, which stay in memory: measured on SQuAD training (batch 4, 40 steps), RSS between steps
    grew 1.48 → 2.01 GB with exact lengths and stayed at 1.57 GB with multiples of 32, at the same speed.
    """

    def __init__(self, pad_id: int, multiple: int = 1):
        self.pad_id, self.multiple = pad_id, multiple

    def __call__(self, features: list[dict]) -> dict:
        ids, mask = left_pad([f["input_ids"] for f in features], self.pad_id)
        extra = -ids.shape[1] % self.multiple  # columns added on the left to reach a multiple

        def widen(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.cat([torch.full((t.shape[0], extra), value, dtype=t.dtype), t], dim=1) if extra else t

        ids, mask = widen(ids, self.pad_id), widen(mask, 0)
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask)}
        labels = [f["labels"] for f in features]
        if isinstance(labels[0], list):
            padded, _ = left_pad(labels, -100)
            batch["labels"] = widen(padded, -100)
        else:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch


class EpochSeededSampler(torch.utils.data.Sampler):
    """The training order as a function of (seed, epoch) alone.

    The Trainer's own shuffling samplers draw each epoch's order from the global torch RNG when the epoch
    begins (`LengthGroupedSampler` is built without a generator). A run resumed mid-epoch starts that epoch in
    a fresh process, where the global RNG is not where dropout left it in the uninterrupted run, so it saw
    another order and ended with other weights (measured: 60 steps, LoRA dropout 0.1, SIGKILL after
    checkpoint 30: checkpoints 40-60 differed). Seeding a private generator with seed + epoch makes the order
    the same in both, and the same on every DDP process (each takes its shard of one order)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool):
        self.lengths, self.batch_size, self.seed, self.group_by_length = lengths, batch_size, seed, group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.group_by_length:
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))
        return iter(torch.randperm(len(self.lengths), generator=generator).tolist())


class TaskTrainer(Trainer):
    # Our losses are means over the micro-batch; let the Trainer divide by accumulation steps.
    loss_is_scaled_for_ga = False

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "sequential":
            return super()._get_train_sampler(train_dataset)
        self.epoch_sampler = EpochSeededSampler(
            [len(f["input_ids"]) for f in dataset], self.args.train_batch_size * self.args.gradient_accumulation_steps,
            self.args.data_seed if self.args.data_seed is not None else self.args.seed,
            self.args.train_sampling_strategy == "group_by_length")
        return self.epoch_sampler

    def _run_epoch(self, *args, **kwargs):
        # The epoch the Trainer is about to run, resumed or not (transformers 5.x passes it by keyword; the
        # dataloader's own set_epoch does not reach a sampler behind accelerate's skip-batches wrapper).
        sampler = getattr(self, "epoch_sampler", None)
        if sampler is not None:
            sampler.set_epoch(kwargs["epoch"] if "epoch" in kwargs else args[1])
        return super()._run_epoch(*args, **kwargs)

    def __init__(self, *args, objective: Objective, label_token_ids: list[int] | None = None,
                 validate: Callable[[torch.nn.Module], dict] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective, self.label_token_ids, self.validate = objective, label_token_ids, validate
        self.compiled: CompiledLayers | None = None
        # (seconds, compiled a graph) of each micro-batch's forward and backward in this process: see step_timings
        self.step_seconds: list[tuple[float, bool]] = []
        if self.args.fp16 and self.accelerator.device.type == "cpu" and self.accelerator.scaler is None:
            # accelerate leaves fp16 autocast and the gradient scaler off on a CPU (accelerator.py checks
            # `device.type != "cpu"`); torch has both there, so they are switched on as accelerate does on CUDA:
            # the fp16 path of a T4 then runs, and is tested, on this machine.
            self.accelerator.scaler = torch.amp.GradScaler("cpu")
            self.accelerator.native_amp = True

    def training_step(self, model, inputs, num_items_in_batch=None):
        compiled = self.compiled.active() if self.compiled is not None else contextlib.nullcontext()
        graphs = self.compiled.graphs() if self.compiled is not None else 0
        start = time.perf_counter()
        with adapter_input_casting_off(model), compiled:
            loss = super().training_step(model, inputs, num_items_in_batch)
        seconds = time.perf_counter() - start
        self.step_seconds.append((seconds, self.compiled is not None and self.compiled.graphs() > graphs))
        return loss

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


class TestMetricLogs(TrainerCallback):
    """Sends test-set figures to the run's experiment loggers through the Trainer's own `log`: the zero-shot
    figures when training begins, the fine-tuned ones after the evaluation stage (`log_finetuned`)."""

    def __init__(self, zeroshot: dict | None):
        self.zeroshot, self.trainer = zeroshot or {}, None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.zeroshot and state.global_step == 0:
            self.trainer.log({f"test_zeroshot/{k}": v for k, v in self.zeroshot.items()})

    def log_finetuned(self, figures: dict) -> None:
        if self.trainer is not None and figures:
            self.trainer.log({f"test_finetuned/{k}": v for k, v in figures.items()})


class ValidationRecords(TrainerCallback):
    """The prediction records of each validation pass during training, by step (`validate` hands them over in
    `latest`): the best checkpoint's validation figure is then read from its own pass, not from a second pass
    over the same slice after training (a sweep trial's figure; ~15 s of a 230 s SST-2 trial)."""

    def __init__(self):
        self.latest: list[dict] | None = None
        self.by_step: dict[int, list[dict]] = {}

    def on_evaluate(self, args, state, control, **kwargs):
        if self.latest is not None:
            self.by_step[state.global_step], self.latest = self.latest, None

    def of_checkpoint(self, name: str | None) -> list[dict] | None:
        """The records of `checkpoint-N`'s validation; None when it ran in an earlier process (resumed)."""
        if not name or not name.startswith("checkpoint-"):
            return None
        return self.by_step.get(int(name.removeprefix("checkpoint-")))


def training_arguments(train_cfg, output_dir: Path, metric: str, fp16: bool = False,
                       bf16: bool = False) -> TrainingArguments:
    """`fp16`: the base weights are fp16 (dtype auto on a pre-Ampere card, or set): the Trainer trains with
    fp16 autocast and a gradient scaler, the trainable weights in fp32 (see `fit`). `bf16`: the Trainer's bf16
    autocast over fp32 weights (full fine-tuning of a bf16 run)."""
    # TensorBoard gets its own callback below (to write into the run directory); the others go as named.
    report_to = [name for name in train_cfg.report_to if name not in ("none", "tensorboard")] or "none"
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
        fp16=fp16,
        bf16=bf16,
        eval_strategy="steps",
        eval_steps=train_cfg.eval_steps,
        save_strategy="steps",
        save_steps=train_cfg.eval_steps,
        save_total_limit=train_cfg.keep_checkpoints,
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
        objective: Objective, validate: Callable, metric: str, label_token_ids: list[int] | None = None,
        logs: "TestMetricLogs | None" = None, callbacks: list[TrainerCallback] = (),
        autocast: torch.dtype | None = None) -> dict:
    """Train `model` (already wrapped by its method) in place and return the Trainer's log history and timings.
    `autocast`: the Trainer's mixed precision over fp32 weights (full fine-tuning: the run's bf16 or fp16).

    Resumes from the last complete checkpoint in `output_dir/checkpoints` when there is one.
    """
    checkpoints = output_dir / "checkpoints"
    fp16 = autocast == torch.float16 or any(p.dtype == torch.float16 for p in model.parameters())
    if fp16:  # the scaler unscales fp32 gradients only: a trainable fp16 weight (a seqcls head) is kept in fp32
        for param in model.parameters():
            if param.requires_grad and param.dtype == torch.float16:
                param.data = param.data.float()
    args = training_arguments(train_cfg, checkpoints, metric, fp16=fp16, bf16=autocast == torch.bfloat16)
    stopper = StopOnSignal()
    callbacks = [EarlyStoppingCallback(early_stopping_patience=train_cfg.patience), SealCheckpoints(), stopper,
                 *callbacks]
    if "tensorboard" in train_cfg.report_to:
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback()
        tensorboard.logging_dir = str(output_dir / "tensorboard")  # in the run directory, not under checkpoints/
        callbacks.append(tensorboard)
    if logs is not None:
        callbacks.append(logs)
    trainer = TaskTrainer(
        model=model, args=args, train_dataset=train_features, eval_dataset=val_features,
        data_collator=LeftPadCollator(tokenizer.pad_token_id, train_cfg.pad_to_multiple_of), processing_class=tokenizer,
        callbacks=callbacks, objective=objective, label_token_ids=label_token_ids, validate=validate,
    )
    if logs is not None:
        logs.trainer = trainer
    if train_cfg.compile:
        trainer.compiled = CompiledLayers(model)
    resume = last_complete_checkpoint(checkpoints) if checkpoints.is_dir() else None
    if resume:
        print(f"[tasktune] resuming training from {resume}")
    stopper.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        stopper.uninstall()
        if trainer.compiled is not None:
            trainer.compiled.remove()
    if stopper.received:
        raise TrainingInterrupted(stopper.received, trainer.state.global_step)
    history = trainer.state.log_history
    if trainer.is_world_process_zero():
        write_json(output_dir / "log_history.json", history)
    return {
        "global_step": trainer.state.global_step,
        "best_metric": trainer.state.best_metric,
        "best_checkpoint": Path(trainer.state.best_model_checkpoint).name if trainer.state.best_model_checkpoint else None,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "train_loss": result.metrics.get("train_loss"),
        "compiled_graphs": trainer.compiled.graphs() if trainer.compiled is not None else None,
        **step_timings(trainer.step_seconds),
        # fp16 training: the gradient scaler's final scale (it halves on every overflowing step it skips)
        "grad_scaler_scale": (float(trainer.accelerator.scaler.get_scale())
                              if getattr(trainer.accelerator, "scaler", None) is not None else None),
        "log_history": history,
    }
