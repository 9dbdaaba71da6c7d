"""Build mc.jsonl: reading comprehension as multiple choice, from the SQuAD v2 dev paragraphs embedded in tasktune
(CC BY-SA 4.0). One question per paragraph (so no passage is shared between training and test rows); its choices
are its gold answer and three answers to the paragraph's other questions (spans of the same passage: plausible
distractors), in a seeded order. Run from this folder: `python make_data.py` (deterministic)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "src" / "tasktune" / "data" / "embedded" / "squad_v2" / \
    "dev-v2.0.part.json.gz"


def main() -> None:
    rng = random.Random(0)
    rows = []
    for article in json.load(gzip.open(SOURCE, "rt", encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            answerable = [q for q in paragraph["qas"] if q["answers"]]
            if not answerable:
                continue
            spans = sorted({q["answers"][0]["text"].strip() for q in answerable})
            if len(spans) < 4:
                continue
            question = rng.choice(answerable)
            gold = question["answers"][0]["text"].strip()
            choices = [gold] + rng.sample([s for s in spans if s != gold], 3)
            rng.shuffle(choices)
            rows.append({"id": question["id"], "passage": paragraph["context"], "question": question["question"],
                         "choices": choices, "answer": choices.index(gold)})
    Path("mc.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote mc.jsonl: {len(rows)} questions")


if __name__ == "__main__":
    main()
