"""Adaptation methods (`train.method`): how a base model is wrapped for training, and what the parameter
analysis counts for it. One registry; a plug-in adds a method with `register_method`.

Built in, all through peft (an adapter saved beside the frozen base, merged for inference):
- `lora`: low-rank update B·A scaled by alpha / r (the default).
- `dora`: weight-decomposed LoRA: the LoRA update gives the direction, plus one trainable magnitude per output
  row of each target (peft `use_dora`).
- `rslora`: rank-stabilised scaling alpha / sqrt(r) (peft `use_rslora`), for larger ranks.
- `ia3`: one learned scale vector per target (peft IA3): the output rows of attention and up/gate projections,
  the input columns of the MLP's down projection. No rank: `lora_r`, `lora_alpha`, `lora_dropout` do not apply.
- `none`: no training, in a sweep only: the base model with `eval.shots` examples in the prompt, ranked on the
  same validation slice, so "does fine-tuning beat prompting" is answered in the same table.

- `qlora`: LoRA trained on the base loaded in 4-bit NF4 with double quantization (bitsandbytes, CPU or CUDA;
  `pip install "tasktune[qlora]"`), matmuls in the run's dtype. Evaluated, analysed and exported as the
  adapter merged into the *dequantized* 4-bit base (what a merged QLoRA model is), so its gain over the
  zero-shot base includes the quantization's own effect.
- `pissa`: LoRA initialised on the principal singular vectors of each target (peft `init_lora_weights="pissa"`,
  exact SVD): the base is rewritten to its residual W − B₀A₀ at initialisation, so it trains on a base of its
  own; saved through peft's conversion as a plain LoRA adapter of rank 2r on the *original* base, so that
  evaluation, the analysis and export treat it as LoRA.
- `full`: every weight trained (fp32 master weights, the run's bf16/fp16 as autocast), saved as the whole model
  in the run's dtype; the analysis gives ΔW of every tensor against the base.

Methods that rewrite or re-load the base (`own_base`) train on a copy loaded for them, so the run's zero-shot
base, and a sweep's shared base, stay as loaded.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

from tasktune.atomic import write_json, write_with
from tasktune.errors import TasktuneError
from tasktune.run_layout import ADAPTER_BASE, FULL_WEIGHTS

# The MLP's down projection under the names the common decoders give it: IA3 scales its *input* (the expanded
# hidden state), peft's "feedforward" modules; every other target has its output scaled.
FEEDFORWARD_NAMES = ("down_proj", "fc2", "c_proj", "w2", "dense_4h_to_h")


class Method(ABC):
    """One adaptation method: its peft config, and the trainable count its formula predicts."""
    name: str
    title: str                    # as a sentence names it: "LoRA", "IA3"
    description: str
    trains: bool = True           # False: `none`, prompting only (sweeps)
    quantization: str | None = None  # how the base is loaded for training (models.load_model)
    own_base: bool = False        # trains on a base loaded for it alone (it rewrites or re-quantizes the base)
    master_dtype: str | None = None  # the trained base's dtype when not the run's (full: "fp32")
    # Evaluated as saved, reloaded from adapter/: the saved adapter sits on another base than the trained one
    # (QLoRA: the dequantized 4-bit base; PiSSA: converted to the original base).
    evaluate_as_saved: bool = False
    refuses: dict = {}  # {objective: why}: objectives this method cannot train, refused before anything loads
    whole_model: bool = False     # saved as the whole fine-tuned model (FULL_WEIGHTS), not as a peft adapter

    @property
    def records_its_base(self) -> bool:
        """It writes ADAPTER_BASE beside its weights: they sit on another base than plain peft's (or none)."""
        return bool(self.quantization) or self.whole_model

    @property
    def gguf_adapter(self) -> bool:
        """Its saved weights are plain low-rank pairs (A, B per target and one scale): llama.cpp's LoRA adapter
        format holds them (`tasktune export --gguf adapter`); other methods ship merged only."""
        return False

    @abstractmethod
    def peft_config(self, train_cfg, seqcls: bool):
        """The peft config that wraps the base model for training (None: nothing is trained)."""

    def wrap(self, model, train_cfg, seqcls: bool, work: Path):
        """The model the Trainer trains: the base wrapped by peft. `work`: the train stage's folder."""
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(train_cfg, seqcls))

    def save(self, model, adapter_dir: Path, work: Path, head: str) -> None:
        """Write the trained weights (main process only), and how they relate to the base where that is not
        plain peft."""
        model.save_pretrained(adapter_dir)  # safetensors
        record = self.base_record(model, head)
        if record:
            write_json(Path(adapter_dir) / ADAPTER_BASE, record)

    def base_record(self, model, head: str) -> dict:
        """What `read_adapter_base` reads back: {} for a plain peft adapter."""
        return {"method": self.name, "quantization": self.quantization} if self.quantization else {}

    @abstractmethod
    def expected_parameters(self, r: int, modules: list[tuple[str, tuple[int, int]]]) -> int:
        """The trainable count its formula gives for these targets: (module type, (out, in) weight shape)."""

    @abstractmethod
    def analyse(self, base_path: str, adapter_dir: Path, rank_tol: float = 1e-6) -> dict:
        """params.json's analysis of weights this method saved: counts, its formula check, ΔW per module."""

    def settings(self, train_cfg: dict) -> str:
        """Its settings as the report and model card name them."""
        return (f"r={train_cfg['lora_r']} alpha={train_cfg['lora_alpha']} dropout={train_cfg['lora_dropout']} on "
                f"{', '.join(train_cfg['target_modules'])}")


def _task_type(seqcls: bool):
    from peft import TaskType

    # SEQ_CLS makes peft train and save the fresh `score` head with the adapter (modules_to_save).
    return TaskType.SEQ_CLS if seqcls else TaskType.CAUSAL_LM


@dataclass(frozen=True)
class LoraFamily(Method):
    name: str
    title: str
    lora_options: dict = field(default_factory=dict)   # extra peft LoraConfig arguments
    magnitude_vectors: bool = False                      # DoRA: one trainable vector of out-features per target
    description: str = ""
    quantization: str | None = None                      # QLoRA: `nf4`, the base's linear layers in 4 bits
    own_base: bool = False
    evaluate_as_saved: bool = False
    # PiSSA: saved as the difference from its initialisation, B·A − B₀·A₀, one LoRA of twice the trained rank.
    saved_as_difference: bool = False

    def peft_config(self, train_cfg, seqcls: bool):
        from peft import LoraConfig

        return LoraConfig(
            r=train_cfg.lora_r, lora_alpha=train_cfg.lora_alpha, lora_dropout=train_cfg.lora_dropout,
            target_modules=list(train_cfg.target_modules), bias="none", task_type=_task_type(seqcls),
            **self.lora_options)

    @property
    def gguf_adapter(self) -> bool:
        return not self.magnitude_vectors  # DoRA's magnitude vectors have no place in llama.cpp's adapter

    def expected_parameters(self, r: int, modules: list[tuple[str, tuple[int, int]]]) -> int:
        return sum(r * (out + inp) + (out if self.magnitude_vectors else 0) for _, (out, inp) in modules)

    def analyse(self, base_path: str, adapter_dir: Path, rank_tol: float = 1e-6) -> dict:
        from tasktune.lora_delta import analyse_lora

        return analyse_lora(base_path, Path(adapter_dir), self, read_adapter_base(adapter_dir), rank_tol)


@dataclass(frozen=True)
class PiSSA(LoraFamily):
    name: str = "pissa"
    title: str = "PiSSA"
    lora_options: dict = field(default_factory=lambda: {"init_lora_weights": "pissa"})
    description: str = ("LoRA initialised on each target's principal singular vectors (the base keeps the "
                        "residual); saved converted to plain LoRA of rank 2r on the original base")
    own_base: bool = True
    evaluate_as_saved: bool = True
    saved_as_difference: bool = True
    # peft 0.21's conversion (save_pretrained with path_initial_model_for_weight_conversion) raises a KeyError on
    # a classification head's modules_to_save (`base_model.model.score.weight`): seen in the method tests.
    refuses: dict = field(default_factory=lambda: {"seqcls": "peft cannot convert a PiSSA adapter that carries a "
                                                            "classification head; use lora, or another objective"})
    INITIAL = "pissa_initial"  # the adapter at initialisation, beside the checkpoints: what the conversion subtracts

    def wrap(self, model, train_cfg, seqcls: bool, work: Path):
        from accelerate import PartialState

        model = super().wrap(model, train_cfg, seqcls, work)
        if PartialState().is_main_process:
            # peft's recipe for the conversion: the initial A₀, B₀ saved with init_lora_weights=True, so that the
            # converted adapter loads onto the original base (PeftModel.save_pretrained's
            # path_initial_model_for_weight_conversion).
            config = model.peft_config["default"]
            config.init_lora_weights = True
            model.save_pretrained(Path(work) / self.INITIAL)
            config.init_lora_weights = "pissa"
        return model

    def save(self, model, adapter_dir: Path, work: Path, head: str) -> None:
        # ΔW = B·A − B₀·A₀ as one LoRA of rank 2r: [B, −B₀]·[A; A₀], with the original base weights.
        model.save_pretrained(adapter_dir, path_initial_model_for_weight_conversion=str(Path(work) / self.INITIAL))
        write_json(Path(adapter_dir) / ADAPTER_BASE, self.base_record(model, head))

    @property
    def records_its_base(self) -> bool:
        return True

    def base_record(self, model, head: str) -> dict:
        return {"method": self.name, "trained_rank": int(model.peft_config["default"].r)}


@dataclass(frozen=True)
class FullFineTune(Method):
    name: str = "full"
    title: str = "full fine-tuning"
    description: str = ("every weight trained (fp32 master weights under the run's bf16/fp16 autocast; the lora_* "
                        "keys do not apply)")
    own_base: bool = True
    master_dtype: str | None = "fp32"
    whole_model: bool = True

    def peft_config(self, train_cfg, seqcls: bool):
        return None

    def wrap(self, model, train_cfg, seqcls: bool, work: Path):
        return model.requires_grad_(True)

    def save(self, model, adapter_dir: Path, work: Path, head: str) -> None:
        from safetensors.torch import save_model

        # Tied weights are stored once (safetensors keeps one name of lm_head / embed_tokens).
        write_with(Path(adapter_dir) / FULL_WEIGHTS, lambda tmp: save_model(model, tmp))
        write_json(Path(adapter_dir) / ADAPTER_BASE, self.base_record(model, head))

    def base_record(self, model, head: str) -> dict:
        return {"method": self.name, "head": head}

    def expected_parameters(self, r: int, modules: list[tuple[str, tuple[int, int]]]) -> int:
        return sum(math.prod(shape) for _, shape in modules)

    def analyse(self, base_path: str, adapter_dir: Path, rank_tol: float = 1e-6) -> dict:
        from tasktune.lora_delta import analyse_full

        return analyse_full(base_path, Path(adapter_dir), self.name)

    def settings(self, train_cfg: dict) -> str:
        return "every weight"


@dataclass(frozen=True)
class IA3(Method):
    name: str = "ia3"
    title: str = "IA3"
    description: str = ("one learned scale per output row of each target (per input column of the MLP's down "
                        "projection; the lora_* keys do not apply)")

    def peft_config(self, train_cfg, seqcls: bool):
        from peft import IA3Config

        targets = list(train_cfg.target_modules)
        return IA3Config(target_modules=targets, feedforward_modules=[t for t in targets if t in FEEDFORWARD_NAMES],
                         task_type=_task_type(seqcls))

    def expected_parameters(self, r: int, modules: list[tuple[str, tuple[int, int]]]) -> int:
        return sum(inp if kind in FEEDFORWARD_NAMES else out for kind, (out, inp) in modules)

    def analyse(self, base_path: str, adapter_dir: Path, rank_tol: float = 1e-6) -> dict:
        from tasktune.lora_delta import analyse_ia3

        return analyse_ia3(base_path, Path(adapter_dir), _adapter_config(adapter_dir), self.name)

    def settings(self, train_cfg: dict) -> str:
        return f"scale vectors on {', '.join(train_cfg['target_modules'])}"


@dataclass(frozen=True)
class Prompting(Method):
    name: str = "none"
    title: str = "prompting"
    description: str = ("no training: the base model prompted with eval.shots examples, so k-shot prompting "
                        "competes with fine-tuning in a sweep")
    trains: bool = False

    def peft_config(self, train_cfg, seqcls: bool):
        return None

    def expected_parameters(self, r: int, modules: list[tuple[str, tuple[int, int]]]) -> int:
        return 0

    def analyse(self, base_path: str, adapter_dir: Path, rank_tol: float = 1e-6) -> dict:
        raise TasktuneError(f"{adapter_dir}: prompting trains nothing, so it saves no weights to analyse")

    def settings(self, train_cfg: dict) -> str:
        return "no training"


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if not isinstance(method, Method):
        raise TypeError(f"{method!r} is not a tasktune.methods.Method")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise TasktuneError(f"train.method {name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]


for _method in (
    LoraFamily("lora", "LoRA", description="low-rank update B·A × alpha/r on the target projections"),
    LoraFamily("dora", "DoRA", {"use_dora": True}, magnitude_vectors=True,
               description="weight-decomposed LoRA: LoRA direction plus a trainable magnitude per output row"),
    LoraFamily("rslora", "rsLoRA", {"use_rslora": True}, description="LoRA with rank-stabilised scaling alpha/sqrt(r)"),
    LoraFamily("qlora", "QLoRA", description="LoRA on a base whose linear layers are 4-bit NF4 with double "
                                             "quantization (bitsandbytes, the qlora extra); merged into the "
                                             "dequantized base",
               quantization="nf4", own_base=True, evaluate_as_saved=True),
    PiSSA(),
    FullFineTune(),
    IA3(),
    Prompting(),
):
    register_method(_method)


# --- what a method saved: read back from a run's adapter/ -------------------------------------------------------

# What ADAPTER_BASE may say: QLoRA's 4-bit base ({"quantization": "nf4"} alone before commit bdb1bbc), a PiSSA
# adapter converted to plain LoRA on the original base, a full fine-tune's head.
_ADAPTER_BASE_KEYS = {"method": str, "quantization": str, "trained_rank": int, "head": str}


def read_adapter_base(adapter_dir: Path) -> dict:
    """The ADAPTER_BASE record beside a run's trained weights ({} for a plain peft adapter), checked."""
    path = Path(adapter_dir) / ADAPTER_BASE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TasktuneError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(record, dict):
        raise TasktuneError(f"{path}: expected a JSON object, got {type(record).__name__}")
    for key, value in record.items():
        expected = _ADAPTER_BASE_KEYS.get(key)
        if expected is None or type(value) is not expected:
            raise TasktuneError(f"{path}: key {key!r} is not one of {sorted(_ADAPTER_BASE_KEYS)} with its type "
                                f"(got {value!r})")
    writers = [m.name for m in METHODS.values() if m.records_its_base]
    checks = {"quantization": ("nf4",), "method": writers, "head": ("causal_lm", "seqcls")}
    for key, allowed in checks.items():
        if key in record and record[key] not in allowed:
            raise TasktuneError(f"{path}: {key} must be one of {list(allowed)}, got {record[key]!r}")
    if names_whole_model(record) and "head" not in record:
        raise TasktuneError(f"{path}: a full fine-tune's record needs its head (causal_lm or seqcls)")
    return record


def adapter_base_quantization(adapter_dir: Path) -> str | None:
    """How the adapter's base was quantized for training (`nf4` for QLoRA), else None."""
    return read_adapter_base(adapter_dir).get("quantization")


def _adapter_config(adapter_dir: Path) -> dict:
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise TasktuneError(f"{adapter_dir} is not an adapter directory (no adapter_config.json, and no "
                            f"{ADAPTER_BASE} of a full fine-tune)")
    return json.loads(path.read_text())


def saved_method(adapter_dir: Path) -> Method:
    """The method whose weights `adapter_dir` holds: the one its ADAPTER_BASE record names (QLoRA's records
    before commit bdb1bbc name only the quantization); a plain peft adapter is told by its config (IA3, or the
    LoRA variant whose options it carries)."""
    record = read_adapter_base(adapter_dir)
    if "method" in record:
        return METHODS[record["method"]]
    if record.get("quantization"):
        return next(m for m in METHODS.values() if m.quantization == record["quantization"])
    config = _adapter_config(adapter_dir)
    if config.get("peft_type") == "IA3":
        return next(m for m in METHODS.values() if isinstance(m, IA3))
    variants = [m for m in METHODS.values() if isinstance(m, LoraFamily) and not m.records_its_base
                and all(config.get(k) == v for k, v in m.lora_options.items())]
    return max(variants, key=lambda m: len(m.lora_options))  # the most specific: DoRA's use_dora over LoRA


def names_whole_model(record: dict) -> bool:
    """An ADAPTER_BASE record of a method saved as the whole fine-tuned model (`full`), not a peft adapter."""
    named = METHODS.get(record.get("method"))
    return bool(named and named.whole_model)


def saves_whole_model(adapter_dir: Path) -> bool:
    """adapter/ holds the whole fine-tuned model (`full`), not a peft adapter."""
    return names_whole_model(read_adapter_base(adapter_dir))


def adapter_head(adapter_dir: Path, record: dict | None = None) -> str:
    """`seqcls` for an adapter saved with a classification head, else `causal_lm` (`record`: its ADAPTER_BASE
    record, when the caller has read it already)."""
    record = read_adapter_base(adapter_dir) if record is None else record
    if names_whole_model(record):
        if not (Path(adapter_dir) / FULL_WEIGHTS).is_file():
            raise TasktuneError(f"{adapter_dir} is a full fine-tune without its weights ({FULL_WEIGHTS})")
        return record["head"]
    return "seqcls" if _adapter_config(adapter_dir).get("task_type") == "SEQ_CLS" else "causal_lm"


def analyse_saved(base_path: str, adapter_dir: Path, rank_tol: float = 1e-6) -> dict:
    """params.json's analysis of a run's saved weights, by the method that saved them."""
    return saved_method(adapter_dir).analyse(base_path, adapter_dir, rank_tol)
