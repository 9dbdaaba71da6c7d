"""What changed: parameter counts and per-module update statistics (LoRA family, IA3, full fine-tuning), computed
by streaming.

Only one base weight and one LoRA pair are in memory at a time, so this runs on a 1B+ model on a small
machine. ΔW = B·A·scale is never formed densely for its statistics: with QR factors B = Q_b R_b and
Aᵀ = Q_a R_a, ΔW = Q_b (R_b R_aᵀ) Q_aᵀ · scale has the singular values of the r×r core R_b R_aᵀ · scale.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from tasktune.errors import TasktuneError
from tasktune.run_layout import FULL_WEIGHTS

LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")
IA3_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.ia3_l(?:\.default)?$")
LAYER = re.compile(r"\.layers\.(\d+)\.")


def weight_files(model_path: str) -> list[Path]:
    """The safetensors files of a local model directory or of a hub model already in the local cache."""
    path = Path(model_path)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(model_path, allow_patterns=["*.safetensors", "*.json"],
                                          local_files_only=True))
        except Exception as exc:  # not in the cache
            raise TasktuneError(f"base weights of {model_path!r} are not available locally: {exc}") from exc
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise TasktuneError(f"{path} has no .safetensors weights (tasktune reads weights only from safetensors)")
    return files


class BaseWeights:
    """Name → tensor access across safetensors shards, one tensor at a time."""

    def __init__(self, model_path: str):
        self.location = {}
        for file in weight_files(model_path):
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    self.location[key] = file

    def find(self, module: str) -> str:
        """The stored name of `module`'s weight (prefixes differ between model classes)."""
        for candidate in (f"{module}.weight", f"model.{module}.weight", module.split(".", 1)[-1] + ".weight"):
            if candidate in self.location:
                return candidate
        suffix = module.split("model.", 1)[-1] + ".weight"
        matches = [k for k in self.location if k.endswith(suffix)]
        if len(matches) == 1:
            return matches[0]
        raise TasktuneError(f"base weight for LoRA module {module!r} not found in the base model's safetensors")

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.location[name], framework="pt") as f:
            return f.get_tensor(name)

    def numel(self) -> int:
        total = 0
        for file in sorted(set(self.location.values())):
            with safe_open(file, framework="pt") as f:
                total += sum(_prod(f.get_slice(key).get_shape()) for key in f.keys())
        return total


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def lora_pairs(adapter_dir: Path) -> tuple[dict, dict]:
    """{module: (A, B)} from the saved adapter, and the adapter config."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    pairs: dict = defaultdict(dict)
    extra = {}
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as f:
        for key in f.keys():
            m = LORA_KEY.match(key)
            if m:
                pairs[m["module"]][m["which"]] = f.get_tensor(key).float()
            else:
                extra[key] = _prod(f.get_slice(key).get_shape())
    return {k: (v["A"], v["B"]) for k, v in pairs.items()}, {"config": config, "other_tensors": extra}


def update_stats(A: torch.Tensor, B: torch.Tensor, scale: float, W: torch.Tensor, rank_tol: float = 1e-6) -> dict:
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.double().T)
    singular = torch.linalg.svdvals(rb @ ra.T) * scale
    delta_norm = float(torch.linalg.vector_norm(singular))
    w_norm = float(torch.linalg.vector_norm(W.double()))
    top = float(singular.max()) if singular.numel() else 0.0
    return {"delta_fro": delta_norm, "weight_fro": w_norm, "relative": delta_norm / w_norm if w_norm else 0.0,
            "effective_rank": int((singular > rank_tol * max(top, 1e-30)).sum()) if top > 0 else 0,
            "top_singular_values": [round(float(s), 6) for s in singular[:4]]}


def module_type(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def _layer_order(module: str) -> tuple:
    return int(LAYER.search(module)[1]) if LAYER.search(module) else -1, module


def _by_type(modules: list[dict]) -> dict:
    by_type: dict = defaultdict(list)
    for m in modules:
        by_type[m["type"]].append(m["relative"])
    return {t: {"mean_relative": sum(v) / len(v), "max_relative": max(v), "modules": len(v)}
            for t, v in sorted(by_type.items())}


def analyse_lora(base_path: str, adapter_dir: Path, method, record: dict, rank_tol: float = 1e-6) -> dict:
    """`method`: the LoRA-family method that saved the adapter (`methods.LoraFamily`); `record`: its
    ADAPTER_BASE record."""
    pairs, meta = lora_pairs(adapter_dir)
    cfg = meta["config"]
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    base = BaseWeights(base_path)
    modules, formula, counted = [], 0, 0
    for module in sorted(pairs, key=_layer_order):
        A, B = pairs[module]
        W = base.get(base.find(module)).float()
        if W.shape != (B.shape[0], A.shape[1]):
            raise TasktuneError(f"LoRA shapes of {module} ({tuple(B.shape)}·{tuple(A.shape)}) do not match the base "
                                f"weight {tuple(W.shape)}: adapter and base model differ")
        formula += r * (W.shape[0] + W.shape[1])
        counted += A.numel() + B.numel()
        layer = LAYER.search(module)
        modules.append({"module": module, "type": module_type(module), "layer": int(layer[1]) if layer else None,
                        "shape": list(W.shape), **update_stats(A, B, scale, W, rank_tol)})
        del W
    if formula != counted:
        raise TasktuneError(f"LoRA parameter count {counted} differs from r×(in+out) = {formula}")
    # DoRA: one magnitude vector per target, as long as its output features.
    magnitudes = sum(n for key, n in meta["other_tensors"].items() if "lora_magnitude_vector" in key)
    expected_magnitudes = sum(m["shape"][0] for m in modules) if cfg.get("use_dora") else 0
    if magnitudes != expected_magnitudes:
        raise TasktuneError(f"DoRA magnitude parameters {magnitudes} differ from the sum of output features "
                            f"{expected_magnitudes}")
    extra = sum(meta["other_tensors"].values()) - magnitudes
    trained_rank = record.get("trained_rank", r)
    stored = counted + magnitudes
    converted = method.saved_as_difference
    if converted:  # saved as plain LoRA: rank 2r holds B·A − B₀·A₀; r×(in+out) were trained
        if r != 2 * trained_rank:
            raise TasktuneError(f"{adapter_dir}: a converted PiSSA adapter has rank 2×{trained_rank}, found {r}")
        counted, formula = counted // 2, formula // 2
    return {
        "adapter": {"method": method.name, "r": trained_rank, "alpha": alpha / 2 if converted else alpha,
                    "scale": scale, "target_modules": sorted({m["type"] for m in modules}),
                    "modules": len(modules), "parameters": counted + magnitudes, "formula": formula + magnitudes,
                    "formula_text": "r×(in+out)" + (" + out per target (DoRA magnitudes)" if magnitudes else ""),
                    "formula_matches": formula == counted and magnitudes == expected_magnitudes,
                    "magnitude_parameters": magnitudes, "other_trainable": extra, "stored_parameters": stored,
                    "settings": f"r={trained_rank}, alpha={alpha / 2 if converted else alpha:g} (scale "
                                f"{scale:.3g})" + ("; saved converted to plain LoRA of rank "
                                                   f"{r} on the original base" if converted else "")},
        "by_type": _by_type(modules),
        "modules": modules,
    }


def analyse_ia3(base_path: str, adapter_dir: Path, cfg: dict, method_name: str) -> dict:
    """IA3 multiplies a target's weight by a learned vector: its output rows (l of shape out×1) or, for a
    feedforward module, its input columns (1×in). ΔW = W ⊙ (l − 1), exactly, from the vector and the base."""
    scales, extra = {}, {}
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as f:
        for key in f.keys():
            m = IA3_KEY.match(key)
            if m:
                scales[m["module"]] = f.get_tensor(key).double()
            else:
                extra[key] = _prod(f.get_slice(key).get_shape())
    feedforward = set(cfg.get("feedforward_modules") or [])
    base = BaseWeights(base_path)
    modules, formula, counted = [], 0, 0
    for module in sorted(scales, key=_layer_order):
        scale, W = scales[module], base.get(base.find(module)).double()
        is_ff = module_type(module) in feedforward or any(module.endswith(f) for f in feedforward)
        expected = (1, W.shape[1]) if is_ff else (W.shape[0], 1)
        if tuple(scale.shape) != expected:
            raise TasktuneError(f"IA3 vector of {module} has shape {tuple(scale.shape)}, expected {expected} for its "
                                f"base weight {tuple(W.shape)}: adapter and base model differ")
        formula += W.shape[1] if is_ff else W.shape[0]
        counted += scale.numel()
        delta = float(torch.linalg.vector_norm(W * (scale - 1)))
        w_norm = float(torch.linalg.vector_norm(W))
        layer = LAYER.search(module)
        modules.append({"module": module, "type": module_type(module), "layer": int(layer[1]) if layer else None,
                        "shape": list(W.shape), "scaled": "input" if is_ff else "output", "delta_fro": delta,
                        "weight_fro": w_norm, "relative": delta / w_norm if w_norm else 0.0,
                        "scale_min": float(scale.min()), "scale_max": float(scale.max())})
        del W
    return {
        "adapter": {"method": method_name, "target_modules": sorted({m["type"] for m in modules}),
                    "feedforward_modules": sorted(feedforward), "modules": len(modules), "parameters": counted,
                    "formula": formula, "formula_text": "out per target (in for feedforward targets)",
                    "formula_matches": formula == counted, "magnitude_parameters": 0,
                    "other_trainable": sum(extra.values()), "settings": "one scale vector per target"},
        "by_type": _by_type(modules),
        "modules": modules,
    }


def analyse_full(base_path: str, adapter_dir: Path, method_name: str) -> dict:
    """A full fine-tune: ΔW = W_tuned − W_base for every stored tensor, one pair in memory at a time. The count
    check: the fine-tune trained as many parameters as the base stores (plus a fresh classification head)."""
    base = BaseWeights(base_path)

    def base_name(key: str) -> str | None:
        if key in base.location:
            return key
        candidates = [key[: -len(".weight")]] if key.endswith(".weight") else []
        if key.endswith("lm_head.weight"):  # tied to the input embeddings: stored once, maybe under this name
            candidates.append("embed_tokens")
        for module in candidates:
            try:
                return base.find(module)
            except TasktuneError:
                continue
        return None

    modules, counted, fresh = [], 0, 0
    with safe_open(Path(adapter_dir) / FULL_WEIGHTS, framework="pt") as f:
        for key in sorted(f.keys(), key=_layer_order):
            tuned = f.get_tensor(key).float()  # fp32, not double: Gemma-2-2B's embeddings are 590M numbers
            counted += tuned.numel()
            name = base_name(key)
            if name is None:  # a fresh classification head: no base weight to compare with
                fresh += tuned.numel()
                continue
            W = base.get(name).float()
            if W.shape != tuned.shape:
                raise TasktuneError(f"{key} has shape {tuple(tuned.shape)} in the fine-tune, {tuple(W.shape)} in the "
                                    "base: fine-tune and base model differ")
            module = key[: -len(".weight")] if key.endswith(".weight") else key
            delta, w_norm = float(torch.linalg.vector_norm(tuned - W)), float(torch.linalg.vector_norm(W))
            layer = LAYER.search(module + ".")
            modules.append({"module": module, "type": module_type(module) if key.endswith(".weight") else
                            f"{module_type(module.rsplit('.', 1)[0])}.{module_type(module)}",
                            "layer": int(layer[1]) if layer else None, "shape": list(W.shape), "delta_fro": delta,
                            "weight_fro": w_norm, "relative": delta / w_norm if w_norm else 0.0})
            del W, tuned
    formula = base.numel() + fresh
    return {
        "adapter": {"method": method_name, "target_modules": sorted({m["type"] for m in modules}), "modules": len(modules),
                    "parameters": counted, "formula": formula, "formula_text": "every weight of the base"
                    + (" + the fresh classification head" if fresh else ""), "formula_matches": formula == counted,
                    "magnitude_parameters": 0, "other_trainable": fresh, "stored_parameters": counted,
                    "settings": "every weight"},
        "by_type": _by_type(modules),
        "modules": modules,
    }


def frozen_check(model: torch.nn.Module, base_path: str, changed_modules: set[str],
                 reference: dict[str, torch.Tensor] | None = None) -> dict:
    """Hash every weight of `model` (after merging) against the base: only adapter targets may differ.
    `reference`: the base's state dict to compare with instead of its safetensors (QLoRA's dequantized base)."""
    base = BaseWeights(base_path)
    identical, changed, unexpected = 0, [], []
    for name, param in model.state_dict().items():
        if reference is not None:
            if name not in reference:
                continue
            ref = reference[name].to(param.dtype)
        else:
            try:
                stored = base.find(name[: -len(".weight")] if name.endswith(".weight") else name)
            except TasktuneError:
                continue  # e.g. a fresh classification head
            ref = base.get(stored).to(param.dtype)
        same = tensor_hash(ref) == tensor_hash(param)
        module = name.rsplit(".", 1)[0]
        is_target = any(module.endswith(m.split("model.", 1)[-1]) for m in changed_modules)
        if same:
            identical += 1
        elif is_target:
            changed.append(name)
        else:
            unexpected.append(name)
    return {"identical": identical, "changed": len(changed), "unexpected_changes": unexpected}
