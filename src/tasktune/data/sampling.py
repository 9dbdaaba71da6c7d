"""Seeded samples of a split's parts: the one way a run takes `data.limit_*` rows, in the data's own order."""

from __future__ import annotations

import random


def sample(items: list, limit: int | None, seed: int, keep=None) -> list:
    """A seeded random subset in the original order, or all items. `keep(item)`: items taken before any other
    (the whole sentences of an SST-2 test split), then a seeded sample of the rest up to `limit`."""
    if limit is None or limit >= len(items):
        return list(items)
    first = {i for i, x in enumerate(items) if keep is not None and keep(x)}
    if len(first) >= limit:
        chosen = set(random.Random(seed).sample(sorted(first), limit))
    else:
        rest = [i for i in range(len(items)) if i not in first]
        chosen = first | set(random.Random(seed).sample(rest, limit - len(first)))
    return [x for i, x in enumerate(items) if i in chosen]


def part_limits(data_cfg) -> dict[str, int | None]:
    """How many rows of each part a recipe asks for (None: all)."""
    return {"train": data_cfg.limit_train, "validation": data_cfg.limit_validation, "test": data_cfg.limit_test}


def say_if_short(examples: dict[str, list[dict]], data_cfg) -> None:
    """A row limit above what a part holds is said (the figure's n is then not the recipe's)."""
    for part, limit in part_limits(data_cfg).items():
        if limit is not None and limit > len(examples[part]):
            print(f"[tasktune] data.limit_{part}={limit} is more than the {len(examples[part])} {part} rows: "
                  f"using all {len(examples[part])}")
