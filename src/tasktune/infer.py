"""Batched inference: verbalizer scoring, classifier heads and greedy generation.

Batches are length-sorted (little padding) and left-padded (the last position of every row is the last
real token). Position ids are derived from the attention mask, so a padded row is computed exactly as
it would be alone.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass


import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList


def unwrap(model):
    """The plain transformers model under a peft wrapper (LoRA layers stay injected in it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def last_hidden_state(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final-layer hidden state at the last position, [batch, hidden], without any vocabulary logits."""
    lm = unwrap(model)
    backbone = getattr(lm, lm.base_model_prefix)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    return out.last_hidden_state[:, -1, :]


def head_logits(model, hidden: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
    """LM-head logits for a 2-D hidden state, optionally for a few vocabulary rows only.

    Applying the head to a 2-D tensor avoids a slow bf16 path seen with `logits_to_keep=1` on CPU.
    Soft-capping (Gemma 2) is applied, so values equal the model's own logits.
    """
    lm = unwrap(model)
    head = lm.get_output_embeddings()
    weight = head.weight if rows is None else head.weight[rows]
    logits = hidden.to(weight.dtype) @ weight.T
    if getattr(head, "bias", None) is not None:
        logits = logits + (head.bias if rows is None else head.bias[rows])
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def progress(items, desc: str):
    """A progress bar on the main process only (RANK is set by accelerate launch / torchrun)."""
    return tqdm(items, desc=desc, leave=False, disable=int(os.environ.get("RANK", "0")) != 0)


def batches(encoded: list[list[int]], batch_size: int):
    """Yield lists of example indices, longest first, `batch_size` at a time."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


@torch.inference_mode()
def score_tokens(model, encoded: list[list[int]], token_ids: list[int], pad_id: int,
                 batch_size: int = 16, desc: str = "score") -> torch.Tensor:
    """Log-probability of each candidate next token after each prompt: [n, len(token_ids)], fp32.

    This is the lm-evaluation-harness log-likelihood of single-token continuations: the full-vocabulary
    log-softmax is taken at the last position only.
    """
    out = torch.empty((len(encoded), len(token_ids)), dtype=torch.float32)
    chunks = list(batches(encoded, batch_size))
    for idx in progress(chunks, desc):
        ids, mask = left_pad([encoded[i] for i in idx], pad_id)
        hidden = last_hidden_state(model, ids.to(model.device), mask.to(model.device))
        logprobs = torch.log_softmax(head_logits(model, hidden).float(), dim=-1)
        out[idx] = logprobs[:, token_ids].cpu()
    return out


@torch.inference_mode()
def score_continuations(model, encoded: list[list[int]], continuations: list[list[int]], pad_id: int,
                        batch_size: int = 16, desc: str = "score") -> torch.Tensor:
    """Summed log-probability of each multi-token continuation after each prompt: [n, len(continuations)], fp32
    (lm-evaluation-harness's loglikelihood). Each (prompt, continuation) pair is one left-padded row; the LM head
    is applied only at the positions that predict a continuation token."""
    k = len(continuations)
    out = torch.empty((len(encoded), k), dtype=torch.float32)
    per_batch = max(1, batch_size // k)  # rows per forward stay near batch_size
    for idx in progress(list(batches(encoded, per_batch)), desc):
        rows = [encoded[i] + cont for i in idx for cont in continuations]
        ids, mask = left_pad(rows, pad_id)
        lm = unwrap(model)
        backbone = getattr(lm, lm.base_model_prefix)
        hidden = backbone(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                          position_ids=position_ids_from_mask(mask).to(model.device), use_cache=False).last_hidden_state
        width = ids.shape[1]
        for row, (i, cont) in enumerate((i, cont) for i in idx for cont in continuations):
            positions = torch.arange(width - len(cont) - 1, width - 1, device=hidden.device)
            logprobs = torch.log_softmax(head_logits(model, hidden[row, positions]).float(), dim=-1)
            target = torch.tensor(cont, device=logprobs.device)
            out[i, row % k] = logprobs.gather(1, target[:, None]).sum().cpu()
    return out


@torch.inference_mode()
def classify(model, encoded: list[list[int]], pad_id: int, batch_size: int = 16,
             desc: str = "classify") -> torch.Tensor:
    """Logits of a sequence-classification head: [n, num_labels], fp32."""
    out = None
    for idx in progress(list(batches(encoded, batch_size)), desc):
        ids, mask = left_pad([encoded[i] for i in idx], pad_id)
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                       position_ids=position_ids_from_mask(mask).to(model.device)).logits.float().cpu()
        if out is None:
            out = torch.empty((len(encoded), logits.shape[-1]), dtype=torch.float32)
        out[idx] = logits
    return out


class NewlineStop(StoppingCriteria):
    """Stops a row once its newest token contains a newline.

    transformers' `stop_strings` precomputes over the whole vocabulary and fails on some tokenizers
    (word-level ones); decoding one token per row per step is cheap and works for any tokenizer.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        last = self.tokenizer.batch_decode(input_ids[:, -1:].tolist())
        return torch.tensor(["\n" in text for text in last], dtype=torch.bool, device=input_ids.device)


class StopStrings(StoppingCriteria):
    """Stops a row once the text it generated holds one of `stops` (special tokens kept, so an EOS or a chat
    template's end-of-turn token written as text counts). Decoding each row's new tokens per step, as
    `NewlineStop` does, works for any tokenizer; stops are few and answers short."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_length: int):
        self.tokenizer, self.stops, self.prompt_length = tokenizer, stops, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:].tolist())
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool,
                            device=input_ids.device)


def cut_at_stops(text: str, stops: tuple[str, ...]) -> str:
    """The text before the first of `stops` it holds."""
    ends = [text.find(s) for s in stops if s in text]
    return text[:min(ends)] if ends else text


class FirstStepWatch(LogitsProcessor):
    """At the first generation step, reads P(token), whether it is the greedy choice, and its margin (its logit
    minus the best other token's: > 0 exactly when greedy picks it) from the raw logits, and with `suppress`
    forbids it. Reading it here, rather than with `output_logits=True`, keeps one
    [batch, vocab] row instead of one per generated step (Gemma 3: 32 steps x 16 rows x 262k fp32 = 0.5 GiB
    for one SQuAD batch)."""

    def __init__(self, token_id: int, suppress: bool):
        self.token_id, self.suppress = token_id, suppress
        self.probs: list[float] | None = None
        self.top: list[bool] | None = None
        self.margins: list[float] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.probs is None:
            raw = scores.float()
            self.probs = torch.softmax(raw, dim=-1)[:, self.token_id].cpu().tolist()
            self.top = (raw.argmax(-1) == self.token_id).cpu().tolist()
            others = raw.clone()
            others[:, self.token_id] = -float("inf")
            self.margins = (raw[:, self.token_id] - others.max(-1).values).cpu().tolist()
            if self.suppress:
                scores = scores.clone()
                scores[:, self.token_id] = -float("inf")
        return scores


@dataclass
class Generations:
    texts: list[str]
    first_token_probs: list[float] | None = None  # P(first_token_id) at the first step
    first_token_is_top: list[bool] | None = None  # would plain greedy have chosen it?
    first_token_margins: list[float] | None = None  # its logit minus the best other token's (> 0: greedy's choice)


@torch.inference_mode()
def generate(model, tokenizer, encoded: list[list[int]], max_new_tokens: int, batch_size: int = 16,
             stop_at_newline: bool = False, first_token_id: int | None = None, suppress_first: bool = False,
             stop_strings: tuple[str, ...] = (), desc: str = "generate") -> Generations:
    """Greedy generation for every prompt, batched with a KV cache.

    With `first_token_id`, also return that token's probability at the first generation step, read from the
    raw logits of the same forward pass that chose the first token (no second pass). `suppress_first` forbids
    it as the first token, so the text is the best non-abstaining answer while the probability still tells
    how much the model wanted to abstain.
    """
    texts: list[str] = [""] * len(encoded)
    first_probs = [0.0] * len(encoded) if first_token_id is not None else None
    first_top = [False] * len(encoded) if first_token_id is not None else None
    first_margins = [0.0] * len(encoded) if first_token_id is not None else None
    lm = unwrap(model)
    extra = {}
    with foldable_lm_head(lm):
        for idx in progress(list(batches(encoded, batch_size)), desc):
            ids, mask = left_pad([encoded[i] for i in idx], tokenizer.pad_token_id)
            watch = None
            if first_token_id is not None:
                watch = FirstStepWatch(first_token_id, suppress_first)
                extra["logits_processor"] = LogitsProcessorList([watch])
            stops = ([NewlineStop(tokenizer)] if stop_at_newline else []) + (
                [StopStrings(tokenizer, stop_strings, ids.shape[1])] if stop_strings else [])
            if stops:
                extra["stopping_criteria"] = StoppingCriteriaList(stops)
            out = lm.generate(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                              max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              top_p=None, top_k=None, temperature=None,
                              pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                              use_cache=True,  # the Trainer switches `config.use_cache` off
                              **extra)
            new_tokens = out.sequences[:, ids.shape[1]:]
            if stop_strings:  # cut at the first stop text, then drop any special token left in the answer
                decoded = [cut_at_stops(text, stop_strings) for text in tokenizer.batch_decode(new_tokens)]
                for special in tokenizer.all_special_tokens:
                    decoded = [text.replace(special, "") for text in decoded]
            else:
                decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for row, i in enumerate(idx):
                texts[i] = decoded[row].split("\n", 1)[0] if stop_at_newline else decoded[row]
            if watch is not None:
                for row, i in enumerate(idx):
                    first_probs[i], first_top[i] = watch.probs[row], watch.top[row]
                    first_margins[i] = watch.margins[row]
    return Generations(texts, first_probs, first_top, first_margins)


@contextmanager
def foldable_lm_head(lm):
    """Let matmul fold the decode step's [batch, 1, hidden] @ head into one 2-D matmul.

    torch.matmul only folds a 3-D input whose leading strides are "contiguous" unless the weight requires grad;
    Gemma 3's decode-step hidden state fails that stride test, so with a frozen head (any model after
    LoRA or peft loading) it broadcasts the head into a [batch, hidden, vocab] copy: 45 s and 22 GiB for one
    batch of 64 SST-2 prompts instead of 2 s. Under no_grad the flag builds no graph; it is restored after.
    """
    weight = lm.get_output_embeddings().weight
    was = weight.requires_grad
    weight.requires_grad_(True)
    try:
        yield
    finally:
        weight.requires_grad_(was)


def merge_for_inference(model) -> torch.nn.Module:
    """Fold LoRA weights into the base weights: peft-wrapped evaluation runs at about half speed."""
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.config.use_cache = True  # training turned it off
    return merged.eval()


