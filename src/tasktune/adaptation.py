"""What a variant trains, resolved once: the recipe's method (`methods.Method`) and objective
(`losses.Objective`) as objects, carried from `stages.prepare` through training, validation and the sweep, so
that no stage looks either up by name again."""

from __future__ import annotations

from dataclasses import dataclass

from tasktune.errors import TasktuneError
from tasktune.losses import Objective, get_objective
from tasktune.methods import Method, get_method


@dataclass(frozen=True)
class Adaptation:
    method: Method
    objective: Objective

    @property
    def head(self) -> str:
        """The head the trained model answers with: `causal_lm`, or `seqcls` (a classification head)."""
        return self.objective.head

    @property
    def trains(self) -> bool:
        return self.method.trains

    @classmethod
    def resolve(cls, recipe, task, label_token_ids: list[int] | None, training: bool) -> "Adaptation":
        """The recipe's method and objective. An unset train.objective becomes the task type's choice for these
        verbalizers (single tokens: the fast `verbalizer`; several: `lm`) and is written back into the recipe, so
        that the run records what it trained with; a set one that needs single tokens is refused when they are
        not."""
        if recipe.train.objective is None:
            recipe.train.objective = task.default_objective(label_token_ids is not None)
        objective = get_objective(recipe.train.objective)
        if training and label_token_ids is None and objective.single_token_verbalizers:
            raise TasktuneError(f"train.objective={objective.name} needs single-token verbalizers; those of "
                                f"{task.name!r} are several tokens for this tokenizer: use train.objective=lm")
        return cls(get_method(recipe.train.method), objective)
