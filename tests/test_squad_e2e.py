import json
import math

import pytest

from tasktune.cli import main
from tiny import write_squad_json


def test_eval_writes_every_metric(tiny_llama, tmp_path):
    data = write_squad_json(tmp_path / "dev.json")
    out = tmp_path / "ev"
    assert main(["eval", "--task", "squad_v2", "--model", str(tiny_llama), "--data", str(data), "--out", str(out),
                 "--dtype", "fp32"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ["exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1",
                "NoAns_total", "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh", "bleu",
                "bleu_smoothed", "rouge1", "rouge2", "rougeL"]:
        assert key in metrics, key
    assert "meteor" in metrics or "meteor_exact_stem" in metrics
    assert metrics["total"] == 12 and metrics["HasAns_total"] == 8
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert set(records[0]) >= {"id", "prediction", "na_prob", "golds", "em", "f1"}
    assert all(0 <= r["na_prob"] <= 1 for r in records)
    # The raw decision abstains exactly where the abstain token leads (margin > 0).
    assert all((r["na_margin"] > 0) == (r["prediction"] == "") for r in records if r["answer"])


def test_run_pipeline_trains_on_answers(tiny_llama, tmp_path):
    data = write_squad_json(tmp_path / "d.json", n_articles=10)
    code = main(["run", "squad2-gemma3-270m-cpu", "eval.controls=[]", "eval.perplexity=null", "train.compile=false", f"model={tiny_llama}", f"data.path={data}",
                 f"output_dir={tmp_path}", "name=sq", "dtype=fp32", "data.val_size=4", "data.limit_train=null",
                 "data.limit_test=null", "train.max_steps=4", "train.eval_steps=2", "train.batch_size=4",
                 "train.questions_per_context=4"])
    assert code == 0
    report = json.loads((tmp_path / "sq" / "report.json").read_text())
    assert "calibrated" in report["finetuned"] and math.isfinite(report["finetuned"]["calibrated"]["threshold"])
    assert report["training"]["global_step"] == 4
    # Up to 4 questions about a paragraph in a training row (train.questions_per_context).
    rows = report["training"]["training_rows"]
    assert report["data"]["train"] / 4 <= rows < report["data"]["train"]
    assert "zero-shot `raw`" in (tmp_path / "sq" / "report.md").read_text()
    assert f"training rows/s of {rows} rows" in (tmp_path / "sq" / "report.md").read_text()


def write_preds(tmp_path, preds, na=None):
    p = tmp_path / "preds.json"
    p.write_text(json.dumps(preds))
    args = ["--predictions", str(p)]
    if na is not None:
        n = tmp_path / "na.json"
        n.write_text(json.dumps(na))
        args += ["--na-probs", str(n)]
    return args


def test_score_command(tmp_path):
    data = write_squad_json(tmp_path / "dev.json", n_articles=1)
    preds = {"a0-q1": "Paris", "a0-q2": "Seine", "a0-q3": ""}
    args = write_preds(tmp_path, preds, {"a0-q1": 0.1, "a0-q2": 0.2, "a0-q3": 0.9})
    assert main(["score", "--task", "squad_v2", "--data", str(data), *args, "--out", str(tmp_path / "o")]) == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["exact"] == pytest.approx(100.0) and metrics["total"] == 3


@pytest.mark.parametrize("preds, na, message", [
    ({"a0-q1": "Paris", "a0-q2": "x"}, None, "1 question id\\(s\\) missing"),
    ({"a0-q1": "Paris", "a0-q2": "x", "a0-q3": "", "zzz": "?"}, None, "1 unknown id"),
    ({"a0-q1": "Paris", "a0-q2": 3, "a0-q3": ""}, None, "id 'a0-q2': expected a str"),
    ({"a0-q1": "Paris", "a0-q2": "x", "a0-q3": ""}, {"a0-q1": "high", "a0-q2": 0, "a0-q3": 1},
     "id 'a0-q1': expected a float"),
])
def test_score_bad_files(tmp_path, capsys, preds, na, message):
    data = write_squad_json(tmp_path / "dev.json", n_articles=1)
    args = write_preds(tmp_path, preds, na)
    assert main(["score", "--task", "squad_v2", "--data", str(data), *args, "--out", str(tmp_path / "o")]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_calibrated_decision_is_never_below_raw_on_the_slice_it_was_chosen_on():
    """The threshold is searched on the abstention margin, where the raw decision is the threshold 0. On
    na_prob it could not be: here q1 is answered correctly at P(abstain) 0.40 (an answer token leads) and q2
    rightly abstains at 0.35 (the abstain token leads a flatter distribution), so no probability threshold
    separates them and the best one scored 50 against raw's 100."""
    from tasktune.tasks import get_task

    task = get_task("squad_v2")
    records = [
        {"id": "q1", "golds": ["Paris"], "answer": "Paris", "prediction": "Paris", "na_prob": 0.40,
         "na_margin": -0.4, "truncated": False},
        {"id": "q2", "golds": [], "answer": "London", "prediction": "", "na_prob": 0.35, "na_margin": 0.3,
         "truncated": False},
    ]
    threshold = task.choose_threshold(records)
    metrics = task.score(records, na_threshold=threshold, with_text_metrics=False)
    assert metrics["f1"] == pytest.approx(100.0)
    assert metrics["calibrated"]["f1"] >= metrics["f1"]
    # Abstaining on everything is a candidate too (the search's start): when no answer is right, nothing beats
    # it, and its threshold lies below every margin.
    wrong = [{**records[0], "answer": "Rome", "prediction": "Rome"}, records[1]]
    threshold = task.choose_threshold(wrong)
    assert threshold < min(r["na_margin"] for r in wrong)
    calibrated = task.score(wrong, na_threshold=threshold, with_text_metrics=False)["calibrated"]
    assert calibrated["abstain_rate"] == 1.0 and calibrated["f1"] == pytest.approx(50.0)
