"""A run's model as GGUF, the file llama.cpp, Ollama and LM Studio run: merged (`f16`, `bf16`, `q8_0`) or as
llama.cpp's LoRA adapter (`adapter`) for the unmerged base GGUF the user already has, with an Ollama Modelfile.

Written with the `gguf` package (the llama.cpp project's writer, tensor types and Q8_0 quantizer); Hugging Face
parameter names map to GGUF tensor names through transformers' own GGUF map (`get_gguf_hf_weights_map`, the one
its GGUF loader reads with), and the layout changes its loader undoes are applied here in reverse: Llama's
query/key rows are interleaved per head as llama.cpp's converter does, and Gemma's norm weights are stored as
1 + w. A merged file takes every metadata key of the base's GGUF (tokenizer, hyper-parameters) unchanged but the
file type: the base must have come as GGUF (the Gemma 3 270M alias, or a `.gguf` path). A base from a Hugging
Face checkpoint is refused for merged export in one line (its tokenizer would need llama.cpp's converter,
`convert_hf_to_gguf.py`, which is not on PyPI); its adapter exports. `q4_k_m` is quantized from the f16 file by
llama.cpp's own quantizer (`llama_model_quantize`, through llama-cpp-python: the `gguf` package has no K-quants).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasktune.errors import TasktuneError

# Hugging Face model_type -> GGUF architecture, for the architectures whose layout this module writes.
ARCHITECTURES = {"llama": "llama", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
MERGED_TYPES = ("f16", "bf16", "q8_0")
LLAMA_CPP_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # quantized by llama.cpp from the f16 file
GGUF_TYPES = (*MERGED_TYPES, *LLAMA_CPP_TYPES, "adapter")
# Metadata a merged file sets itself rather than copying from the base: what its tensors are stored as.
OWN_KEYS = ("general.architecture", "general.file_type", "general.quantization_version")


@dataclass(frozen=True)
class Written:
    path: Path
    tensors: int
    bytes: int


def check_export(gguf_type: str, *, head: str, method, base_model: str, evaluate: bool) -> None:
    """Every refusal of a GGUF export that the run's settings decide, in one line, before anything loads (the
    architecture is checked once the model's config is read: `gguf_export.architecture_of`)."""
    from tasktune.models import came_as_gguf

    if importlib.util.find_spec("gguf") is None:
        raise TasktuneError('a GGUF export needs the gguf package (the llama.cpp project\'s writer): pip install '
                            '"tasktune[gguf]"')
    if gguf_type not in GGUF_TYPES:
        raise TasktuneError(f"GGUF type {gguf_type!r} is not one of {list(GGUF_TYPES)}")
    if gguf_type in LLAMA_CPP_TYPES and importlib.util.find_spec("llama_cpp") is None:
        raise TasktuneError(f"GGUF type {gguf_type} needs llama.cpp's K-quant quantizer (the gguf package has "
                            "none): pip install \"tasktune[llama-cpp]\", or export q8_0")
    if head == "seqcls":
        raise TasktuneError("this run trains a classification head (train.objective seqcls), which GGUF has no "
                            "form for (llama.cpp runs causal LMs): export it with --merge as a Hugging Face model")
    if gguf_type == "adapter" and not method.gguf_adapter:
        raise TasktuneError(f"{method.title} has no llama.cpp LoRA-adapter form (it holds more than low-rank A/B "
                            "pairs, or none): export it merged, as f16 or q8_0")
    if gguf_type != "adapter" and not came_as_gguf(base_model):
        raise TasktuneError(f"a merged GGUF copies the base GGUF's tokenizer and metadata; this run's base "
                            f"{base_model!r} is a Hugging Face checkpoint: export --gguf adapter and apply it to "
                            "a GGUF of the base (llama.cpp's convert_hf_to_gguf.py), or export --merge and convert "
                            "that")
    if evaluate:
        if importlib.util.find_spec("llama_cpp") is None:
            raise TasktuneError('measuring a GGUF file runs it through llama.cpp: pip install '
                                '"tasktune[llama-cpp]"')
        if gguf_type == "adapter" and not came_as_gguf(base_model):
            raise TasktuneError(f"measuring an adapter GGUF needs its base as GGUF; this run's base "
                                f"{base_model!r} is a Hugging Face checkpoint")


def architecture_of(config) -> str:
    """The GGUF architecture of a transformers config, or one line saying which are supported."""
    arch = ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise TasktuneError(f"GGUF export supports the {sorted(set(ARCHITECTURES.values()))} architectures; this "
                            f"model is {config.model_type!r}")
    return arch


def tensor_names(model) -> dict[str, str]:
    """Hugging Face parameter name -> GGUF tensor name (transformers' GGUF map, read in the other direction)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    arch = architecture_of(model.config)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
    return {hf: gguf for gguf, hf in get_gguf_hf_weights_map(model, processor).items()}


def skeleton(config):
    """The architecture's module tree on the meta device (no memory): its parameter names as transformers
    writes them."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def to_gguf_layout(arch: str, gguf_name: str, weight: np.ndarray, config) -> np.ndarray:
    """The inverse of what transformers' GGUF loader does to a tensor (its Llama and Gemma processors)."""
    if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
        rows = weight.shape[0]
        # llama.cpp's rotary layout: each head's rows as (pairs, 2) rather than (2, halves).
        return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    if arch in ("gemma2", "gemma3") and "norm.weight" in gguf_name:
        return weight + 1  # Gemma's RMSNorm scales by (1 + w); llama.cpp stores the factor
    return weight


def stored(gguf_type: str, weight: np.ndarray):
    """(data, GGML type) as llama.cpp's converter stores a tensor of a `gguf_type` file: vectors in F32; Q8_0 only
    where rows split into its 32-value blocks (else F16, as llama.cpp falls back)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    weight = np.ascontiguousarray(weight, dtype=np.float32)
    if weight.ndim == 1:
        return weight, Q.F32
    if gguf_type == "q8_0" and weight.shape[-1] % 32 == 0:
        return quants.quantize(weight, Q.Q8_0), Q.Q8_0
    if gguf_type == "bf16":
        return quants.quantize(weight, Q.BF16), Q.BF16
    return weight.astype(np.float16), Q.F16


def file_type(gguf_type: str) -> int:
    from gguf import LlamaFileType

    return {"f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0}[gguf_type]


def copy_metadata(writer, base) -> None:
    """Every key of the base GGUF (a `gguf.GGUFReader`) but the ones a merged file sets itself, with its value
    and type unchanged."""
    from gguf import GGUFValueType

    for key, field in base.fields.items():
        if key.startswith("GGUF.") or key in OWN_KEYS:
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), kind)


def write_model(model, base_path: Path, out: Path, gguf_type: str) -> Written:
    """The (merged) model as a GGUF file with the base GGUF's metadata and exactly its tensor names."""
    from gguf import GGUFReader, GGUFWriter

    arch = architecture_of(model.config)
    names = tensor_names(model)
    state = {names[k]: v for k, v in model.state_dict().items() if k in names}
    base = GGUFReader(base_path)
    if base.fields["general.architecture"].contents() != arch:
        raise TasktuneError(f"{base_path} is a {base.fields['general.architecture'].contents()!r} GGUF; the model "
                            f"is {arch!r}")
    missing = [t.name for t in base.tensors if t.name not in state]
    if missing:
        raise TasktuneError(f"the model has no weight for the base GGUF's tensors {missing[:5]}: not the same "
                            "architecture")
    writer = GGUFWriter(out, arch)
    copy_metadata(writer, base)
    writer.add_file_type(file_type(gguf_type))
    writer.add_quantization_version(2)
    size = 0
    for t in base.tensors:  # the base's order and names
        weight = state[t.name].detach().float().cpu().numpy()
        data, kind = stored(gguf_type, to_gguf_layout(arch, t.name, weight, model.config))
        writer.add_tensor(t.name, data, raw_dtype=kind)
        size += data.nbytes
    _finish(writer)
    return Written(out, len(base.tensors), size)


def quantize_with_llama_cpp(f16: Written, out: Path, gguf_type: str) -> Written:
    """llama.cpp's quantizer (`llama_model_quantize`, as its `llama-quantize` tool) from the f16 file this export
    wrote, which is then removed: it keeps the metadata and names, and picks each tensor's K-quant (Q4_K_M mixes
    Q4_K and Q6_K; a row too short for a K-quant block gets a fallback type)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_CPP_TYPES[gguf_type])
    params.nthread = 0  # all cores
    status = llama_cpp.llama_model_quantize(str(f16.path).encode(), str(out).encode(), params)
    f16.path.unlink()
    if status != 0:
        raise TasktuneError(f"llama.cpp could not quantize the f16 export to {gguf_type} (status {status})")
    return Written(out, f16.tensors, out.stat().st_size)


def lora_layers(peft_model):
    """(Hugging Face weight name, A, B, scale) of every LoRA layer of a peft model's active adapter."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            adapter = module.active_adapters[0]
            if adapter not in module.lora_A:
                continue
            base_name = name.removeprefix("base_model.model.") + ".weight"
            yield (base_name, module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                   float(module.scaling[adapter]))


def write_adapter(peft_model, out: Path) -> Written:
    """llama.cpp's LoRA adapter format (convert_lora_to_gguf.py's): `general.type = adapter`, one
    `adapter.lora.alpha`, and `NAME.lora_a` [r, in] / `NAME.lora_b` [out, r] per target, F32. llama.cpp scales
    by alpha / r, so alpha is written as scale x r (rsLoRA's alpha / sqrt(r) included)."""
    from gguf import GGUFWriter

    base = peft_model.get_base_model()
    arch = architecture_of(base.config)
    names = tensor_names(skeleton(base.config))  # the wrapped base's own names carry peft's `base_layer`
    layers = list(lora_layers(peft_model))
    if not layers:
        raise TasktuneError("the adapter has no LoRA layers to write")
    scales = {(round(scale * a.shape[0], 6)) for _, a, _, scale in layers}
    if len(scales) != 1:
        raise TasktuneError(f"llama.cpp's adapter format has one alpha for every layer; this adapter's layers have "
                            f"{sorted(scales)}")
    writer = GGUFWriter(out, arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", scales.pop())
    size = 0
    for hf_name, a, b, _ in layers:
        if hf_name not in names:
            raise TasktuneError(f"adapter target {hf_name} has no GGUF tensor name for {arch}")
        gguf_name = names[hf_name]
        a_np = a.detach().float().cpu().numpy()
        # B's rows are the target's output rows: the same layout change as the weight's (A's rows are rank).
        b_np = to_gguf_layout(arch, gguf_name, b.detach().float().cpu().numpy(), base.config)
        for suffix, data in (("lora_a", a_np), ("lora_b", b_np)):
            writer.add_tensor(f"{gguf_name}.{suffix}", np.ascontiguousarray(data, dtype=np.float32))
            size += data.nbytes
    _finish(writer)
    return Written(out, 2 * len(layers), size)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def modelfile(gguf_name: str, adapter: bool, stop: list[str]) -> str:
    """An Ollama Modelfile: the file (or the base and the adapter), the prompt passed through as tasktune
    renders it, greedy decoding and the task's stop strings."""
    lines = ["# Made by tasktune. `ollama create NAME -f Modelfile`, then send the prompt exactly as tasktune "
             "renders it (the run's report shows the template)."]
    if adapter:
        lines += ["# FROM must name the *unmerged* base model as GGUF (the one the run started from).",
                  "FROM ./base.gguf", f"ADAPTER ./{gguf_name}"]
    else:
        lines += [f"FROM ./{gguf_name}"]
    lines += ['TEMPLATE """{{ .Prompt }}"""', "PARAMETER temperature 0"]
    lines += [f"PARAMETER stop {_quoted(s)}" for s in stop]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
