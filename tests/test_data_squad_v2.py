import json

import pytest

from tasktune.config import DataConfig
from tasktune.tasks import get_task

from tasktune.errors import TasktuneError
from tiny import squad_doc, write_squad_json

squad_v2 = get_task("squad_v2")


def test_official_json(tmp_path):
    rows, _ = squad_v2.load(str(write_squad_json(tmp_path / "dev.json")))
    assert len(rows) == 12
    q1 = rows[0]
    assert q1["answers"] == ["Paris", "Paris"] and not q1["is_impossible"] and q1["title"] == "Article_0"
    assert rows[2]["answers"] == [] and rows[2]["is_impossible"]


def test_directory_pools_files_and_rejects_duplicate_ids(tmp_path):
    write_squad_json(tmp_path / "a.json", 2)
    doc = squad_doc(2)
    for article in doc["data"]:
        article["title"] += "_b"
        for qa in article["paragraphs"][0]["qas"]:
            qa["id"] += "-b"
    (tmp_path / "b.json").write_text(json.dumps(doc))
    rows, source = squad_v2.load(str(tmp_path))
    assert len(rows) == 12 and "a.json" in source and "b.json" in source
    (tmp_path / "c.json").write_text(json.dumps(squad_doc(1)))
    with pytest.raises(TasktuneError, match="duplicate question id 'a0-q1'"):
        squad_v2.load(str(tmp_path))


def test_jsonl_hub_layout(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "x", "title": "T", "context": "c", "question": "q?",
                                "answers": {"text": ["c"], "answer_start": [0]}}) + "\n" +
                    json.dumps({"id": "y", "title": "T", "context": "c", "question": "q?",
                                "answers": {"text": [], "answer_start": []}}) + "\n")
    rows, _ = squad_v2.load(str(path))
    assert rows[0]["answers"] == ["c"] and rows[1]["is_impossible"]


def broken(mutate):
    doc = squad_doc(1)
    mutate(doc)
    return doc


@pytest.mark.parametrize("doc, message", [
    ({"version": "v2"}, "missing 'data'"),
    (broken(lambda d: d["data"][0].pop("paragraphs")), "data\\[0\\]: missing 'paragraphs'"),
    (broken(lambda d: d["data"][0]["paragraphs"][0].pop("qas")), "missing 'qas'"),
    (broken(lambda d: d["data"][0]["paragraphs"][0].pop("context")), "missing 'context'"),
    (broken(lambda d: d["data"][0]["paragraphs"][0]["qas"][0].pop("id")), "qas\\[0\\]: missing 'id'"),
    (broken(lambda d: d["data"][0]["paragraphs"][0]["qas"][1].pop("question")), "qas\\[1\\].*missing 'question'"),
    (broken(lambda d: d["data"][0]["paragraphs"][0]["qas"][1].update(id="a0-q1")), "duplicate question id"),
    (broken(lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(answers=[])),
     "answerable question .* has no answers"),
])
def test_bad_official_json(tmp_path, doc, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(TasktuneError, match=message) as err:
        squad_v2.load(str(path))
    assert str(path) in str(err.value)


def test_malformed_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"data": [')
    with pytest.raises(TasktuneError, match="malformed JSON at line 1"):
        squad_v2.load(str(path))


def test_grouped_split_keeps_articles_apart(tmp_path):
    rows, _ = squad_v2.load(str(write_squad_json(tmp_path / "d.json", n_articles=10)))
    task = get_task("squad_v2")
    split = task.split(rows, DataConfig(seed=1, val_size=3))
    title = {r["id"]: r["title"] for r in rows}
    test_titles = {title[i] for i in split["test"]}
    val_titles = {title[i] for i in split["validation"]}
    train_titles = {title[i] for i in split["train"]}
    assert test_titles and val_titles and train_titles
    assert not test_titles & (train_titles | val_titles) and not val_titles & train_titles
    assert len(split["validation"]) == 3  # 3 of the one held-out article's questions; the rest is unused
    assert len(split["train"]) + len(split["validation"]) + len(split["test"]) == 30  # 10 articles × 3
    assert split == task.split(rows, DataConfig(seed=1, val_size=3))
    overlap = task.overlap([r for r in rows if r["id"] in split["train"]], [r for r in rows if r["id"] in split["test"]])
    # Every tiny article has the same context text: a by-article split cannot keep identical texts apart,
    # and the overlap report says so.
    assert overlap["shared_context_rate"] == 1.0
    by_question = task.split(rows, DataConfig(seed=1, val_size=3, split_by="question"))
    assert len(by_question["test"]) == 6 and len(by_question["validation"]) == 3


def test_context_truncation_keeps_the_answer(tiny_llama, tmp_path):
    from tasktune.models import load_model
    from tasktune.tasks import PromptBuilder

    lm = load_model(str(tiny_llama), dtype="fp32")
    task = get_task("squad_v2")
    builder = PromptBuilder(task, lm.tokenizer)
    filler = "the film is very quite good . " * 40
    context = filler + "the Seine flows through Paris . " + filler
    ex = {"id": "x", "title": "T", "question": "what river ?", "context": context, "answers": ["Seine"],
          "answer_starts": [context.index("Seine")]}
    ids, truncated = task.fit_prompt(builder, ex, 80, keep_answer=True)
    assert truncated and len(ids) <= 80
    assert "Seine" in lm.tokenizer.decode(ids)
    ids, truncated = task.fit_prompt(builder, ex, 80, keep_answer=False)
    assert truncated and len(ids) <= 80 and "Seine" not in lm.tokenizer.decode(ids)


def test_real_squad_files(shared_data):
    rows, _ = squad_v2.load(str(shared_data / "squad_v2"))
    assert len(rows) == 5147 + 5297
    assert sum(r["is_impossible"] for r in rows) == 348 + 2569
