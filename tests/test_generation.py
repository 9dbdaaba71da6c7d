"""The `generation` task type: instruction data (named columns) and chat data (`messages`), free-form answers judged
by the spec's metrics, with the same proof as the other types (zero-shot → fine-tuned, intervals, paired test)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch

from tasktune.cli import main
from test_careful_user import one_error_line, refused_before_the_model_loads
from tiny import FILLER, NEGATIVE_WORDS, POSITIVE_WORDS, TINY_RUN_OVERRIDES, TINY_RUN_RECIPE

SPEC = """name: tiny_gen
type: generation
description: Say the sentence's sentiment in a word (a tiny test task).
template: "{text}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
metrics: [exact, contains, chrf, rouge_l, bleu]
headline: exact
max_new_tokens: 4
stop: ["."]
"""

CHAT_SPEC = """name: tiny_chat
type: generation
description: The sentiment word, asked in a conversation (a tiny test task).
template: "{conversation}\\nAssistant:"
metrics: [exact, chrf]
max_new_tokens: 4
"""


def sentence(rng: random.Random, positive: bool) -> str:
    words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE_WORDS if positive else NEGATIVE_WORDS)]
    rng.shuffle(words)
    return " ".join(words)


def instruction_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": sentence(rng, i % 2 == 0), "output": "positive" if i % 2 == 0 else "negative"}
            for i in range(n)]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Two user turns: the first gives the sentence, the second asks; the answer needs the earlier turn."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        rows.append({"messages": [{"role": "user", "content": sentence(rng, positive)},
                                  {"role": "assistant", "content": "Question ?"},
                                  {"role": "user", "content": "Is this sentence positive or negative ?"},
                                  {"role": "assistant", "content": "positive" if positive else "negative"}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gen_args(model, spec, data, out, name, *extra):
    return ["run", TINY_RUN_RECIPE, *TINY_RUN_OVERRIDES, f"task={spec}", f"model={model}", f"data.path={data}",
            f"output_dir={out}", f"name={name}", "data.split_by=null", "data.train_sentences=null",
            "train.max_steps=10", "train.eval_steps=5", "train.batch_size=8", "train.learning_rate=0.003",
            "train.objective=lm", *extra]


def test_a_generation_task_runs_every_stage_with_intervals_and_a_paired_test(tiny_llama, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    data = write_jsonl(tmp_path / "gen.jsonl", instruction_rows(120))
    assert main(gen_args(tiny_llama, spec, data, tmp_path / "runs", "gen", "train.max_steps=40",
                         "train.eval_steps=20")) == 0
    run = tmp_path / "runs" / "gen"
    report = json.loads((run / "report.json").read_text())
    test_ids = json.loads((run / "split.json").read_text())["test"]
    for stage in ("zeroshot", "finetuned"):
        figures = report[stage]["generate"]
        assert figures["n"] == len(test_ids)
        assert set(figures["ci95"]) == {"exact", "contains", "chrf", "rouge_l", "bleu"}
        low, high = figures["ci95"]["exact"]
        assert low <= figures["exact"] <= high
    paired = report["paired"]["generate"]
    assert paired["metric"] == "exact" and paired["mcnemar"]["test"] == "exact McNemar (two-sided)"
    # The tiny model learns the answer's shape (one of the two words, then the EOS token it was trained to end
    # with), so more answers equal the reference than zero-shot, when its answers ran on to max_new_tokens.
    assert report["finetuned"]["generate"]["exact"] > report["zeroshot"]["generate"]["exact"]
    predictions = [json.loads(x) for x in (run / "finetuned" / "predictions.jsonl").read_text().splitlines()]
    assert {r["generate_text"] for r in predictions} <= {"positive", "negative"}
    assert all(r["generate_text"] == r["generate_text"].strip() for r in predictions)
    assert all(r["generate_scores"]["exact"] == float(r["generate_text"] == r["target"]) for r in predictions)
    markdown = (run / "report.md").read_text()
    assert "`generate`" in markdown and "exact" in markdown
    split = report["split"]["overlap"]
    assert {"exact_duplicates", "near_duplicates", "near_duplicate_rate"} <= set(split)
    # The same protocol outside `run`, and the export a user ships.
    assert main(["eval", "--run", str(run), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["generate"]["exact"] == report["finetuned"]["generate"]["exact"]
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    assert "text-generation" in (tmp_path / "export" / "README.md").read_text()


def test_chat_data_keeps_earlier_turns_as_context_and_the_last_assistant_turn_as_target(tiny_llama, tmp_path):
    from tasktune.tasks import PromptBuilder, get_task
    from transformers import AutoTokenizer

    spec = tmp_path / "chat.yaml"
    spec.write_text(CHAT_SPEC)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(60))
    task = get_task(str(spec))
    rows, _ = task.load(str(data))
    first = rows[0]
    assert first["answer"] == "positive"
    assert first["text"] == ("User: " + chat_rows(1)[0]["messages"][0]["content"] + "\nAssistant: Question ?\n"
                             "User: Is this sentence positive or negative ?\nAssistant:")
    builder = PromptBuilder(task, AutoTokenizer.from_pretrained(tiny_llama))
    ids, answer = task.continuation(builder, first)
    assert builder.tokenizer.decode(answer) == "positive <eos>"  # the answer, then the EOS token: it learns to stop
    [feature] = task.train_features(builder, [first], None, 64, None)
    assert feature["labels"] == [-100] * len(ids) + answer
    assert main(gen_args(tiny_llama, spec, data, tmp_path / "runs", "chat", "train.max_steps=40",
                         "train.eval_steps=20")) == 0
    report = json.loads((tmp_path / "runs" / "chat" / "report.json").read_text())
    assert report["finetuned"]["generate"]["exact"] > report["zeroshot"]["generate"]["exact"]


CHAT_TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ m['role'] }} {{ m['content'] }}<end_of_turn>"
                 "{% endfor %}{% if add_generation_prompt %}<start_of_turn>assistant{% endif %}")


def chat_tokenizer(tiny_llama, folder: Path):
    """The tiny model's tokenizer with a chat template whose turns end with `<end_of_turn>` (not the EOS token),
    as Gemma's do; the two markers are added tokens, so the word-level vocabulary grows by two."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_under_a_chat_template_the_turns_go_through_it_and_the_answer_ends_with_its_end_of_turn(tiny_llama,
                                                                                                  tmp_path):
    from tasktune.tasks import PromptBuilder, get_task

    spec = tmp_path / "chat.yaml"
    spec.write_text(CHAT_SPEC)
    task = get_task(str(spec))
    rows, _ = task.load(str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(4))))
    builder = PromptBuilder(task, chat_tokenizer(tiny_llama, tmp_path / "tok"), prompt_format="chat")
    turns = chat_rows(1)[0]["messages"]
    assert builder.render(rows[0]) == "".join(
        f"<start_of_turn>{t['role']} {t['content']}<end_of_turn>" for t in turns[:-1]) + "<start_of_turn>assistant"
    _, answer = task.continuation(builder, rows[0])
    assert builder.tokenizer.convert_ids_to_tokens(answer) == ["positive", "<end_of_turn>"]
    assert task.stop_texts(builder) == ("<eos>", "<end_of_turn>")


def test_generation_stops_at_the_first_stop_text_and_cuts_it_off(tiny_llama):
    """The model's own unstopped answer, then the same prompt with its third word as a stop text: the answer is
    what came before that word, and the generation ended there (fewer tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasktune import infer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompts = [tokenizer("the film was good")["input_ids"], tokenizer("a dull story")["input_ids"]]
    free = infer.generate(model, tokenizer, prompts, 12).texts
    words = free[0].split()
    assert len(words) >= 4, free
    stop = words[2]
    stopped = infer.generate(model, tokenizer, prompts, 12, stop_strings=(stop,)).texts
    assert stopped[0] == free[0][:free[0].find(stop)]
    assert stopped[1] == infer.cut_at_stops(free[1], (stop,))


def test_per_row_metrics_match_their_libraries_and_the_json_and_regex_rules():
    import sacrebleu
    from rouge_score import rouge_scorer

    from tasktune.metrics.generation import field_scores, json_object, row_scores

    scores = row_scores("The Eiffel tower.", "eiffel Tower", ["exact", "contains", "chrf", "rouge_l", "bleu"])
    assert scores["exact"] == 1.0 and scores["contains"] == 1.0
    assert scores["chrf"] == pytest.approx(sacrebleu.sentence_chrf("The Eiffel tower.", ["eiffel Tower"]).score)
    assert scores["bleu"] == pytest.approx(sacrebleu.sentence_bleu("The Eiffel tower.", ["eiffel Tower"]).score)
    rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score("eiffel Tower", "The Eiffel tower.")
    assert scores["rouge_l"] == pytest.approx(rouge["rougeL"].fmeasure)
    assert row_scores("it is the tower of Pisa", "tower", ["contains"])["contains"] == 1.0
    assert row_scores("towers", "tower", ["contains"])["contains"] == 0.0  # whole words only
    # JSON: the object in a wrapped answer; fields compared normalised; missing fields and wrong types count 0.
    assert json_object('Sure: ```json\n{"a": 1}\n```') == {"a": 1}
    assert json_object("[1, 2]") is None and json_object("{not json}") is None
    assert field_scores({"city": "paris", "year": 1889}, {"city": "Paris", "year": 1889}) == (1.0, 1.0)
    assert field_scores({"city": "Paris", "year": "1889"}, {"city": "Paris", "year": 1889})[0] == 0.5
    assert field_scores(None, {"city": "Paris"}) == (0.0, 0.0)
    assert row_scores("no json here", '{"city": "Paris"}', ["json_fields"]) == {
        "json_valid": 0.0, "json_fields": 0.0, "json_field_f1": 0.0}
    # regex: the first group of each side (the reference as a whole where the pattern does not match it).
    import re

    pattern = re.compile(r"answer is (-?\d+)")
    assert row_scores("so the answer is 42.", "42", ["regex"], pattern) == {"regex_found": 1.0, "regex_exact": 1.0}
    assert row_scores("maybe 42", "the answer is 42", ["regex"], pattern) == {"regex_found": 0.0,
                                                                             "regex_exact": 0.0}


def test_near_duplicates_count_test_rows_most_of_whose_five_grams_a_training_row_has():
    from tasktune.data.split import near_duplicates

    train = ["the quick brown fox jumps over the lazy dog near the river bank today",
             "a completely different sentence about cooking pasta with garlic and olive oil"]
    test = ["the quick brown fox jumps over the lazy dog near the river bank tonight",  # one word changed
            "the quick brown fox jumps under a tree while a cat watches from the roof",  # shares one 5-gram
            "cooking pasta"]
    assert near_duplicates(test, train) == 1
    assert near_duplicates(test, train, threshold=0.0) == 2


def test_csv_and_parquet_files_give_the_same_rows_as_json_lines(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasktune.tasks import get_task

    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("{text}", "{instruction} {text}"))
    rows = [dict(r, instruction="Say it:") for r in instruction_rows(10)]
    with open(tmp_path / "gen.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "text", "output"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "gen.parquet")
    task = get_task(str(spec))
    from_json = task.load(str(write_jsonl(tmp_path / "gen.jsonl", rows)))[0]
    assert task.load(str(tmp_path / "gen.csv"))[0] == from_json
    assert task.load(str(tmp_path / "gen.parquet"))[0] == from_json


JSON_SPEC = """name: tiny_json
type: generation
template: "{text}\\nAnswer:"
metrics: [json_fields]
"""


@pytest.mark.parametrize("spec_text, row, expected", [
    (CHAT_SPEC, {"messages": [{"role": "user", "content": "good film"}]},
     "the last turn of 'messages' must be the assistant's non-empty answer"),
    (CHAT_SPEC, {"messages": [{"role": "user", "content": "good film"}, {"role": "bot", "content": "x"}]},
     "turn 1 of 'messages' must be"),
    (CHAT_SPEC, {"messages": [{"role": "system", "content": "be nice"}, {"role": "assistant", "content": "x"}]},
     "'messages' has no user turn before the answer"),
    (JSON_SPEC, {"text": "good film", "output": "{'sentiment': 'positive'}"},
     "the target is not valid JSON"),
    (JSON_SPEC, {"text": "good film", "output": "[1, 2]"}, "the target must be a JSON object"),
    (SPEC, {"text": "good film", "output": ""}, "the target 'output' must be non-empty text"),
    (SPEC, {"output": "positive"}, "the template's field 'text' must be text, got None"),
])
def test_a_bad_row_is_one_line_naming_the_file_and_line_before_the_model_loads(spec_text, row, expected, tiny_llama,
                                                                               tmp_path, monkeypatch, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text)
    good = chat_rows(30) if "conversation" in spec_text else [
        dict(r, output=json.dumps({"sentiment": r["output"]}) if "json" in spec_text else r["output"])
        for r in instruction_rows(30)]
    good[6] = row
    data = write_jsonl(tmp_path / "gen.jsonl", good)
    refused_before_the_model_loads(gen_args(tiny_llama, spec, data, tmp_path / "runs", "bad"), f"{data}, line 7: ",
                                   expected, tmp_path / "runs" / "bad", monkeypatch, capsys)


@pytest.mark.parametrize("text, expected", [
    (SPEC.replace("metrics: [exact, contains, chrf, rouge_l, bleu]\n", ""), "a generation task needs metrics"),
    (SPEC.replace("[exact, contains,", "[exact, accuracy,"), "must be different names from"),
    (SPEC.replace("headline: exact", "headline: f1"), "headline 'f1' is not one of the metrics' figures"),
    (SPEC.replace("[exact,", "[regex, exact,"), "the regex metric and the `regex:` pattern go together"),
    (SPEC.replace("[exact,", "[regex, exact,") + 'regex: "("\n', "is not a valid pattern"),
    (SPEC.replace('stop: ["."]', 'stop: [""]'), "must be non-empty texts"),
    (CHAT_SPEC.replace("{conversation}", "{conversation} {text}"), "{conversation} (chat data) goes alone"),
])
def test_a_bad_spec_is_one_line_before_anything_runs(text, expected, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    capsys.readouterr()
    assert main(["tasks", "show", str(spec)]) == 2
    line = one_error_line(capsys)
    assert str(spec) in line and expected in line, line


def test_hub_chat_rows_are_the_json_lines_rows_and_a_bad_one_is_named(tmp_path, local_hub):
    from tasktune.errors import TasktuneError
    from tasktune.tasks import get_task

    spec = tmp_path / "chat.yaml"
    spec.write_text(CHAT_SPEC)
    task = get_task(str(spec))
    folder = tmp_path / "chat-like"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", chat_rows(6))
    from_file = task.load(str(write_jsonl(tmp_path / "chat.jsonl", chat_rows(6))))[0]
    rows, source = task.load(f"hub:{folder}")
    assert source == f"hub:{folder}" and rows == from_file
    bad = chat_rows(6)
    bad[2]["messages"] = bad[2]["messages"][:-1]
    write_jsonl(folder / "train.jsonl", bad)
    with pytest.raises(TasktuneError, match=r"hub:.*chat-like, row 2: the last turn of 'messages' must be"):
        task.load(f"hub:{folder}")


def test_a_graded_headline_reports_rows_whose_score_rose_or_fell(tmp_path):
    """For chrF (a graded metric) a changed row is one whose score rose or fell, not one that became right."""
    from tasktune.tasks import get_task

    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace("headline: exact", "headline: chrf"))
    task = get_task(str(spec))
    old = {"generate_text": "pos", "generate_scores": {"chrf": 20.0}}
    new = {"generate_text": "positive", "generate_scores": {"chrf": 100.0}, "target": "positive", "prompt": "p"}
    assert task.changed_example(old, new)[:2] == (False, True)
    assert task.changed_example(new, old | {"target": "positive"})[:2] == (True, False)
    assert task.changed_example(old, old | {"target": "x"})[0] == task.changed_example(old, old | {"target": "x"})[1]
    assert task.change_names() == ("chrf rose", "chrf fell")


def test_a_sweep_on_a_generation_task_chooses_on_the_validation_headline_and_tests_the_winner(tiny_llama, tmp_path):
    """`tasktune sweep` over a generation spec: each trial ranked on the validation slice's `exact` (the spec's
    headline, greedy answers), the winner evaluated on the test part once, paired with zero-shot."""
    import yaml

    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    data = write_jsonl(tmp_path / "gen.jsonl", instruction_rows(120))
    sweep = {"name": "gen", "recipe": "sst2-gemma3-270m-cpu", "output_dir": str(tmp_path / "sweeps"),
             "overrides": {"task": str(spec), "model": str(tiny_llama), "data.path": str(data), "dtype": "fp32",
                           "data.val_size": 16, "data.split_by": None, "data.train_sentences": None,
                           "data.limit_train": None, "data.limit_validation": None, "eval.controls": [],
                           "eval.perplexity": None, "train.compile": False, "train.objective": "lm",
                           "train.max_steps": 20, "train.eval_steps": 10, "train.batch_size": 8},
             "space": {"train.learning_rate": {"type": "categorical", "choices": [0.0003, 0.003]}},
             "sampler": "grid", "trials": 2, "pruner": "none", "seed": 0}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep, sort_keys=False))
    assert main(["sweep", str(tmp_path / "sweep.yaml")]) == 0
    result = json.loads((tmp_path / "sweeps" / "gen" / "sweep.json").read_text())
    board = json.loads((tmp_path / "sweeps" / "gen" / "leaderboard.json").read_text())
    assert {r["validation"]["metric"] for r in board} == {"exact"}
    assert result["winner"]["validation"]["value"] == max(r["validation"]["value"] for r in board)
    assert result["test"]["winner"]["n"] == result["test_rows"] > 0
    assert "winner_vs_zeroshot" in result["paired"]
