"""Where rows come from: one hub loader for every dataset module (tested through `datasets` with local files,
the same code path a real hub id takes), and a QA spec that maps its data's own field names."""

import json
import sys

import pytest

from tasktune.errors import TasktuneError
from tasktune.tasks import get_task
from tasktune.tasks.spec import load_spec

QA_SPEC = """name: passages
type: extractive_qa
template: "{context}\\nQ: {question}\\nA:"
data:
  columns: {id: qid, context: passage, question: query, answers: gold}
"""


def qa_rows():
    return [{"qid": "a", "passage": "Paris is in France.", "query": "Where is Paris?",
             "gold": {"text": ["France"], "answer_start": [12]}},
            {"qid": "b", "passage": "Paris is in France.", "query": "Where is Rome?",
             "gold": {"text": [], "answer_start": []}}]


def write_spec(tmp_path, text=QA_SPEC):
    path = tmp_path / "passages.yaml"
    path.write_text(text)
    return str(path)


def test_qa_spec_maps_its_own_field_names(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows()))
    task = get_task(write_spec(tmp_path))
    rows, source = task.load(str(data))
    assert source == str(data)
    assert [r["id"] for r in rows] == ["a", "b"]
    assert rows[0]["context"] == "Paris is in France." and rows[0]["question"] == "Where is Paris?"
    assert rows[0]["answers"] == ["France"] and rows[0]["answer_starts"] == [12] and rows[1]["is_impossible"]
    assert task.prompt(rows[0]) == "Paris is in France.\nQ: Where is Paris?\nA:"
    # The mapped offset is checked as any other: the answer must sit where answer_start says.
    bad = qa_rows()[:1]
    bad[0]["gold"]["answer_start"] = [0]
    data.write_text(json.dumps(bad[0]) + "\n")
    with pytest.raises(TasktuneError, match=r"q.jsonl, line 1 \(id a\): the context at answer_start 0 reads"):
        task.load(str(data))


def test_a_mapped_column_the_data_lacks_is_named(tmp_path):
    data = tmp_path / "q.jsonl"
    row = qa_rows()[0]
    row.pop("passage")
    data.write_text(json.dumps(row) + "\n")
    with pytest.raises(TasktuneError, match=r"q.jsonl, line 1: missing 'passage' \(the task's data.columns.context\)"):
        get_task(write_spec(tmp_path)).load(str(data))


@pytest.mark.parametrize("columns, message", [
    ("{answer: gold}", "data.columns ['answer'] are not question fields"),
    ("{context: text, question: text}", "must map each field to a different, non-empty column name"),
    ("[context, passage]", "data.columns must be a mapping"),
])
def test_bad_qa_column_maps_are_one_line(tmp_path, columns, message):
    text = QA_SPEC.replace("{id: qid, context: passage, question: query, answers: gold}", columns)
    with pytest.raises(TasktuneError, match=pytest.importorskip("re").escape(message)):
        load_spec(write_spec(tmp_path, text))


def test_a_classification_spec_does_not_take_qa_columns(tmp_path):
    text = ('name: t\ntype: classification\ntemplate: "{text}"\nlabels:\n  - {name: a, verbalizer: " a"}\n'
            '  - {name: b, verbalizer: " b"}\ndata:\n  columns: {context: text}\n')
    with pytest.raises(TasktuneError, match="data.text_column and data.label_column"):
        load_spec(write_spec(tmp_path, text))


def test_without_datasets_the_hub_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(TasktuneError, match=r"pip install 'tasktune\[hub\]'"):
        get_task("sst2").load("hub:nyu-mll/glue:sst2")


def test_hub_classification_rows_with_class_labels(tmp_path, local_hub):
    datasets = local_hub
    folder = tmp_path / "glue-like"
    folder.mkdir()
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    datasets.Dataset.from_dict({"sentence": ["dull and slow ", "a delight "], "label": [0, 1]},
                               features=features).to_parquet(str(folder / "train.parquet"))
    rows, source = get_task("sst2").load(f"hub:{folder}")
    assert source == f"hub:{folder}"
    # The ClassLabel integers became their names, then the spec's labels: negative 0, positive 1.
    assert [(r["text"], r["label"]) for r in rows] == [("dull and slow ", 0), ("a delight ", 1)]


def test_hub_qa_rows_go_through_the_same_checks(tmp_path, local_hub):
    folder = tmp_path / "qa-like"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_rows()))
    task = get_task(write_spec(tmp_path))
    rows, source = task.load(f"hub:{folder}")
    assert source == f"hub:{folder}" and [r["answers"] for r in rows] == [["France"], []]
    bad = qa_rows()
    bad[0]["gold"]["answer_start"] = [3]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    with pytest.raises(TasktuneError, match=r"hub:.*qa-like\[0\] \(id a\): the context at answer_start 3"):
        task.load(f"hub:{folder}")
