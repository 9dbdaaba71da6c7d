"""Build json.jsonl: a question about one sentence of a Wikipedia passage, answered as a JSON object
`{"answerable": true, "answer": "<span>"}` or `{"answerable": false, "answer": null}`, from the SQuAD v2 dev
paragraphs embedded in tasktune (CC BY-SA 4.0). One question per paragraph, drawn with a fixed seed among all of
its questions (answerable or not), so no passage is shared between training and test rows. The sentence shown is
the one holding the answer; for an unanswerable question, the one holding SQuAD v2's plausible answer where the
data has one, else the sentence sharing the most words with the question (where a reader would look), so the
sentence does not give away which kind a question is. Sentences are cut at ". ", "! " and "? " (a regular
expression: nltk's sentence model needs a download). Run from this folder: `python make_data.py` (deterministic)."""

from __future__ import annotations

import gzip
import json
import random
import re
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "src" / "tasktune" / "data" / "embedded" / "squad_v2" / \
    "dev-v2.0.part.json.gz"


def sentences(context: str) -> list[tuple[int, int]]:
    bounds = [0] + [m.end() for m in re.finditer(r"(?<=[.!?])\s+", context)] + [len(context)]
    return list(zip(bounds, bounds[1:]))


def sentence_at(context: str, start: int) -> str:
    """The sentence of `context` that holds character `start`."""
    return next(context[lo:hi].strip() for lo, hi in sentences(context) if lo <= start < hi)


def closest_sentence(context: str, question: str) -> str:
    """The sentence sharing the most words (of four letters or more) with the question; the first on a tie."""
    words = {w for w in re.findall(r"\w{4,}", question.lower())}
    parts = [context[lo:hi].strip() for lo, hi in sentences(context)]
    return max(parts, key=lambda s: len(words & set(re.findall(r"\w{4,}", s.lower()))))


def main() -> None:
    rng = random.Random(0)
    rows = []
    for article in json.load(gzip.open(SOURCE, "rt", encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            question = rng.choice(paragraph["qas"])
            spans = question["answers"] or question.get("plausible_answers") or []
            sentence = (sentence_at(paragraph["context"], spans[0]["answer_start"]) if spans
                        else closest_sentence(paragraph["context"], question["question"]))
            answer = question["answers"][0]["text"].strip() if question["answers"] else None
            if answer is not None and answer not in sentence:  # an answer across a sentence boundary
                continue
            rows.append({"id": question["id"], "sentence": sentence, "question": question["question"].strip(),
                         "json": json.dumps({"answerable": answer is not None, "answer": answer},
                                            ensure_ascii=False)})
    Path("json.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    answerable = sum('"answerable": true' in r["json"] for r in rows)
    print(f"wrote json.jsonl: {len(rows)} questions, {answerable} answerable")


if __name__ == "__main__":
    main()
