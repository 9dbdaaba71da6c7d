"""The Python API returns what the command line writes, through the same pipeline."""

import json
import subprocess
import sys

import tasktune
from tiny import TINY_RUN_RECIPE as RECIPE


def test_run_returns_the_report_it_wrote(tiny_llama, sst2_tsv, tmp_path):
    report = tasktune.run(str(RECIPE), model=str(tiny_llama), name="api", output_dir=str(tmp_path), dtype="fp32",
                          data={"path": str(sst2_tsv), "val_size": 16, "limit_train": None},
                          eval={"limit_generate": None, "controls": [], "perplexity": None}, train={"eval_steps": 4, "max_steps": 8, "batch_size": 8, "compile": False},
                          overrides=["train.learning_rate=1e-3"])
    assert report.run_dir == tmp_path / "api"
    assert dict(report) == json.loads((tmp_path / "api" / "report.json").read_text())
    assert report["config"]["train"]["learning_rate"] == 1e-3 and report["config"]["train"]["max_steps"] == 8
    headline = report.headline
    assert headline["metric"] == "accuracy" and headline["n"] == 24
    assert headline["finetuned"] == report["finetuned"]["score"]["accuracy"]
    assert headline["gain"]["difference"] == report["paired"]["score"]["gain"]["difference"]


def test_evaluate_returns_metrics_and_predictions(tiny_llama, sst2_tsv, tmp_path):
    metrics = tasktune.evaluate(str(tiny_llama), "sst2", str(sst2_tsv), rows="all", out=str(tmp_path / "e"),
                                dtype="fp32", eval={"protocols": ["score"]})
    assert dict(metrics) == json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["score"]["n"] == 120 and len(metrics.predictions) == 120  # every row of the file
    right = sum(r["score_pred"] == r["label"] for r in metrics.predictions)
    assert metrics["score"]["accuracy"] == right / 120
    sample = tasktune.evaluate(str(tiny_llama), "sst2", str(sst2_tsv), limit=10, dtype="fp32",
                               eval={"protocols": ["score"]})  # the test split, a temporary directory
    assert sample["score"]["n"] == 10 and sample.path.is_dir()


def test_importing_tasktune_loads_no_torch():
    code = "import sys, tasktune; print('torch' in sys.modules, 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == ["False", "False"]


def test_evaluating_every_row_reads_the_data_file_once(tiny_llama, sst2_tsv, tmp_path, monkeypatch):
    from tasktune.tasks.classification import ClassificationTask

    reads = []
    original = ClassificationTask.load
    monkeypatch.setattr(ClassificationTask, "load", lambda self, path: reads.append(path) or original(self, path))
    metrics = tasktune.evaluate(str(tiny_llama), "sst2", str(sst2_tsv), rows="all", out=str(tmp_path / "e"),
                                dtype="fp32", eval={"protocols": ["score"]})
    assert metrics["score"]["n"] == 120 and reads == [str(sst2_tsv)]
