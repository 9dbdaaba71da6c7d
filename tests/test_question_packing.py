"""train.questions_per_context: several SQuAD questions about one context in one training row."""

import pytest
import torch
from transformers import AutoTokenizer

from tasktune.config import load_recipe
from tasktune.errors import TasktuneError
from tasktune.losses import objective_loss
from tasktune.models import load_model
from tasktune.tasks import PromptBuilder, get_task
from tasktune.train import LeftPadCollator

CONTEXTS = {"Paris": "Paris is the capital of France . The Seine flows through it .",
            "Rome": "Rome is the capital of Italy . The Tiber flows through it ."}


def questions(n_per_context: int) -> list[dict]:
    """Questions in file order, alternating between two contexts (a sample keeps the file's order)."""
    out = []
    for i in range(n_per_context):
        for title, context in CONTEXTS.items():
            answer = [] if i % 3 == 2 else [title]
            out.append({"id": f"{title}{i}", "title": title, "context": context, "question": f"question {i} ?",
                        "answers": answer, "answer_starts": [0] if answer else []})
    return out


def answer_spans(feature: dict) -> list[list[int]]:
    spans, current = [], []
    for token, label in zip(feature["input_ids"], feature["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


@pytest.fixture
def qa(tiny_llama):
    task = get_task("squad_v2")
    return task, PromptBuilder(task, AutoTokenizer.from_pretrained(tiny_llama))


def test_each_question_is_trained_once_in_rows_of_one_context(qa):
    task, builder = qa
    examples = questions(6)
    single = task.train_features(builder, examples, "answer", 256)
    packed = task.train_features(builder, examples, "answer", 256, questions_per_context=4)
    assert len(single) == 12 and len(packed) == 4  # 6 questions per context: rows of 4 and 2
    by_id = {ex["id"]: one for ex, one in zip(examples, single)}
    order = [ex for title in CONTEXTS for ex in examples if ex["title"] == title]
    spans = [s for row in packed for s in answer_spans(row)]
    # Every answer once, in the sample's order within its context, each the answer its own row would train.
    assert spans == [answer_spans(by_id[ex["id"]])[0] for ex in order]
    for row, first in zip(packed, (order[0], order[4], order[6], order[10])):
        one, spans_of = by_id[first["id"]], answer_spans(row)
        # A row opens exactly as its first question is evaluated (and trained alone).
        assert row["input_ids"][:len(one["input_ids"])] == one["input_ids"]
        assert row["labels"][:len(one["labels"])] == one["labels"]
        text = builder.tokenizer.decode(row["input_ids"])
        assert text.count("Title") == 1 and text.count("Context") == 1 and text.count("Question") == len(spans_of)
    assert [len(answer_spans(row)) for row in packed] == [4, 2, 4, 2]


def test_rows_never_exceed_max_length_and_lose_no_question(qa):
    task, builder = qa
    examples = questions(6)
    one = max(len(f["input_ids"]) for f in task.train_features(builder, examples, "answer", 256))
    packed = task.train_features(builder, examples, "answer", one + 12, questions_per_context=6)
    assert max(len(f["input_ids"]) for f in packed) <= one + 12
    assert sum(len(answer_spans(f)) for f in packed) == len(examples)
    assert len(packed) > 2  # the budget split each context's six questions over several rows


def test_a_packed_row_trains_its_first_question_as_a_row_of_its_own(tiny_models):
    """Causal attention: the first answer's loss in a packed row equals its loss alone (later questions cannot
    reach back); the packed loss is the mean over every answer token of the row."""
    lm = load_model(str(tiny_models["gemma3"]), dtype="fp32")
    task = get_task("squad_v2")
    builder = PromptBuilder(task, lm.tokenizer)
    examples = [ex for ex in questions(3) if ex["title"] == "Paris"]
    collate = LeftPadCollator(lm.tokenizer.pad_token_id)
    (packed,) = task.train_features(builder, examples, "answer", 256, questions_per_context=3)
    alone = task.train_features(builder, examples, "answer", 256)
    first_only = dict(packed, labels=[lab if i < len(alone[0]["labels"]) else -100
                                      for i, lab in enumerate(packed["labels"])])
    with torch.no_grad():
        torch.testing.assert_close(objective_loss(lm.model, collate([first_only]), "answer"),
                                   objective_loss(lm.model, collate([alone[0]]), "answer"))
        assert not torch.isclose(objective_loss(lm.model, collate([packed]), "answer"),
                                 objective_loss(lm.model, collate([alone[0]]), "answer"))


def write(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("recipe, message", [
    ("task: sst2\ntrain:\n  questions_per_context: 4\n", "questions_per_context applies to extractive QA"),
    ("task: squad_v2\ntrain:\n  questions_per_context: 0\n", "questions_per_context must be > 0"),
    ("task: squad_v2\neval:\n  prompt_format: chat\ntrain:\n  questions_per_context: 2\n", "prompt_format plain"),
    ("task: TASK\ntrain:\n  questions_per_context: 2\n", r"\{question\} after \{context\}"),
])
def test_packing_is_refused_where_it_cannot_apply(tmp_path, recipe, message):
    spec = tmp_path / "qa.yaml"
    spec.write_text('name: qa\ntype: extractive_qa\ntemplate: "Question: {question}\\nContext: {context}\\nAnswer:"\n'
                    'abstain_word: unanswerable\ndata:\n  embedded: true\n  hub: rajpurkar/squad_v2\n')
    with pytest.raises(TasktuneError, match=message):
        load_recipe(write(tmp_path, "name: x\n" + recipe.replace("TASK", str(spec))))
