"""`tasktune export RUN --gguf TYPE`: GGUF files for llama.cpp / Ollama, read back by an independent reader
(transformers' GGUF loader, which undoes llama.cpp's layout its own way), and one-line refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tasktune.cli import main
from tasktune.errors import TasktuneError
from tiny import run_args, tiny_config, write_sst2_tsv

gguf = pytest.importorskip("gguf")


def spm_vocabulary(texts: list[str]) -> list[str]:
    """A tiny Gemma-style sentencepiece vocabulary covering `texts`: Gemma's special ids (pad 0, eos 1, bos 2,
    unk 3), every character, and each word as "▁word" with its prefixes (so the merges transformers derives from
    a vocabulary reach whole words)."""
    words = sorted({w for text in texts for w in re.findall(r"[A-Za-z0-9]+", text)})
    chars = sorted({c for text in texts for c in text} - {" "}) + ["\u2581"]
    pieces = [f"\u2581{w}"[:i] for w in words for i in range(2, len(w) + 2)]
    return list(dict.fromkeys(["<pad>", "<eos>", "<bos>", "<unk>", *chars, *pieces]))


def tiny_gemma3_base(out: Path, texts: list[str]) -> Path:
    """A tiny random Gemma 3 (seed 0) as a base GGUF at `out`, its sentencepiece vocabulary covering `texts`."""
    from transformers import AutoModelForCausalLM

    vocabulary = spm_vocabulary(texts)
    torch.manual_seed(0)
    cfg = tiny_config("gemma3", vocab_size=len(vocabulary))
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = 0, 1, 2
    return base_gguf_of(AutoModelForCausalLM.from_config(cfg), out, vocabulary)


def base_gguf_of(model, out: Path, vocabulary: list[str] | None = None) -> Path:
    """A model as a base GGUF, F32, written here independently of `gguf_export.write_model` (names from
    transformers' map, values through the same layout change): what a converted base looks like. Metadata: the
    hyper-parameters transformers' loader reads and, with `vocabulary`, a sentencepiece tokenizer as llama.cpp
    stores Gemma's."""
    from tasktune.gguf_export import architecture_of, tensor_names, to_gguf_layout

    cfg = model.config
    arch = architecture_of(cfg)
    writer = gguf.GGUFWriter(out, arch)
    writer.add_name("tiny")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if getattr(cfg, "head_dim", None):
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    if getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(cfg.sliding_window)
    if vocabulary is not None:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(vocabulary)
        writer.add_token_scores([-float(i) for i in range(len(vocabulary))])
        writer.add_token_types([3, 3, 3, 2] + [1] * (len(vocabulary) - 4))
        writer.add_pad_token_id(0)
        writer.add_eos_token_id(1)
        writer.add_bos_token_id(2)
        writer.add_unk_token_id(3)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_add_space_prefix(False)
    names = tensor_names(model)
    for hf_name, weight in model.state_dict().items():
        if hf_name not in names or (names[hf_name] == "output.weight" and cfg.tie_word_embeddings):
            continue
        data = to_gguf_layout(arch, names[hf_name], weight.float().numpy(), cfg)
        writer.add_tensor(names[hf_name], np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def randomized(arch: str):
    """A tiny model whose every weight, norms included, is random (a norm of ones hides a missing +1)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def read_back(path: Path, model) -> dict[str, torch.Tensor]:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])
@pytest.mark.parametrize("gguf_type", ["f16", "bf16", "q8_0"])
def test_every_weight_reads_back_through_transformers_gguf_loader(arch, gguf_type, tmp_path):
    """write_model's tensors, read by transformers' loader (which reverses Llama's rotary interleave and Gemma's
    1 + w its own way), equal the model's weights as the type stores them."""
    from tasktune.gguf_export import write_model

    model = randomized(arch)
    base = base_gguf_of(model, tmp_path / "base.gguf")
    written = write_model(model, base, tmp_path / "out.gguf", gguf_type)
    back = read_back(written.path, model)
    state = model.state_dict()
    assert back and set(back) <= set(state)
    for name, tensor in back.items():
        expected = state[name].float()
        if expected.ndim == 2 and gguf_type in ("f16", "bf16"):
            expected = expected.to(torch.float16 if gguf_type == "f16" else torch.bfloat16).float()
        # Q8_0: steps of d = block max / 127, d itself stored as F16 (|error| <= d/2 + 127 d 2^-11); vectors stay
        # F32 (the ±1 of Gemma's norms rounds once).
        step = float(expected.abs().max()) / 127
        tol = 0.57 * step if gguf_type == "q8_0" and expected.ndim == 2 else 1e-6
        torch.testing.assert_close(torch.as_tensor(np.asarray(tensor)).float(), expected, atol=tol, rtol=0,
                                   msg=f"{name} differs")
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(written.path).tensors}
    assert {k for n, k in kinds.items() if "norm" not in n} == {gguf_type.upper()}


def test_the_layout_check_can_fail(tmp_path, monkeypatch):
    """Without the rotary interleave, Llama's query rows read back in the wrong order."""
    from tasktune import gguf_export

    model = randomized("llama")
    base = base_gguf_of(model, tmp_path / "base.gguf")
    monkeypatch.setattr(gguf_export, "to_gguf_layout", lambda arch, name, w, cfg: w)
    back = read_back(gguf_export.write_model(model, base, tmp_path / "out.gguf", "f16").path, model)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(torch.as_tensor(np.asarray(back[q])).float(), model.state_dict()[q].half().float())


# --- the command, on a run whose base came as GGUF -------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma3_gguf_run(tmp_path_factory):
    """A tiny Gemma 3 base as GGUF, with a sentencepiece tokenizer stored as llama.cpp stores Gemma's (so
    tokenizer metadata goes through the copy), trained by `tasktune run` for a few steps."""
    from tasktune.tasks import get_task

    root = tmp_path_factory.mktemp("gguf-run")
    data = write_sst2_tsv(root / "train.tsv")
    spec = get_task("sst2").spec
    base = tiny_gemma3_base(root / "tiny-gemma3.gguf",
                            [data.read_text(), spec.template, *(label.verbalizer for label in spec.labels)])
    assert main(run_args(base, data, root / "runs", "g", "train.learning_rate=0.01", protocols="[score,generate]")) == 0
    return root / "runs" / "g", base


def test_a_merged_gguf_keeps_the_base_metadata_and_tensors_and_loads_with_the_same_weights(gemma3_gguf_run,
                                                                                          tmp_path):
    from transformers import AutoModelForCausalLM

    from tasktune.models import load_adapted_model
    from tasktune.run_layout import RunLayout

    run, base = gemma3_gguf_run
    out = tmp_path / "f16"
    assert main(["export", str(run), "--gguf", "f16", "--out", str(out)]) == 0
    exported = gguf.GGUFReader(out / "model-f16.gguf")
    original = gguf.GGUFReader(base)
    kept = {k: f.contents() for k, f in original.fields.items()
            if not k.startswith("GGUF.") and k not in ("general.file_type", "general.quantization_version")}
    assert {k: exported.fields[k].contents() for k in kept} == kept
    assert exported.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
    assert [t.name for t in exported.tensors] == [t.name for t in original.tensors]
    # The file, loaded by transformers as a model, holds the merged model's weights (F16-rounded matrices).
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf", dtype=torch.float32)
    merged = load_adapted_model(RunLayout(run).adapter, str(base), "fp32").model.merge_and_unload()
    for name, tensor in loaded.state_dict().items():
        expected = merged.state_dict()[name].float()
        expected = expected.half().float() if expected.ndim == 2 else expected
        torch.testing.assert_close(tensor, expected, atol=1e-6, rtol=0, msg=name)
    card = (out / "README.md").read_text()
    assert "## GGUF (llama.cpp, Ollama)" in card and "model-f16.gguf" in card
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in modelfile and 'PARAMETER stop "<eos>"' in modelfile
    assert json.loads((out / "gguf.json").read_text())["bytes"] == (out / "model-f16.gguf").stat().st_size


def test_a_gguf_adapter_holds_the_trained_low_rank_pairs(gemma3_gguf_run, tmp_path):
    """llama.cpp's adapter format: general.type adapter, one alpha (llama.cpp scales by alpha / r), A [r, in] and
    B [out, r] per target under the base tensor's name."""
    from tasktune.models import load_adapted_model
    from tasktune.run_layout import RunLayout

    run, base = gemma3_gguf_run
    out = tmp_path / "adapter"
    assert main(["export", str(run), "--gguf", "adapter", "--out", str(out)]) == 0
    reader = gguf.GGUFReader(out / "adapter-f32.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["general.architecture"].contents() == "gemma3"
    config = json.loads((RunLayout(run).adapter / "adapter_config.json").read_text())
    r, alpha = config["r"], config["lora_alpha"]
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(alpha)  # scale alpha / r, times r
    tensors = {t.name: t for t in reader.tensors}
    base_names = {t.name for t in gguf.GGUFReader(base).tensors}
    targets = {n.rsplit(".", 1)[0] for n in tensors}
    assert targets <= base_names and len(tensors) == 2 * len(targets)
    peft_model = load_adapted_model(RunLayout(run).adapter, str(base), "fp32").model
    a = dict(peft_model.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]
    stored = tensors["blk.0.attn_q.weight.lora_a"]
    assert list(stored.shape) == [a.shape[1], r]  # GGUF lists dimensions innermost first
    np.testing.assert_array_equal(np.asarray(stored.data).reshape(a.shape), a.detach().numpy())
    assert "ADAPTER ./adapter-f32.gguf" in (out / "Modelfile").read_text()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_q4_k_m_without_llama_cpp_and_classification_heads_and_dora_are_refused_in_one_line(
        gemma3_gguf_run, tiny_llama, tmp_path, capsys, monkeypatch):
    import importlib.util

    run, _ = gemma3_gguf_run
    real = importlib.util.find_spec
    with monkeypatch.context() as patched:
        patched.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
        capsys.readouterr()
        assert main(["export", str(run), "--gguf", "q4_k_m", "--out", str(tmp_path / "q4")]) == 2
    assert "K-quant quantizer" in one_error_line(capsys) and not (tmp_path / "q4").exists()
    data = write_sst2_tsv(tmp_path / "train.tsv")
    for name, extra, fmt, expected in (
            ("seqcls", ["train.objective=seqcls"], "f16", "classification head"),
            ("dora", ["train.method=dora"], "adapter", "DoRA has no llama.cpp LoRA-adapter form"),
            ("hf", [], "f16", "is a Hugging Face checkpoint: export --gguf adapter")):
        assert main(run_args(tiny_llama, data, tmp_path / "runs", name, *extra, steps=2)) == 0
        capsys.readouterr()
        out = tmp_path / f"out-{name}"
        assert main(["export", str(tmp_path / "runs" / name), "--gguf", fmt, "--out", str(out)]) == 2
        assert expected in one_error_line(capsys) and not out.exists(), name


def test_an_architecture_without_a_gguf_layout_is_refused_in_one_line(tmp_path, capsys):
    from transformers import GPT2Config

    from tasktune.gguf_export import architecture_of

    with pytest.raises(TasktuneError) as refused:
        architecture_of(GPT2Config())
    assert "GGUF export supports the ['gemma2', 'gemma3', 'llama'] architectures; this model is 'gpt2'" in str(
        refused.value)


def test_an_llama_adapter_is_written_for_a_hugging_face_base(tiny_llama, tmp_path):
    """The adapter needs no tokenizer metadata: it exports for a base from a Hugging Face checkpoint, its
    B rows interleaved per head as the base's query/key weights are."""
    from tasktune.gguf_export import to_gguf_layout
    from tasktune.models import load_adapted_model
    from tasktune.run_layout import RunLayout

    data = write_sst2_tsv(tmp_path / "train.tsv")
    assert main(run_args(tiny_llama, data, tmp_path / "runs", "l", steps=2)) == 0
    out = tmp_path / "adapter"
    assert main(["export", str(tmp_path / "runs" / "l"), "--gguf", "adapter", "--out", str(out)]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(out / "adapter-f32.gguf").tensors}
    model = load_adapted_model(RunLayout(tmp_path / "runs" / "l").adapter, str(tiny_llama), "fp32").model
    b = dict(model.named_parameters())["base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"]
    expected = to_gguf_layout("llama", "blk.1.attn_q.weight", b.detach().numpy(), model.get_base_model().config)
    assert not np.array_equal(expected, b.detach().numpy())  # the interleave moves rows
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.attn_q.weight.lora_b"].data).reshape(b.shape), expected)


def test_without_the_gguf_package_the_export_is_one_line(gemma3_gguf_run, tmp_path, monkeypatch, capsys):
    import importlib.util

    run, _ = gemma3_gguf_run
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    capsys.readouterr()
    assert main(["export", str(run), "--gguf", "f16", "--out", str(tmp_path / "out")]) == 2
    assert 'pip install "tasktune[gguf]"' in one_error_line(capsys) and not (tmp_path / "out").exists()


def test_assembling_a_packaged_gguf_removes_only_the_folder_it_made(tmp_path, monkeypatch):
    """The one deletion the GGUF paths add: the temporary folder a packaged alias is assembled into. Everything
    already in the temporary directory stays, the folder is a new one, and it goes on success and on error."""
    import sys
    import tempfile
    import types

    from tasktune import models

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (tmp_path / "users-file.gguf").write_bytes(b"mine")
    (tmp_path / "tasktune-gguf-users-folder").mkdir()  # a name like ours, not made by this call
    seen = []

    def assemble(out):
        Path(out).write_bytes(b"GGUF")
        return str(out)

    monkeypatch.setitem(sys.modules, "fake_gguf_package", types.SimpleNamespace(assemble=assemble))
    monkeypatch.setitem(models.GGUF_ALIASES, "fake-alias", "fake_gguf_package")
    with models.assembled_gguf("fake-alias") as path:
        seen.append(path.parent)
        assert path.read_bytes() == b"GGUF" and path.parent.parent == tmp_path
        assert path.parent.name not in ("tasktune-gguf-users-folder",)
    with pytest.raises(RuntimeError):
        with models.assembled_gguf("fake-alias") as path:
            seen.append(path.parent)
            raise RuntimeError("the export failed")
    assert not any(folder.exists() for folder in seen) and len(set(seen)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tasktune-gguf-users-folder", "users-file.gguf"]
    assert (tmp_path / "users-file.gguf").read_bytes() == b"mine"
