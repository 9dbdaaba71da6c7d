"""train.questions_per_context: several SQuAD questions about one context in one training row."""

import pytest
import torch
from transformers import AutoTokenizer

from tasktune.losses import get_objective
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
    single = task.train_features(builder, examples, get_objective("answer"), 256)
    packed = task.train_features(builder, examples, get_objective("answer"), 256, questions_per_context=4)
    assert len(single) == 12 and len(packed) == 4  # 6 questions per context: rows of 4 and 2
    assert [len(answer_spans(row)) for row in packed] == [4, 2, 4, 2]
    # Every answer once, each the answer its own row would train.
    spans = sorted(tuple(s) for row in packed for s in answer_spans(row))
    assert spans == sorted(tuple(answer_spans(one)[0]) for one in single)
    for row in packed:
        # A row opens exactly as one of its questions is evaluated (and trained alone), and reads one context.
        opens = [ex for ex, one in zip(examples, single) if row["input_ids"][:len(one["input_ids"])] == one["input_ids"]
                 and row["labels"][:len(one["labels"])] == one["labels"]]
        assert len({ex["context"] for ex in opens}) == 1
        text = builder.tokenizer.decode(row["input_ids"])
        assert text.count("Title") == 1 and text.count("Context") == 1
        assert text.count("Question") == len(answer_spans(row))


def test_the_evaluated_position_sees_unanswerable_questions_at_their_share(qa):
    """SQuAD v2 lists a paragraph's unanswerable questions last; a row's first question is the one that reads as
    evaluated, so packing in file order would show that position none here (red without the shuffle)."""
    task, builder = qa
    examples = []
    for c in range(40):
        for i in range(8):  # the last 2 of each paragraph's 8 are unanswerable, as in SQuAD v2's files
            answer = [] if i >= 6 else ["Paris"]
            examples.append({"id": f"{c}-{i}", "title": f"T{c}", "context": f"Paris is number {c} .",
                             "question": f"question {i} ?", "answers": answer, "answer_starts": [0] if answer else []})
    packed = task.train_features(builder, examples, get_objective("answer"), 256, questions_per_context=4)
    abstain = task._answer_tokens(builder, examples[7])
    first = [answer_spans(row)[0] == abstain for row in packed]
    assert len(first) == 80 and 0.12 <= sum(first) / len(first) <= 0.4
    assert task.train_features(builder, examples, get_objective("answer"), 256, questions_per_context=4) == packed  # seeded


def test_rows_never_exceed_max_length_and_lose_no_question(qa):
    task, builder = qa
    examples = questions(6)
    one = max(len(f["input_ids"]) for f in task.train_features(builder, examples, get_objective("answer"), 256))
    packed = task.train_features(builder, examples, get_objective("answer"), one + 12, questions_per_context=6)
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
    (packed,) = task.train_features(builder, examples, get_objective("answer"), 256, questions_per_context=3)
    (alone,) = [one for one in task.train_features(builder, examples, get_objective("answer"), 256)
                if packed["input_ids"][:len(one["input_ids"])] == one["input_ids"]]
    first_only = dict(packed, labels=[lab if i < len(alone["labels"]) else -100
                                      for i, lab in enumerate(packed["labels"])])
    with torch.no_grad():
        torch.testing.assert_close(objective_loss(lm.model, collate([first_only]), "answer"),
                                   objective_loss(lm.model, collate([alone]), "answer"))
        assert not torch.isclose(objective_loss(lm.model, collate([packed]), "answer"),
                                 objective_loss(lm.model, collate([alone]), "answer"))


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
