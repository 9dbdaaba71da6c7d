"""What a task type asks the runner to compute: a leaf module (no torch), so task types import no model code.

Like lm-evaluation-harness's request types (loglikelihood, generate_until); `runner.py` executes them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Score:
    """The summed log-probability of each continuation's tokens after the context."""
    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Generate:
    """Greedy generation. With `watch_token`, also P(watch_token) at the first step (from the same forward),
    and whether greedy decoding would have chosen it; `suppress_watch_token` forbids it as the first token."""
    prompt: tuple[int, ...]
    max_new_tokens: int
    stop_at_newline: bool = False
    watch_token: int | None = None
    suppress_watch_token: bool = False


@dataclass(frozen=True)
class Classify:
    """The logits of a sequence-classification head."""
    input: tuple[int, ...]
