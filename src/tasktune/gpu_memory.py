"""The GPU memory a run's training needs, estimated from the effective recipe (after overrides) and the model's
config before any weight loads, so that a run that cannot fit stops in one line instead of dying of CUDA OOM.

What is counted (bytes):
- weights: every parameter in the run's dtype, built on the `meta` device from the config (exact counts); a
  method's own base on top of the evaluations' 16-bit one (QLoRA: NF4 linear layers; full: fp32 master weights);
- the optimizer: AdamW with fp32 weights, gradients and two moments for each trained parameter (the LoRA
  factors, or every weight for `full`, plus autocast's 16-bit copies);
- activations of the worst batch (every row `train.max_length` tokens): per decoder layer and token,
  ACTIVATION_BYTES × (hidden + intermediate / 4), plus eager attention's scores (Gemma 2) per head and key
  position; with gradient checkpointing, each layer keeps only CHECKPOINT_BYTES × hidden per token and one layer
  is recomputed at a time;
- 2 GiB for the CUDA context and the caching allocator's slack, as bench/gpu_memory.py adds.

The constants are fitted to bench/gpu_memory.py's live-tensor measurements of tasktune's own training step on
Llama-3.2-1B and Gemma-2-2B shapes (bench/RESULTS.md, "GPU recipe memory", 2026-12-02): on its eight LoRA rows
the estimate is 0.4% below to 11.6% above the measured figure, erring on the side of refusing;
tests/test_gpu_memory.py checks it again against a live count on narrower copies of both architectures.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
CUDA_OVERHEAD_GIB = 2.0
ACTIVATION_BYTES = 42        # per layer, token and (hidden + intermediate/4), without checkpointing
EAGER_SCORE_BYTES = 8        # per layer, token, head and key position: fp32 scores + 16-bit probabilities
CHECKPOINT_BYTES = 3         # per layer, token and hidden unit, kept by gradient checkpointing
OUTSIDE_LAYERS_BYTES = 20    # per token and hidden unit: embeddings, final norm, the head's input
LOGIT_BYTES = 10             # per logit at a trained position: fp32 logits, their gradient and a 16-bit copy
TOKEN_OBJECTIVE_POSITIONS = 16  # trained positions per row for token objectives (lm, answer): a generous answer
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # bitsandbytes NF4 with double quantization, block size 64
ADAMW_BYTES = 16             # per trained parameter: fp32 weight, gradient and two moments


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, read from its config on the meta device."""
    parameters: int
    decoder_linear: int        # elements of the decoder's linear weights (what 4-bit quantization stores)
    largest_linear: int
    lora_parameters: int       # r × (in + out) over the targeted linear layers, at the recipe's rank
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    eager_attention: bool


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    optimizer: float
    activations: float
    overhead: float = CUDA_OVERHEAD_GIB * GIB

    @property
    def total_gib(self) -> float:
        return (self.weights + self.optimizer + self.activations + self.overhead) / GIB

    def describe(self) -> str:
        return (f"{self.total_gib:.1f} GiB (weights {self.weights / GIB:.1f}, optimizer {self.optimizer / GIB:.1f}, "
                f"activations {self.activations / GIB:.1f}, CUDA {self.overhead / GIB:.0f})")


def model_shape(config, target_modules: list[str], rank: int) -> ModelShape:
    """Counts from the model built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = [(name, m) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}."]
    lora = sum(rank * (m.in_features + m.out_features) for name, m in linear
               if name.rsplit(".", 1)[-1] in target_modules)
    text = getattr(config, "text_config", None) or config
    return ModelShape(parameters=sum(p.numel() for p in model.parameters()),
                      decoder_linear=sum(m.weight.numel() for _, m in linear),
                      largest_linear=max(m.weight.numel() for _, m in linear), lora_parameters=lora,
                      layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
                      heads=text.num_attention_heads, vocab=text.vocab_size,
                      eager_attention=text.model_type == "gemma2")


def estimate(shape: ModelShape, train, method, dtype_bytes: int, token_objective: bool) -> MemoryEstimate:
    """Peak training memory of the recipe's `train` section with this method (its `Method` object says how it
    holds the base)."""
    params = shape.parameters
    weights = params * dtype_bytes  # the run's base: the zero-shot and fine-tuned evaluations use it
    if method.quantization:  # a 4-bit copy of the decoder's linear layers beside it, one dequantized at a time
        weights += (params - shape.decoder_linear) * dtype_bytes + shape.decoder_linear * NF4_BYTES
        weights += shape.largest_linear * dtype_bytes
    elif method.master_dtype:  # full: fp32 master weights of its own
        weights += params * 4
    elif method.own_base:  # a rewritten copy (PiSSA)
        weights += params * dtype_bytes
    trained = params if method.master_dtype else shape.lora_parameters
    optimizer = trained * (ADAMW_BYTES - (4 if method.master_dtype else 0) + (dtype_bytes if method.master_dtype
                                                                                else 0))
    tokens = train.batch_size * train.max_length
    per_layer = ACTIVATION_BYTES * (shape.hidden + shape.intermediate / 4)
    if shape.eager_attention:
        per_layer += EAGER_SCORE_BYTES * shape.heads * train.max_length
    if train.gradient_checkpointing:
        layers = shape.layers * CHECKPOINT_BYTES * shape.hidden + per_layer
    else:
        layers = shape.layers * per_layer
    positions = TOKEN_OBJECTIVE_POSITIONS if token_objective else 1
    logits = train.batch_size * positions * shape.vocab * LOGIT_BYTES
    activations = tokens * (layers + OUTSIDE_LAYERS_BYTES * shape.hidden) + logits
    return MemoryEstimate(weights=weights, optimizer=optimizer, activations=activations)


def estimate_recipe(recipe) -> MemoryEstimate | None:
    """The estimate for a recipe as it will run, or None where the model's config cannot be read without loading
    it (then the load itself reports the problem)."""
    from transformers import AutoConfig

    from tasktune.errors import TasktuneError
    from tasktune.losses import get_objective
    from tasktune.methods import get_method
    from tasktune.models import choose_dtype, resolve_model_path

    try:
        config = AutoConfig.from_pretrained(resolve_model_path(recipe.model),
                                            trust_remote_code=recipe.trust_remote_code)
        shape = model_shape(config, recipe.train.target_modules, recipe.train.lora_r)
    except (OSError, ValueError, TasktuneError):
        return None
    objective = recipe.train.objective
    token_objective = objective is None or get_objective(objective).labels == "tokens"
    dtype_bytes = choose_dtype(recipe.dtype).dtype.itemsize
    return estimate(shape, recipe.train, get_method(recipe.train.method), dtype_bytes, token_objective)
