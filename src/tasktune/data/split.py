"""Deterministic train/validation/test splits, saved as row ids in the run directory."""

from __future__ import annotations

from sklearn.model_selection import GroupShuffleSplit, train_test_split

from tasktune.errors import TasktuneError


def stratified_split(labels: list[int], test_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a stratified split (the seed project's 80:20 protocol)."""
    idx = list(range(len(labels)))
    if len(set(labels)) < 2 or min(labels.count(v) for v in set(labels)) < 2:
        raise TasktuneError("a stratified split needs at least 2 examples of each label")
    train, test = train_test_split(idx, test_size=test_size, random_state=seed, stratify=labels)
    return sorted(train), sorted(test)


def grouped_split(groups: list[str], test_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a split where no group (e.g. a SQuAD article) lands on both sides."""
    if len(set(groups)) < 2:
        raise TasktuneError("a grouped split needs at least 2 groups (articles)")
    splitter = GroupShuffleSplit(n_splits=1, test_size=test_size, random_state=seed)
    train, test = next(splitter.split(groups, groups=groups))
    return sorted(train.tolist()), sorted(test.tolist())


def random_split(n: int, test_size: float, seed: int) -> tuple[list[int], list[int]]:
    train, test = train_test_split(list(range(n)), test_size=test_size, random_state=seed)
    return sorted(train), sorted(test)
