"""The `multiple_choice` task type: a spec and a JSON-lines file, the same proof as classification (zero-shot →
fine-tuned, same protocol, intervals, McNemar), lm-evaluation-harness's acc / acc_norm, and bad rows refused."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tasktune.cli import main
from test_careful_user import refused_before_the_model_loads
from tiny import FILLER, NEGATIVE_WORDS, POSITIVE_WORDS, TINY_RUN_OVERRIDES, TINY_RUN_RECIPE

SPEC = """name: tiny_mc
type: multiple_choice
description: Which word says the sentence's sentiment (a tiny test task).
template: "{text}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
headline: acc
"""


def write_mc(folder: Path, n: int = 120, seed: int = 0) -> tuple[Path, Path]:
    """A spec and its data: three choices per question, the gold one by index or by text."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE_WORDS if positive else NEGATIVE_WORDS)]
        rng.shuffle(words)
        choices = ["positive", "negative", "film"]
        answer = "positive" if positive else "negative"
        lines.append(json.dumps({"text": " ".join(words), "choices": choices,
                                 "answer": choices.index(answer) if i % 3 else answer}))
    (folder / "spec.yaml").write_text(SPEC)
    (folder / "mc.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "spec.yaml", folder / "mc.jsonl"


def mc_args(model, spec, data, out, name, *extra):
    return ["run", TINY_RUN_RECIPE, *TINY_RUN_OVERRIDES, f"task={spec}", f"model={model}", f"data.path={data}",
            f"output_dir={out}", f"name={name}", "data.split_by=null", "data.train_sentences=null",
            "eval.protocols=[score,generate]", "train.max_steps=8", "train.eval_steps=4", "train.batch_size=8",
            "train.learning_rate=0.003", "train.objective=lm", *extra]


def test_a_multiple_choice_task_runs_every_stage_with_acc_and_acc_norm(tiny_llama, tmp_path):
    spec, data = write_mc(tmp_path)
    assert main(mc_args(tiny_llama, spec, data, tmp_path / "runs", "mc")) == 0
    run = tmp_path / "runs" / "mc"
    report = json.loads((run / "report.json").read_text())
    for stage in ("zeroshot", "finetuned"):
        score = report[stage]["score"]
        assert score["n"] == len(json.loads((run / "split.json").read_text())["test"])
        assert set(score["ci95"]) == {"acc", "acc_norm"} and 0 <= score["acc"] <= 1
        assert report[stage]["generate"]["n"] > 0
    assert report["paired"]["score"]["mcnemar"]["test"] == "exact McNemar (two-sided)"
    assert report["finetuned"]["score"]["acc"] > report["zeroshot"]["score"]["acc"]
    assert "acc_norm" in (run / "report.md").read_text()
    # The same protocol outside `run`, and the export a user ships.
    assert main(["eval", "--run", str(run), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["score"]["acc"] == report["finetuned"]["score"]["acc"]
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0


def test_score_sums_each_choices_log_probabilities_after_the_prompt(tiny_llama, tmp_path):
    """lm-evaluation-harness's loglikelihood, computed here by hand with the model's forward: the prompt and
    " choice" encoded together, the choice's tokens' log-probabilities summed; acc takes the highest sum, acc_norm
    the highest per character of the choice."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec, data = write_mc(tmp_path, n=40)
    assert main(["eval", "--task", str(spec), "--model", str(tiny_llama), "--data", str(data), "--split", "all",
                 "--protocol", "score", "--dtype", "fp32", "--out", str(tmp_path / "eval")]) == 0
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    template = "{text}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    for record in records[:6]:
        context = template.format(text=rows[record["id"]]["text"])
        context_ids = tokenizer(context)["input_ids"]
        sums = []
        for choice in record["choices"]:
            ids = tokenizer(context + " " + choice)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            sums.append(sum(float(logits[i - 1, ids[i]]) for i in range(len(context_ids), len(ids))))
        assert record["score_logprobs"] == pytest.approx(sums, abs=1e-4)
        assert record["score_pred"] == max(range(3), key=sums.__getitem__)
        norm = [s / len(c) for s, c in zip(sums, record["choices"])]
        assert record["score_norm_pred"] == max(range(3), key=norm.__getitem__)


def test_acc_norm_divides_by_the_choices_length_in_characters(tmp_path):
    from tasktune.tasks import get_task

    spec, _ = write_mc(tmp_path, n=4)
    task = get_task(str(spec))
    records = [{"id": 0, "label": 1, "choices": ["a", "bbbb"]}]
    task.read_results(records, "score", [[-2.0, -4.0]])
    assert records[0]["score_pred"] == 0 and records[0]["score_norm_pred"] == 1  # -2/1 < -4/4
    metrics = task.score(records)["score"]
    assert (metrics["acc"], metrics["acc_norm"], metrics["n"]) == (0.0, 1.0, 1)


@pytest.mark.parametrize("row, expected", [
    ({"text": "good film", "choices": ["positive", "negative"], "answer": 2},
     "'answer' 2 is out of range for 2 choices (expected 0 to 1)"),
    ({"text": "good film", "choices": ["positive", "negative"], "answer": "neutral"},
     "'answer' 'neutral' is not one of the choices"),
    ({"text": "good film", "choices": "positive", "answer": 0},
     "'choices' must be a list of two or more non-empty texts"),
    ({"text": "good film", "choices": ["positive", "positive"], "answer": 0}, "holds the same choice twice"),
    ({"choices": ["positive", "negative"], "answer": 0}, "the template's field 'text' must be text, got None"),
])
def test_a_bad_row_is_one_line_naming_the_file_and_line_before_the_model_loads(row, expected, tiny_llama, tmp_path,
                                                                               monkeypatch, capsys):
    spec, data = write_mc(tmp_path, n=30)
    lines = data.read_text().splitlines()
    lines[6] = json.dumps(row)
    data.write_text("\n".join(lines) + "\n")
    refused_before_the_model_loads(mc_args(tiny_llama, spec, data, tmp_path / "runs", "bad"), f"{data}, line 7: ",
                                   expected, tmp_path / "runs" / "bad", monkeypatch, capsys)


LMEVAL_TASK = """task: tiny_mc_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {rows}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{text}}}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


def test_acc_and_acc_norm_equal_lm_evaluation_harness_on_the_same_rows(tiny_llama, tmp_path, monkeypatch):
    """lm-evaluation-harness itself (its `hf` model, a local-file `multiple_choice` task with our template and
    choices) on the rows tasktune scores: the same log-likelihood per choice, and the same acc and acc_norm."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec, data = write_mc(tmp_path, n=24)
    assert main(["eval", "--task", str(spec), "--model", str(tiny_llama), "--data", str(data), "--split", "all",
                 "--protocol", "score", "--dtype", "fp32", "--out", str(tmp_path / "eval")]) == 0
    ours = {r["id"]: r for r in (json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text()
                                 .splitlines())}
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text("".join(json.dumps({"text": r["text"], "choices": r["choices"],
                                             "label": r["choices"].index(r["answer"]) if isinstance(r["answer"], str)
                                             else r["answer"]}) + "\n" for r in rows))
    (tmp_path / "tiny_mc_local.yaml").write_text(LMEVAL_TASK.format(rows=rows_file))
    # add_bos_token: tasktune's prompts start with the tokenizer's BOS, as lm-evaluation-harness does for Gemma.
    results = lm_eval.simple_evaluate(model="hf", tasks=["tiny_mc_local"],
                                      model_args=f"pretrained={tiny_llama},dtype=float32,add_bos_token=True",
                                      batch_size=8, log_samples=True, device="cpu",
                                      task_manager=TaskManager(include_path=str(tmp_path)))
    samples = sorted(results["samples"]["tiny_mc_local"], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows) == len(ours)
    for sample in samples:
        theirs = [float(r[0]) for r in sample["filtered_resps"]]
        assert ours[sample["doc_id"]]["score_logprobs"] == pytest.approx(theirs, abs=1e-3)
    figures = results["results"]["tiny_mc_local"]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["score"]
    assert metrics["acc"] == pytest.approx(figures["acc,none"]) and metrics["acc_norm"] == pytest.approx(
        figures["acc_norm,none"])


def test_generate_requests_share_one_token_budget_so_the_runner_batches_the_questions(tiny_llama, tmp_path):
    """Each question's own budget (its longest choice) made every question a group of one: one forward at a time.
    One budget for all (the longest choice of all, plus one) puts them in one group."""
    from transformers import AutoTokenizer

    from tasktune.runner import _group_key
    from tasktune.tasks import PromptBuilder, get_task

    spec, data = write_mc(tmp_path, n=12)
    task = get_task(str(spec))
    rows, _ = task.load(str(data))
    rows[3]["choices"] = ["positive", "negative", "a very long film indeed"]
    builder = PromptBuilder(task, AutoTokenizer.from_pretrained(tiny_llama))
    requests, _ = task.requests(builder, rows, "generate")
    assert len({_group_key(r) for r in requests}) == 1
    longest = max(len(choice) for ex in rows for choice in task.encoded(builder, ex)[1])
    assert requests[0].max_new_tokens == longest + 1
