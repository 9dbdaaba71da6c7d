"""Deterministic train/validation/test splits, saved as row ids in the run directory."""

from __future__ import annotations

import contextlib

from sklearn.model_selection import GroupShuffleSplit, train_test_split

from tasktune.errors import TasktuneError


@contextlib.contextmanager
def split_errors(key: str, n: int):
    """scikit-learn's refusals (a share that leaves a side with no row, or fewer rows than labels) as one line
    naming the recipe key."""
    try:
        yield
    except ValueError as exc:
        raise TasktuneError(f"{key}: cannot split {n} rows with it ({' '.join(str(exc).split())}); expected a "
                            "share that leaves at least one row of every label on each side") from None


def validation_size(requested: int, train_rows: int) -> int:
    """data.val_size, reduced (and said so) when it would take more than half of the training part."""
    if train_rows < 4:
        raise TasktuneError(f"data: the training part has {train_rows} rows; expected at least 4 to hold out a "
                            "validation slice (more data, or a smaller data.test_size)")
    used = min(requested, train_rows // 2)
    if used < requested:
        print(f"[tasktune] data.val_size={requested} is more than half of the {train_rows} training rows: "
              f"using {used}")
    return used


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


# --- Leak-free splits of phrase-level data ------------------------------------------------------------------
# GLUE's SST-2 train file holds every phrase of each review's parse tree as its own row ("a fine film", "fine
# film", "film", ...). A row-level split puts pieces of one sentence on both sides, so most test rows occur
# word for word inside training rows. `containment_split` splits whole sentences instead: it splits the rows
# that no other row contains (the sentences), then sends every other row to training if any training sentence
# contains it, else to test. Containment is transitive, so no test row occurs inside any training row.


def normalize_text(text: str) -> str:
    return " ".join(text.lower().split())


class ContainmentIndex:
    """Which texts contain a given text as a whole-token substring. An inverted index on each text's rarest
    token keeps the search to the few texts that can contain it."""

    def __init__(self, texts: list[str]):
        self.texts = texts
        self.by_token: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            for token in set(text.split()):
                self.by_token.setdefault(token, []).append(i)
        self._joined: dict[str, str] = {}

    def occurrences(self, text: str) -> int:
        """How many times ` text ` occurs across the indexed texts (a text equal to it counts once)."""
        tokens = set(text.split())
        if not tokens or any(t not in self.by_token for t in tokens):
            return 0
        rarest = min(tokens, key=lambda t: (len(self.by_token[t]), t))
        if rarest not in self._joined:
            self._joined[rarest] = "\n".join(f" {self.texts[i]} " for i in self.by_token[rarest])
        return self._joined[rarest].count(f" {text} ")


def containment_split(texts: list[str], labels: list[int], test_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a split where no test text occurs inside (or equals) a training text; stratified by label
    over the sentences (texts no other text contains)."""
    unique = list(dict.fromkeys(normalize_text(t) for t in texts))
    label_of = {}
    for text, label in zip(texts, labels):
        label_of.setdefault(normalize_text(text), label)
    index = ContainmentIndex(unique)
    roots = [u for u in unique if index.occurrences(u) == 1]
    root_train, root_test = stratified_split([label_of[r] for r in roots], test_size, seed)
    train_roots = ContainmentIndex([roots[i] for i in root_train])
    test_texts = {roots[i] for i in root_test}
    test_texts |= {u for u in unique if u not in test_texts and train_roots.occurrences(u) == 0}
    train, test = [], []
    for i, text in enumerate(texts):
        (test if normalize_text(text) in test_texts else train).append(i)
    return train, test


def whole_sentences(texts: list[str]) -> list[bool]:
    """For each text, whether it is a whole sentence: no other text of the file contains it. GLUE's SST-2 file
    holds every phrase of a review's parse tree as a row; what users mean by SST-2 accuracy is the sentences."""
    unique = list(dict.fromkeys(normalize_text(t) for t in texts))
    index = ContainmentIndex(unique)
    whole = {u for u in unique if index.occurrences(u) == 1}
    return [normalize_text(t) in whole for t in texts]


def text_overlap(test_texts: list[str], train_texts: list[str]) -> dict:
    """How much of the test set the training part has seen: exact duplicates, and test rows that occur as a
    whole-token substring of some training row (duplicates included)."""
    train_unique = list(dict.fromkeys(normalize_text(t) for t in train_texts))
    seen = set(train_unique)
    index = ContainmentIndex(train_unique)
    normalized = [normalize_text(t) for t in test_texts]
    exact = sum(t in seen for t in normalized)
    contained = sum(t in seen or index.occurrences(t) > 0 for t in normalized)
    n = len(test_texts)
    return {"test_rows": n, "exact_duplicates": exact, "contained_in_training": contained,
            "exact_rate": exact / n if n else 0.0, "contained_rate": contained / n if n else 0.0}


def near_duplicates(test_texts: list[str], train_texts: list[str], n: int = 5, threshold: float = 0.8) -> int:
    """Test rows that nearly repeat a training row: the Jaccard similarity of their word n-gram sets (after
    `normalize_text`) is at least `threshold` with some training row. An inverted index from n-gram to the
    training rows holding it keeps this linear in the shared n-grams, not quadratic in rows."""
    from collections import Counter

    def shingles(text: str) -> set[tuple[str, ...]]:
        words = normalize_text(text).split()
        return {tuple(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}

    train_sets = [shingles(t) for t in train_texts]
    index: dict[tuple[str, ...], list[int]] = {}
    for row, grams in enumerate(train_sets):
        for gram in grams:
            index.setdefault(gram, []).append(row)
    found = 0
    for text in test_texts:
        grams = shingles(text)
        shared = Counter(row for gram in grams for row in index.get(gram, ()))
        found += any(common / (len(grams) + len(train_sets[row]) - common) >= threshold
                     for row, common in shared.items())
    return found


OVERLAP_WARNING = 0.01  # share of test rows seen in training above which a run warns


def overlap_warning(overlap: dict) -> str | None:
    rates = {k: v for k, v in overlap.items() if k.endswith("_rate") and v > OVERLAP_WARNING}
    if not rates:
        return None
    return ("warning: the test set overlaps the training part (" + ", ".join(
        f"{k.removesuffix('_rate').replace('_', ' ')} {100 * v:.1f}%" for k, v in rates.items())
            + " of test rows): its figures partly measure memory, not generalisation")
