"""Model FLOPs of one LoRA training step, for model FLOP utilisation (MFU).

With the base frozen, backward computes input gradients (as many FLOPs as the forward) but no weight gradients
for the base; the adapter's weights get theirs. So a step costs
  2 x forward                       (forward + input-gradient backward through every matmul)
  + 2 x (LoRA parameters) x tokens  (the adapter's weight gradients)
where the forward counts 2 FLOPs per multiply-add of the decoder's linear layers, the attention products
(QK^T and AV, 4 * layers * seq * heads * head_dim per token, the causal half not discounted, as PaLM's MFU
does not) and the LM head at the positions it is applied to (every position for a full LM loss, one per row for
the verbalizer/label_lm objectives, the answer tokens for `answer`). The common 6N rule assumes full fine-tuning
and a full LM head; it overstates a LoRA step by about half.
"""

from __future__ import annotations


def decoder_linear_params(config) -> int:
    """Weights of the decoder layers' linear maps (attention projections and the gated MLP)."""
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    attention = d * q + 2 * d * kv + q * d
    mlp = 3 * d * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp)


def lora_training_flops(config, rows: int, seq_len: int, head_positions: int, lora_params: int) -> float:
    """FLOPs of one training step over `rows` rows of `seq_len` tokens (see the module docstring).

    `head_positions` is the number of positions per row the LM head is applied to.
    """
    tokens = rows * seq_len
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * config.num_hidden_layers * seq_len * config.num_attention_heads * head_dim
    forward = 2 * decoder_linear_params(config) * tokens + attention * tokens
    forward += 2 * config.hidden_size * config.vocab_size * rows * head_positions
    return 2 * forward + 2 * lora_params * tokens
