"""What a run ships as GGUF, run by llama.cpp (llama-cpp-python) with the run's own requests: the round trip on a
tiny Gemma 3 (export f16 → llama.cpp → the PyTorch predictions), the adapter GGUF on its base, K-quant export, and
a real OpenAI client asking llama-cpp-python's server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasktune.cli import main
from test_careful_user import one_error_line

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from test_gguf import gemma3_gguf_run  # noqa: E402,F401 (the module-scoped fixture: a tiny Gemma 3 GGUF run)


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def exported_f16(gemma3_gguf_run, tmp_path_factory):
    run, _ = gemma3_gguf_run
    out = tmp_path_factory.mktemp("f16") / "f16"
    assert main(["export", str(run), "--gguf", "f16", "--out", str(out)]) == 0
    return out / json.loads((out / "gguf.json").read_text())["file"]


def test_an_f16_export_run_by_llama_cpp_makes_the_adapters_predictions(gemma3_gguf_run, exported_f16, tmp_path):
    """Every test row: the same `score` and `generate` predictions as the run's adapter in PyTorch, each label's
    log-probability within 0.1 (F16 weights, llama.cpp's kernels), and llama.cpp's tokenizer giving the prompts the
    Hugging Face ids."""
    run, _ = gemma3_gguf_run
    out = tmp_path / "shipped"
    assert main(["eval", "--run", str(run), "--runtime", "llama.cpp", "--model", str(exported_f16),
                 "--out", str(out)]) == 0
    adapter = {r["id"]: r for r in records(run / "finetuned")}
    shipped = records(out)
    assert len(shipped) == len(adapter) > 0
    for row in shipped:
        mine = adapter[row["id"]]
        assert row["score_pred"] == mine["score_pred"] and row["generate_text"] == mine["generate_text"]
        assert row["score_logprobs"] == pytest.approx(mine["score_logprobs"], abs=0.1)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"] == "cpu (llama.cpp)" and metrics["protocol"]["runtime"] == "llama.cpp"
    assert metrics["protocol"]["tokenizer_agreement"]["same_ids"] == len(shipped)
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["agreement"]["score"] == {"key": "score_pred", "n": len(shipped), "same": len(shipped)}
    assert comparison["agreement"]["generate"] == {"key": "generate_pred", "n": len(shipped), "same": len(shipped)}
    assert comparison["paired"]["score"]["mcnemar"]["wrong_to_right"] == 0


def test_the_score_is_the_summed_log_softmax_of_llama_cpps_own_logits(exported_f16):
    """A two-token continuation read one step at a time equals llama.cpp evaluating the whole sequence with every
    position's logits kept (`logits_all`), computed independently here."""
    import numpy as np

    from tasktune.inference_requests import Score
    from tasktune.llama_cpp_runtime import LlamaCppRunner, load_gguf

    runner = LlamaCppRunner(load_gguf(exported_f16, n_ctx=128))
    context, continuation = [2, 5, 9, 11], (7, 13)
    [[got]] = [runner.score(Score(tuple(context), (continuation,)))]
    whole = llama_cpp.Llama(model_path=str(exported_f16), n_ctx=128, logits_all=True, verbose=False)
    whole.eval(context + list(continuation))
    logits = np.asarray(whole.scores[: len(context) + 2], dtype=np.float64)
    logprobs = logits - logits.max(-1, keepdims=True)
    logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
    expected = logprobs[len(context) - 1, continuation[0]] + logprobs[len(context), continuation[1]]
    assert got == pytest.approx(expected, abs=1e-3)


def test_a_gguf_adapter_on_its_base_gguf_makes_the_adapters_predictions(gemma3_gguf_run, tmp_path):
    run, base = gemma3_gguf_run
    assert main(["export", str(run), "--gguf", "adapter", "--out", str(tmp_path / "a")]) == 0
    adapter_file = tmp_path / "a" / json.loads((tmp_path / "a" / "gguf.json").read_text())["file"]
    out = tmp_path / "shipped"
    assert main(["eval", "--run", str(run), "--runtime", "llama.cpp", "--model", str(base), "--adapter",
                 str(adapter_file), "--out", str(out)]) == 0
    adapter = {r["id"]: r for r in records(run / "finetuned")}
    base_only = tmp_path / "base-only"
    assert main(["eval", "--run", str(run), "--runtime", "llama.cpp", "--model", str(base), "--out",
                 str(base_only)]) == 0
    with_adapter, without = records(out), records(base_only)
    for row in with_adapter:
        assert row["score_logprobs"] == pytest.approx(adapter[row["id"]]["score_logprobs"], abs=0.1)
    # The adapter is applied: without it the log-probabilities are the base's, further from the adapter's.
    def distance(rows):
        return max(abs(a - b) for r in rows for a, b in zip(r["score_logprobs"], adapter[r["id"]]["score_logprobs"]))

    print("llama.cpp vs PyTorch, with the adapter GGUF:", distance(with_adapter), "base only:", distance(without))
    assert distance(without) > 3 * distance(with_adapter)


def test_q4_k_m_is_quantized_by_llama_cpp_from_the_f16_export(gemma3_gguf_run, tmp_path):
    from gguf import GGUFReader

    run, _ = gemma3_gguf_run
    out = tmp_path / "q4"
    assert main(["export", str(run), "--gguf", "q4_k_m", "--out", str(out)]) == 0
    info = json.loads((out / "gguf.json").read_text())
    reader = GGUFReader(out / info["file"])
    assert int(reader.fields["general.file_type"].parts[-1][0]) == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".tasktune", "Modelfile", "README.md", "gguf.json", "tasktune_report.json", info["file"]])


def test_export_eval_puts_the_file_through_llama_cpp_and_the_card_shows_it_beside_the_adapter(gemma3_gguf_run,
                                                                                               tmp_path):
    run, _ = gemma3_gguf_run
    out = tmp_path / "q8"
    assert main(["export", str(run), "--gguf", "q8_0", "--eval", "--out", str(out)]) == 0
    shipped = json.loads((out / "gguf.json").read_text())["shipped"]
    test_rows = len(records(run / "finetuned"))
    score = next(r for r in shipped["rows"] if r["column"] == "score")
    assert score["n"] == test_rows and score["agreement"] >= 0.95 and score["paired"]["mcnemar"]
    assert shipped["tokenizer_agreement"] == {"rows": test_rows, "same_ids": test_rows}
    assert len(records(out / "eval")) == test_rows
    card = (out / "README.md").read_text()
    assert "## Shipped as (each file run by llama.cpp" in card and "| merged q8_0 | score accuracy | " in card


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_openai_client_asking_llama_cpp_python_s_server_gets_the_eval_answers(gemma3_gguf_run, exported_f16,
                                                                                 tmp_path):
    """llama-cpp-python's OpenAI-compatible server on a loopback port with the exported file; the `openai` package
    sends each test prompt as text (the server tokenizes it) with greedy settings and the task's newline stop: the
    answers equal `tasktune eval --runtime llama.cpp`'s generate texts for those rows."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from tasktune.config import load_recipe
    from tasktune.run_layout import RunLayout
    from tasktune.stages import prepare

    run, _ = gemma3_gguf_run
    out = tmp_path / "shipped"
    assert main(["eval", "--run", str(run), "--runtime", "llama.cpp", "--model", str(exported_f16),
                 "--out", str(out)]) == 0
    shipped = {r["id"]: r for r in records(out)}
    p = prepare(load_recipe(str(RunLayout(run).recipe), [f"task={run / 'task.yaml'}"]), training=False)
    rows = [ex for ex in p.examples["test"] if ex["id"] in shipped][:4]
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(exported_f16), "--host",
                               "127.0.0.1", "--port", str(port), "--n_ctx", "512"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert server.poll() is None, server.stderr.read()[-2000:]
                assert time.monotonic() < deadline, "the server did not answer within 60 s"
                time.sleep(0.5)
        for row in rows:
            answer = client.completions.create(
                model=str(exported_f16), prompt=p.builder.render(row), max_tokens=p.task.max_new_tokens,
                temperature=0, stop=["\n"], extra_body={"repeat_penalty": 1.0, "top_k": 1})
            assert answer.choices[0].text == shipped[row["id"]]["generate_text"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_llama_cpp_inputs_are_checked_in_one_line_before_anything_loads(gemma3_gguf_run, tmp_path, capsys,
                                                                       monkeypatch):
    from tasktune import stages

    run, base = gemma3_gguf_run
    monkeypatch.setattr(stages, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--runtime", "llama.cpp", "--model", str(run), "--out",
                 str(tmp_path / "o")]) == 2
    assert "--runtime llama.cpp needs a .gguf file" in one_error_line(capsys)
    assert main(["eval", "--run", str(run), "--runtime", "llama.cpp", "--out", str(tmp_path / "o")]) == 2
    assert "needs --model FILE.gguf" in one_error_line(capsys)
    assert main(["eval", "--run", str(run), "--runtime", "llama.cpp", "--model", str(base), "--adapter",
                 str(run / "adapter"), "--out", str(tmp_path / "o")]) == 2
    assert "--adapter" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_the_shipped_gguf_bench_pairs_each_file_run_by_llama_cpp_with_the_adapter(gemma3_gguf_run, tmp_path):
    """bench/gguf_shipped.py: the adapter in PyTorch reproduces the run's predictions (the baseline), and each
    file run by llama.cpp (f16, the adapter GGUF on its base) agrees with it on nearly every row, with McNemar."""
    run, _ = gemma3_gguf_run
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "bench" / "gguf_shipped.py"), str(run), "--types",
                           "f16,adapter", "--work", str(tmp_path / "w")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "w" / "shipped.json").read_text())
    test_rows = len(records(run / "finetuned"))
    assert [r["type"] for r in rows] == ["adapter (PyTorch, merged)", "f16", "adapter"]
    assert rows[0]["reproduces_run"] == f"{test_rows}/{test_rows}"
    for row in rows[1:]:
        agreement = row["metrics"]["against_adapter"]["agreement"]["score"]
        assert agreement["n"] == test_rows and agreement["same"] >= 0.95 * test_rows
        assert row["tokens_per_s"] > 0 and row["bytes"] > 0
    assert "| f16 | score |" in done.stdout and "| adapter | score |" in done.stdout


def test_squad_v2_through_llama_cpp_reads_the_abstain_token_as_pytorch_does(tmp_path):
    """Extractive QA's generate request watches the first token of " unanswerable" (its probability and margin at the
    first step) and suppresses it: a tiny Gemma 3 GGUF run on SQuAD-layout data, its f16 export run by llama.cpp,
    gives every question the adapter's decision, abstention probability (within 0.02) and margin (within 0.3)."""
    from tasktune.tasks import get_task
    from test_gguf import tiny_gemma3_base
    from tiny import write_squad_json

    data = write_squad_json(tmp_path / "dev.json", n_articles=10)
    spec = get_task("squad_v2").spec
    base = tiny_gemma3_base(tmp_path / "tiny-gemma3.gguf", [data.read_text(), spec.template, f" {spec.abstain_word}", "Article"])
    assert main(["run", "squad2-gemma3-270m-cpu", "eval.controls=[]", "eval.perplexity=null", "train.compile=false",
                 f"model={base}", f"data.path={data}", f"output_dir={tmp_path / 'runs'}", "name=sq", "dtype=fp32",
                 "data.val_size=4", "data.limit_train=null", "data.limit_test=null", "train.max_steps=4",
                 "train.eval_steps=2", "train.batch_size=4", "train.learning_rate=0.01"]) == 0
    run = tmp_path / "runs" / "sq"
    assert main(["export", str(run), "--gguf", "f16", "--out", str(tmp_path / "f16")]) == 0
    out = tmp_path / "shipped"
    assert main(["eval", "--run", str(run), "--runtime", "llama.cpp", "--model", str(tmp_path / "f16" /
                 "model-f16.gguf"), "--out", str(out)]) == 0
    adapter = {r["id"]: r for r in records(run / "finetuned")}
    shipped = records(out)
    assert len(shipped) == len(adapter) > 0
    for row in shipped:
        mine = adapter[row["id"]]
        # The decision the metrics read (abstain, or the answer), and the watched token's probability and margin.
        # The best non-abstaining answer of an abstaining row may differ: this tiny model's next tokens are near
        # ties (its probabilities are ~0.005 each), which F16 weights can reorder.
        assert row["prediction"] == mine["prediction"]
        assert row["na_prob"] == pytest.approx(mine["na_prob"], abs=0.02)
        assert row["na_margin"] == pytest.approx(mine["na_margin"], abs=0.3)
        assert (row["na_margin"] > 0) == (mine["na_margin"] > 0)
    # The comparison counts the decisions each column reads: the raw one and the calibrated one.
    comparison = json.loads((out / "comparison.json").read_text())
    raw = sum(r["prediction"] == adapter[r["id"]]["prediction"] for r in shipped)
    assert comparison["agreement"]["raw"] == {"key": "prediction", "n": len(shipped), "same": raw}
    calibrated = comparison["agreement"]["calibrated"]
    assert calibrated["key"] == "calibrated_prediction" and calibrated["n"] == len(shipped)
    assert set(comparison["paired"]) == {"raw", "calibrated"}


@pytest.mark.parametrize("shape", ["generation", "multiple_choice"])
def test_the_other_task_shapes_through_llama_cpp_make_the_adapters_decisions(shape, tmp_path):
    """A generation spec (free-form answers ended by a stop text) and a multiple-choice spec, each trained on a tiny
    Gemma 3 GGUF base and exported f16: llama.cpp's decision on every test row (the answer text; the chosen choice
    by `score` and by `generate`) is the adapter's, and the comparison counts them under the report's columns."""
    from test_generation import SPEC, gen_args, instruction_rows, write_jsonl
    from test_gguf import tiny_gemma3_base
    from test_multiple_choice import mc_args, write_mc

    if shape == "generation":
        spec = tmp_path / "spec.yaml"
        spec.write_text(SPEC)
        data = write_jsonl(tmp_path / "gen.jsonl", instruction_rows(60))
        columns = {"generate": "generate_text"}
    else:
        spec, data = write_mc(tmp_path, n=60)
        columns = {"score": "score_pred", "generate": "generate_pred"}
    base = tiny_gemma3_base(tmp_path / "tiny-gemma3.gguf", [data.read_text(), spec.read_text(), "User Assistant"])
    args = gen_args if shape == "generation" else mc_args
    assert main(args(base, spec, data, tmp_path / "runs", "r", "train.max_steps=16", "train.eval_steps=8",
                     "train.learning_rate=0.01")) == 0
    run = tmp_path / "runs" / "r"
    assert main(["export", str(run), "--gguf", "f16", "--out", str(tmp_path / "f16")]) == 0
    out = tmp_path / "shipped"
    assert main(["eval", "--run", str(run), "--runtime", "llama.cpp", "--model",
                 str(tmp_path / "f16" / "model-f16.gguf"), "--out", str(out)]) == 0
    adapter = {r["id"]: r for r in records(run / "finetuned")}
    shipped = records(out)
    assert len(shipped) == len(adapter) > 0
    comparison = json.loads((out / "comparison.json").read_text())
    for column, key in columns.items():
        assert [r[key] for r in shipped] == [adapter[r["id"]][key] for r in shipped]
        assert comparison["agreement"][column] == {"key": key, "n": len(shipped), "same": len(shipped)}
    if shape == "generation":  # the spec's stop text "." ends llama.cpp's answers as it ends PyTorch's
        assert all("." not in r["generate_text"] for r in shipped)


def test_a_recipe_s_export_gguf_ships_each_file_measured_in_the_run_and_its_report(tmp_path, monkeypatch):
    """`export.gguf: [f16, adapter]`: the run writes each file (with its Modelfile) under shipped/, runs it through
    llama.cpp on its own test split, pairs it with the adapter row by row, and its report shows the "Shipped as"
    table; the f16 file makes the adapter's decisions on every test row. Interrupted while measuring the second
    file, the stage leaves nothing half-written, and the same command resumes it."""
    from tasktune import shipping
    from tasktune.tasks import get_task
    from test_gguf import tiny_gemma3_base
    from tiny import run_args, write_sst2_tsv

    data = write_sst2_tsv(tmp_path / "train.tsv")
    spec = get_task("sst2").spec
    base = tiny_gemma3_base(tmp_path / "tiny-gemma3.gguf", [data.read_text(), spec.template, *(label.verbalizer for label in spec.labels)])
    args = run_args(base, data, tmp_path / "runs", "shipping", "train.learning_rate=0.01",
                    "export.gguf=[f16,adapter]", protocols="[score,generate]")
    measure = shipping.measure_file
    at_interruption = {}

    def interrupted_at_the_adapter(p, run_dir, folder, file, base_path, gguf_type):
        if gguf_type == "adapter":
            at_interruption.update(entries=set(os.listdir(run_dir)), staging=folder.parent.name)
            raise KeyboardInterrupt
        return measure(p, run_dir, folder, file, base_path, gguf_type)

    with monkeypatch.context() as patched:
        patched.setattr(shipping, "measure_file", interrupted_at_the_adapter)
        assert main(args) == 130
    partial = tmp_path / "runs" / ".shipping.partial"
    # The stage's clean-up removed its own staging folder (made with a unique name), and nothing else of the run.
    assert at_interruption["staging"].startswith(".shipped.") and at_interruption["staging"].endswith(".tmp")
    assert set(os.listdir(partial)) == at_interruption["entries"] - {at_interruption["staging"]}
    assert {"adapter", "finetuned", "zeroshot"} <= set(os.listdir(partial))
    assert not any(n.startswith((".shipped", "shipped")) for n in os.listdir(partial))
    assert main(args) == 0
    run = tmp_path / "runs" / "shipping"
    assert not any(n.startswith(".shipped") for n in os.listdir(run))
    for gguf_type, file in (("f16", "model-f16.gguf"), ("adapter", "adapter-f32.gguf")):
        assert {p.name for p in (run / "shipped" / gguf_type).iterdir()} == {file, "Modelfile", "eval"}
    adapter = {r["id"]: r for r in records(run / "finetuned")}
    f16 = records(run / "shipped" / "f16" / "eval")
    assert len(f16) == len(adapter) > 0
    assert all(r["score_pred"] == adapter[r["id"]]["score_pred"] for r in f16)
    shipped = json.loads((run / "shipped" / "shipped.json").read_text())
    assert [s["type"] for s in shipped] == ["f16", "adapter"]
    for s in shipped:
        score = next(r for r in s["rows"] if r["column"] == "score")
        assert score["n"] == len(adapter) and score["paired"]["mcnemar"]
        assert score["agreement"] == 1.0 if s["type"] == "f16" else score["agreement"] >= 0.95
        assert s["bytes"] == (run / "shipped" / s["file"]).stat().st_size and s["tokens_per_s"] > 0
        assert s["tokenizer_agreement"] == {"rows": len(adapter), "same_ids": len(adapter)}
    assert json.loads((run / "report.json").read_text())["shipped"] == shipped
    report = (run / "report.md").read_text()
    assert "## Shipped as (each file run by llama.cpp" in report
    assert "| merged f16 | score accuracy | " in report and "| adapter GGUF on the base GGUF | score accuracy" in report


@pytest.mark.parametrize("gguf, model, expected", [
    ("[q5_k]", "gguf", "GGUF type 'q5_k' is not one of"),
    ("[f16,f16]", "gguf", "names a type twice"),
    ("[f16]", "hf", "is a Hugging Face checkpoint: export --gguf adapter"),
    ("[adapter]", "hf", "measuring an adapter GGUF needs its base as GGUF"),
])
def test_a_recipe_s_export_gguf_is_checked_in_one_line_before_the_model_loads(gguf, model, expected,
                                                                             gemma3_gguf_run, tiny_llama, tmp_path,
                                                                             capsys, monkeypatch):
    from test_careful_user import refused_before_the_model_loads
    from tiny import run_args, write_sst2_tsv

    data = write_sst2_tsv(tmp_path / "train.tsv")
    refused_before_the_model_loads(
        run_args(gemma3_gguf_run[1] if model == "gguf" else tiny_llama, data, tmp_path / "runs", "r",
                 f"export.gguf={gguf}"), "export.gguf", expected, tmp_path / "runs" / "r", monkeypatch, capsys)
