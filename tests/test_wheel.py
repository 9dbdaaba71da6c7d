"""A wheel carries the recipes and the embedded data: installed into a fresh venv, it runs a shortened main job
from an empty directory with no network and nothing beside it."""

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SST2_SHA256 = "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1"  # the GLUE SST-2 train.tsv


def sh(*command, cwd=None, env=None):
    # Never PYTHONPATH: tasktune must come from the wheel alone.
    env = {k: v for k, v in (env or os.environ).items() if k != "PYTHONPATH"}
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", root / "dist", ROOT)
    wheel = next((root / "dist").glob("tasktune-*.whl"))
    venv = root / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    # The dependencies (torch, transformers, ...) come from this test's environment, without reinstalling
    # gigabytes; tasktune itself only from the wheel (a path in a .pth file does not run the editable finder).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    sh(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--quiet", wheel)
    return venv


def test_wheel_runs_the_main_job_from_an_empty_directory(installed_wheel, tiny_llama, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("TASKTUNE_DATA_DIR", "PYTHONPATH")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    tasktune = installed_wheel / "bin" / "tasktune"
    where = sh(installed_wheel / "bin" / "python", "-c", "import tasktune; print(tasktune.__file__)", cwd=empty, env=env)
    assert str(installed_wheel) in where, "tasktune must come from the wheel, not the source tree"

    listing = sh(tasktune, "recipes", cwd=empty, env=env)
    assert "sst2-gemma3-270m-cpu" in listing and "squad2-gemma3-270m-cpu" in listing
    sh(tasktune, "recipes", "cp", "sst2-gemma3-270m-cpu", "mine.yaml", cwd=empty, env=env)
    assert "name: sst2-gemma3-270m-cpu" in (empty / "mine.yaml").read_text()

    sh(tasktune, "run", "sst2-gemma3-270m-cpu", f"model={tiny_llama}", "dtype=fp32", "eval.controls=[]",
       "eval.perplexity=null", "data.limit_train=64",
       "data.limit_test=48", "data.val_size=32", "eval.limit_generate=16", "train.max_steps=2",
       "train.eval_steps=2", "train.batch_size=8", cwd=empty, env=env)
    run = empty / "runs" / "sst2-gemma3-270m-cpu"
    report = json.loads((run / "report.json").read_text())
    assert report["data"]["origin"] == "embedded"
    assert list(report["data"]["sha256"].values()) == [hashlib.sha256(
        __import__("gzip").decompress(Path(report["data"]["source"]).read_bytes())).hexdigest()]
    assert report["data"]["source"].endswith("train.tsv.gz")
    assert report["finetuned"]["score"]["n"] == 48
    assert "embedded" in (run / "report.md").read_text()
    assert sorted(p.name for p in empty.iterdir()) == ["mine.yaml", "runs"]


def test_embedded_sst2_is_the_glue_file():
    import gzip

    data = gzip.decompress((ROOT / "src" / "tasktune" / "data" / "embedded" / "sst2" / "train.tsv.gz").read_bytes())
    assert hashlib.sha256(data).hexdigest() == SST2_SHA256
