"""Tasks as data: shipped specs, user specs, and the one-line errors for malformed ones (before any model)."""

import json
import shutil
from pathlib import Path

import pytest

from tasktune.cli import main
from tasktune.config import load_recipe
from tasktune.errors import TasktuneError
from tasktune.tasks import get_task
from tasktune.tasks.spec import load_spec

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "examples" / "news-topics"

GOOD = """name: tickets
type: classification
template: "Ticket: {body}\\nTeam:"
labels:
  - {name: billing, verbalizer: " billing", values: ["bill", "billing"]}
  - {name: outage, verbalizer: " outage"}
  - {name: other, verbalizer: " something else"}
data:
  text_column: [body]
  label_column: [team]
"""


def write(tmp_path, text, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_shipped_tasks_list_and_show(capsys):
    assert main(["tasks"]) == 0
    listing = capsys.readouterr().out
    assert "sst2" in listing and "squad_v2" in listing and "extractive_qa" in listing
    assert main(["tasks", "show", "sst2"]) == 0
    shown = capsys.readouterr().out
    assert shown == (ROOT / "src" / "tasktune" / "tasks" / "sst2.yaml").read_text()
    assert load_spec("sst2").labels[1].verbalizer == " positive"


def test_user_spec_loads_and_reads_its_own_columns(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert [label.name for label in spec.labels] == ["billing", "outage", "other"]
    data = tmp_path / "t.csv"
    data.write_text("team,body,extra\nBILL,charged twice,x\noutage,site down,y\nother,hello there,z\n")
    rows, _ = get_task(spec.source).load(str(data))
    assert [r["label"] for r in rows] == [0, 1, 2]
    assert rows[0]["fields"]["extra"] == "x" and get_task(spec.source).prompt(rows[1]) == "Ticket: site down\nTeam:"


@pytest.mark.parametrize("change, message", [
    (("type: classification", "type: regression"), "type 'regression' is not one of"),
    (("template:", "templat:"), "unknown key(s) ['templat']"),
    (('"Ticket: {body}\\nTeam:"', '"Ticket: {0}"'), "must be a plain name"),
    (('"Ticket: {body}\\nTeam:"', '"Ticket: {body.__class__}"'), "must be a plain name"),
    (('"Ticket: {body}\\nTeam:"', '"Ticket: {body!r}"'), "must be a plain name"),
    (('"Ticket: {body}\\nTeam:"', '"no fields"'), "template has no field"),
    (('verbalizer: " outage"', 'verbalizer: " billing"'), "are not different words"),
    (('verbalizer: " something else"', 'verbalizer: " billing extra"'), "is the start of"),
    (('{name: outage, verbalizer: " outage"}', '{name: outage, verbalizer: " outage", values: [bill]}'),
     "stands for both 'billing' and 'outage'"),
    (('  - {name: outage, verbalizer: " outage"}\n  - {name: other, verbalizer: " something else"}\n', ''),
     "at least 2 labels"),
])
def test_malformed_spec_is_one_line_before_any_model(tmp_path, change, message):
    text = GOOD.replace(*change)
    assert text != GOOD
    spec = write(tmp_path, text)
    with pytest.raises(TasktuneError, match=pytest.importorskip("re").escape(message)):
        load_spec(spec)
    recipe = write(tmp_path, f"name: r\ntask: {spec}\nmodel: /nonexistent/model\n", "recipe.yaml")
    with pytest.raises(TasktuneError, match=pytest.importorskip("re").escape(message)):
        load_recipe(recipe)  # the recipe fails on the spec, never reaching the (missing) model


def test_template_field_the_data_lacks(tmp_path):
    spec = write(tmp_path, GOOD.replace("{body}", "{subject}"))
    data = tmp_path / "t.csv"
    data.write_text("team,body\nbill,charged twice\n")
    with pytest.raises(TasktuneError, match=r"template names field\(s\) \['subject'\] that the data lacks"):
        get_task(spec).load(str(data))


def test_spec_is_data_never_code(tmp_path):
    # A YAML tag that would build a Python object is refused by safe_load.
    spec = write(tmp_path, "!!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(TasktuneError, match="not valid YAML"):
        load_spec(spec)
    with pytest.raises(TasktuneError, match="neither a shipped task"):
        load_spec("no_such_task")


def test_labels_that_collide_after_tokenization(tiny_llama, tmp_path):
    """Two verbalizers the tokenizer reads as the same tokens (both unknown words) cannot be told apart."""
    from tasktune.models import load_model
    from tasktune.tasks import PromptBuilder

    spec = write(tmp_path, GOOD.replace('" outage"', '" zzzunknown"').replace('" billing"', '" qqqunknown"'))
    task = get_task(spec)
    lm = load_model(str(tiny_llama), dtype="fp32")
    row = {"id": 0, "text": "x", "label": 0, "fields": {"text": "x", "body": "the film"}}
    with pytest.raises(TasktuneError, match="tokenize to the same tokens"):
        task.verbalizer_tokens(PromptBuilder(task, lm.tokenizer), row)


def test_multi_token_verbalizers_sum_their_log_probabilities(tiny_llama):
    """`score` of a multi-token verbalizer equals the sum of its tokens' log-probabilities, computed one token
    at a time with plain forward passes, and batching does not change it."""
    import torch

    from tasktune.infer import score_continuations
    from tasktune.models import load_model

    lm = load_model(str(tiny_llama), dtype="fp32")
    tok = lm.tokenizer
    prompts = [tok("the film was good Answer :")["input_ids"], tok("dull")["input_ids"]]
    continuations = [tok(" very good", add_special_tokens=False)["input_ids"],
                     tok(" bad", add_special_tokens=False)["input_ids"]]
    got = score_continuations(lm.model, prompts, continuations, tok.pad_token_id, batch_size=4)
    single = score_continuations(lm.model, prompts, continuations, tok.pad_token_id, batch_size=1)
    torch.testing.assert_close(got, single, atol=1e-5, rtol=1e-5)
    for i, prompt in enumerate(prompts):
        for k, cont in enumerate(continuations):
            total = 0.0
            for j, token in enumerate(cont):
                logits = lm.model(input_ids=torch.tensor([prompt + cont[:j]])).logits[0, -1]
                total += torch.log_softmax(logits.float(), -1)[token].item()
            assert got[i, k].item() == pytest.approx(total, abs=1e-4)


@pytest.fixture(scope="module")
def tiny_news_model(tmp_path_factory):
    """A tiny random Llama whose word-level vocabulary also has the news-topics words."""
    from tiny import NEWS_VOCAB, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("news") / "llama", "llama", vocab=NEWS_VOCAB)


def test_example_task_runs_end_to_end_with_no_code(tiny_news_model, tmp_path, monkeypatch, capsys):
    """The news-topics example (4 labels, multi-token label words, its own CSV columns and label strings) runs
    zero-shot → LoRA → report through the unchanged code, from its own directory, as a user would."""
    work = tmp_path / "news-topics"
    shutil.copytree(EXAMPLE, work)
    monkeypatch.chdir(work)
    assert main(["run", "news-topics-gemma3-270m.yaml", f"model={tiny_news_model}", "dtype=fp32", "train.max_steps=6",
                 "train.eval_steps=3", "train.epochs=1"]) == 0
    run = work / "runs" / "news-topics-gemma3-270m"
    report = json.loads((run / "report.json").read_text())
    assert report["task"] == "news_topics" and report["task_type"] == "classification"
    assert report["protocol"]["labels"] == ["World", "Sports", "Business", "Sci/Tech"]
    assert report["protocol"]["label_token_ids"] is None  # multi-token verbalizers: no single-token fast path
    score = report["finetuned"]["score"]
    assert score["n"] == report["data"]["test"] == 60 and len(score["confusion_matrix"]) == 4
    assert len(score["confusion_matrix"][0]) == 5  # four labels and None
    records = [json.loads(x) for x in (run / "finetuned" / "predictions.jsonl").read_text().splitlines()]
    assert all(len(r["score_logprobs"]) == 4 for r in records)
    assert score["accuracy"] == sum(r["score_pred"] == r["label"] for r in records) / 60
    md = (run / "report.md").read_text()
    assert "Sci/Tech → ' science and technology'" in md
    assert (run / "task.yaml").read_text() == (EXAMPLE / "news-topics.yaml").read_text()
    # The report is rebuilt from the run directory alone, even after the spec file is gone.
    (work / "news-topics.yaml").unlink()
    assert main(["report", str(run)]) == 0
