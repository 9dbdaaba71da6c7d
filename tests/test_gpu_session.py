"""The seed's scenario, rehearsed on the CPU as CI can: bench/gpu_session.py --cpu-dry-run runs each seed recipe
(Llama-3.2-1B and Gemma-2-2B architectures at their published width, 2 layers, random weights; the -16gb recipe on
the instruct model's chat template) through every stage, `eval --run` and a 2-trial sweep, and checks the device
every stage recorded. The same script on a GPU machine expects `cuda:0`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_every_seed_recipe_runs_every_stage_on_the_process_device(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_session.py"), "--cpu-dry-run",
                           "--work", str(tmp_path)], capture_output=True, text=True, timeout=1500)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "every stage ran on cpu" in out
    for run in ("sst2-llama3.2-1b", "squad2-gemma2-2b", "sst2-gemma2-2b-it-16gb"):
        for stage in ("zero-shot", "train", "fine-tuned"):
            assert f"| {run} | {stage} | cpu |" in out, (run, stage)
        report = json.loads((tmp_path / "runs" / run / "report.json").read_text())
        assert report["zeroshot"] and report["finetuned"]
        # Every stage: perplexity and a control task were measured on both sides.
        for side in ("zeroshot", "finetuned"):
            cost = json.loads((tmp_path / "runs" / run / side / "metrics.json").read_text())["cost"]
            assert cost["perplexity"]["documents"] >= 1 and cost["controls"]
    assert "| eval --run | evaluation | cpu |" in out and "| sweep | gpu-session-sweep/trials/1/train | cpu |" in out
    # What only these models have: Llama's tokenizer has no padding token (tasktune pads with end-of-text), and
    # the instruct run's prompts went through the chat template.
    facts = json.loads((tmp_path / "runs" / "sst2-gemma2-2b-it-16gb" / "run.json").read_text())
    assert facts["protocol"]["prompt_format"] == "chat"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "models" / "llama-3.2-1b").pad_token is None


def test_a_stage_off_the_expected_device_is_reported(tmp_path):
    """The script's verdict reads each stage's recorded device: one stage elsewhere fails the session."""
    import gpu_session

    run = tmp_path / "r"
    for file in gpu_session.STAGE_FILES.values():
        (run / file).parent.mkdir(parents=True, exist_ok=True)
        (run / file).write_text(json.dumps({"device": "cuda:0"}))
    (run / "train" / "summary.json").write_text(json.dumps({"device": "cpu"}))
    (run / "run.json").write_text(json.dumps({"timings_s": {}}))
    (run / "memory.json").write_text(json.dumps({"summary": {}}))
    rows = gpu_session.stage_rows("r", run, "cuda:0")
    assert [r["ok"] for r in rows] == [True, False, True]
