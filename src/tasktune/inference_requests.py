"""What a task type asks the runner to compute: a leaf module (no torch), so task types import no model code.

Like lm-evaluation-harness's request types (loglikelihood, generate_until); `runner.py` executes them."""

from __future__ import annotations

from dataclasses import dataclass

from tasktune.errors import TasktuneError


@dataclass(frozen=True)
class Score:
    """The summed log-probability of each continuation's tokens after the context."""
    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]

    @property
    def positions(self) -> int:
        return len(self.context) + max((len(c) for c in self.continuations), default=0)


@dataclass(frozen=True)
class Generate:
    """Greedy generation, until the model's EOS token, a newline (`stop_at_newline`), one of `stop_strings`, or
    `max_new_tokens`. With `watch_token`, also P(watch_token) at the first step (from the same forward),
    and whether greedy decoding would have chosen it; `suppress_watch_token` forbids it as the first token."""
    prompt: tuple[int, ...]
    max_new_tokens: int
    stop_at_newline: bool = False
    watch_token: int | None = None
    suppress_watch_token: bool = False
    stop_strings: tuple[str, ...] = ()  # texts that end a row's answer (cut off with what follows)

    @property
    def positions(self) -> int:
        return len(self.prompt) + self.max_new_tokens


@dataclass(frozen=True)
class Classify:
    """The logits of a sequence-classification head."""
    input: tuple[int, ...]

    @property
    def positions(self) -> int:
        return len(self.input)


def model_positions(config) -> int | None:
    """The longest sequence a model reads (`max_position_embeddings`), None where its config does not say."""
    return getattr(config, "max_position_embeddings", None)


def check_positions(requests: list, examples: list[dict], positions: int | None, source: str) -> None:
    """The one rule for prompts longer than the model reads, for every task type: refused in one line naming
    the row (its prompt and what it would generate or score need more positions than the model has), rather
    than an index error deep in the model. Extractive QA cuts its contexts to eval.max_prompt_tokens first."""
    if positions is None:
        return
    for request, example in zip(requests, examples):
        if request.positions > positions:
            raise TasktuneError(f"{source}, row {example.get('id')}: its prompt needs {request.positions} positions "
                                f"(with its answer) and the model reads at most {positions} "
                                "(config.max_position_embeddings): shorten or drop that row")
