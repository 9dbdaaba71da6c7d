"""Build chat.jsonl: SST-2 sentiment as a conversation in the `messages` format TRL and OpenAI write: a system
turn, one review the assistant already labelled, then a second review whose label is the target (so every row keeps
an earlier exchange as context). From the SST-2 training sentences embedded in tasktune (GLUE); only rows of 12
words or more (SST-2's file also holds short phrases), each review used once. Run from this folder:
`python make_data.py` (deterministic)."""

from __future__ import annotations

import csv
import gzip
import json
import random
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "src" / "tasktune" / "data" / "embedded" / "sst2" / "train.tsv.gz"
ROWS = 600
SYSTEM = "Classify the sentiment of each movie review. Answer with one word: positive or negative."


def main() -> None:
    with gzip.open(SOURCE, "rt", encoding="utf-8") as f:
        reviews = [(r["sentence"].strip(), "positive" if r["label"] == "1" else "negative")
                   for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                   if len(r["sentence"].split()) >= 12]
    reviews = list(dict.fromkeys(reviews))
    random.Random(0).shuffle(reviews)
    rows = []
    for (first, first_label), (second, second_label) in zip(reviews[0:2 * ROWS:2], reviews[1:2 * ROWS:2]):
        rows.append({"messages": [{"role": "system", "content": SYSTEM},
                                  {"role": "user", "content": first},
                                  {"role": "assistant", "content": first_label},
                                  {"role": "user", "content": second},
                                  {"role": "assistant", "content": second_label}]})
    Path("chat.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    positive = sum(r["messages"][-1]["content"] == "positive" for r in rows)
    print(f"wrote chat.jsonl: {len(rows)} conversations, {positive} with a positive answer")


if __name__ == "__main__":
    main()
