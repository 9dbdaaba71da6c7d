"""Tasks: each declares its prompt, its target, how to parse a generation and its metrics.

This module also holds what is common to every task: the prompt format (plain text for base models,
the tokenizer's chat template for instruction-tuned ones) and k-shot context drawn with a fixed seed.
"""

from __future__ import annotations

import random

from tasktune.errors import TasktuneError

PROMPT_FORMATS = ("plain", "chat", "auto")


class PromptBuilder:
    """Turns a task's bare prompt into the exact text the model sees, with shots and format applied."""

    def __init__(self, task, tokenizer, prompt_format: str = "plain", shots: int = 0,
                 shot_pool: list[dict] | None = None, seed: int = 0):
        if prompt_format not in PROMPT_FORMATS:
            raise TasktuneError(f"prompt_format {prompt_format!r} is not one of {PROMPT_FORMATS}")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if prompt_format == "auto":
            prompt_format = "chat" if has_template else "plain"
        if prompt_format == "chat" and not has_template:
            raise TasktuneError("prompt_format 'chat' needs a tokenizer with a chat template; "
                                "this one has none (use 'plain' for base models)")
        if shots < 0:
            raise TasktuneError(f"shots must be >= 0, got {shots}")
        if shots and (not shot_pool or len(shot_pool) < shots):
            raise TasktuneError(f"shots={shots} needs at least {shots} training examples to draw from")
        self.task, self.tokenizer, self.format, self.shots = task, tokenizer, prompt_format, shots
        self.examples = random.Random(seed).sample(shot_pool, shots) if shots else []
        self.prefix = "".join(task.prompt(ex) + task.target(ex) + "\n\n" for ex in self.examples)

    @property
    def add_special_tokens(self) -> bool:
        return self.format == "plain"  # a chat template writes its own BOS

    def render(self, example: dict) -> str:
        if self.format == "chat":
            return self.tokenizer.apply_chat_template(self.turns(example), tokenize=False, add_generation_prompt=True)
        return self.prefix + self.task.prompt(example)

    def turns(self, example: dict) -> list[dict]:
        """The conversation a chat template renders: the task's turns (chat data) or its prompt as one user turn,
        with the shots before the first user turn's text."""
        turns = self.task.chat_turns(example) or [{"role": "user", "content": self.task.prompt(example)}]
        if not self.prefix:
            return turns
        first = next(i for i, t in enumerate(turns) if t["role"] == "user")
        return [*turns[:first], {"role": "user", "content": self.prefix + turns[first]["content"]}, *turns[first + 1:]]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"]

    def describe(self) -> dict:
        return {"prompt_format": self.format, "shots": self.shots,
                "shot_ids": [ex.get("id") for ex in self.examples],
                "template": self.task.spec.template}


def get_task(name_or_path: str, verbalizers: list[str] | None = None, max_prompt_tokens: int = 384):
    """The task a recipe names: a shipped spec (`sst2`, `squad_v2`) or a path to a user's spec YAML, built by
    its type's module. Task types are the only code; tasks themselves are data."""
    from tasktune.tasks.base import TaskOptions, task_type
    from tasktune.tasks.spec import load_spec

    spec = load_spec(name_or_path)
    kind = task_type(spec.type, spec.source)
    if verbalizers and not kind.takes_verbalizers:
        raise TasktuneError(f"eval.verbalizers applies to tasks with labels, not to {spec.name!r} ({spec.type})")
    return kind(spec, TaskOptions(tuple(verbalizers) if verbalizers else None, max_prompt_tokens))


# The general text `eval.perplexity: embedded` measures on: the Wikipedia paragraphs of this shipped task's data
# (the package's copy, or $TASKTUNE_DATA_DIR/squad_v2/), a shipped task's data read as plain text.
GENERAL_TEXT_TASK = "squad_v2"


def general_text_paragraphs() -> tuple[dict[str, str | None], str]:
    """({paragraph: its article's title}, where they came from), in the data's order."""
    from tasktune.data import squad
    from tasktune.tasks.spec import load_spec

    rows, origin = squad.load(load_spec(GENERAL_TEXT_TASK), None)
    title_of: dict[str, str | None] = {}
    for row in rows:
        title_of[row["context"]] = row.get("title")
    return title_of, origin
