"""The recipes that ship inside the package (`tasktune recipes`, `tasktune recipes cp NAME DEST`), so that a
wheel install has them as well as a clone. A recipe is named by its file name without `.yaml`; the accelerate
launcher configs are under `accelerate/`."""

from __future__ import annotations

from pathlib import Path

from tasktune.errors import TasktuneError

RECIPES_DIR = Path(__file__).parent


def shipped() -> dict[str, Path]:
    """{name: file} of every shipped recipe and accelerate config."""
    return {str(p.relative_to(RECIPES_DIR).with_suffix("")): p for p in sorted(RECIPES_DIR.rglob("*.yaml"))}


def describe(path: Path) -> str:
    """The first comment line of a recipe, which says what it is for."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def find(name: str) -> Path | None:
    """A shipped recipe by name (with or without `.yaml`), or None."""
    return shipped().get(name.removesuffix(".yaml"))


def _same_model(a: str, b: str) -> bool:
    from tasktune.models import KNOWN_MODELS

    ids = {name: (KNOWN_MODELS[name].hub_id if name in KNOWN_MODELS else name) for name in (a, b)}
    return ids[a] == ids[b]


def _candidates(task: str) -> list[tuple[str, Path, dict]]:
    """(name, file, parsed) of the shipped recipes for `task`, in name order."""
    import yaml

    found = []
    for name, path in shipped().items():
        if "/" in name:  # accelerate configs
            continue
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if data.get("task") == task:
            found.append((name, path, data))
    return found


def _fits(need: float | None, gpu_gib: float | None) -> bool:
    return gpu_gib is None or need is None or need <= gpu_gib


def _for_model(task: str, model: str) -> list[tuple[str, Path, dict]]:
    """The shipped recipes for this task and model, the most demanding first (the recipe as designed, then its
    -16gb variant)."""
    same = [c for c in _candidates(task) if _same_model(str(c[2].get("model", "")), model)]
    return sorted(same, key=lambda c: -(c[2].get("gpu_memory_gib") or float("inf")))


def default_for(task: str, model: str, gpu_gib: float | None = None) -> Path | None:
    """The shipped recipe for `tasktune run --task T --model M`: of those for this task and model, the most
    demanding whose `gpu_memory_gib` fits this GPU (`gpu_gib`; None: no GPU, no check), else the most
    demanding (the run's own check then says what fits); else the task's CPU recipe on a machine without CUDA
    and its first GPU recipe on one with it; None when no shipped recipe trains this task (then the recipe
    defaults apply)."""
    same = _for_model(task, model)
    for _, path, data in same:
        if _fits(data.get("gpu_memory_gib"), gpu_gib):
            return path
    if same:
        return same[0][1]  # none fits: the run's own check names the problem in one line
    candidates = _candidates(task)
    for name, path, _ in candidates:
        if name.endswith("-cpu") != (gpu_gib is not None):
            return path
    return candidates[0][1] if candidates else None


def check_gpu_fits(recipe, gpu_gib: float | None) -> None:
    """A recipe whose training cannot fit this GPU stops here, before any model loads, in one line that names
    what would fit: a shipped recipe for the same task and model, or the change to make. The need is estimated
    from the recipe as given (`gpu_memory.estimate_recipe`); where the model's config cannot be read, the
    recipe's stated `gpu_memory_gib` stands in."""
    from tasktune.gpu_memory import estimate_recipe

    if gpu_gib is None or not recipe.gpu_memory_check:
        return
    estimate = estimate_recipe(recipe)
    need = estimate.total_gib if estimate is not None else recipe.gpu_memory_gib
    if _fits(need, gpu_gib):
        return
    shown = estimate.describe() if estimate is not None else f"{need:g} GiB (gpu_memory_gib)"
    cfg = recipe.train
    given = (f"method {cfg.method}, batch {cfg.batch_size}, max_length {cfg.max_length}, gradient checkpointing "
             f"{'on' if cfg.gradient_checkpointing else 'off'}, dtype {recipe.dtype}")
    raise TasktuneError(f"recipe {recipe.name} ({given}): training needs about {shown}, this GPU has "
                        f"{gpu_gib:.1f} GiB: {_what_fits(recipe, gpu_gib)}; gpu_memory_check=false skips this check")


def _what_fits(recipe, gpu_gib: float) -> str:
    """The advice of a refused fit check: a shipped recipe that fits, else the smallest change that does."""
    import copy

    from tasktune.gpu_memory import estimate_recipe

    fitting = [name for name, _, data in _for_model(recipe.task, recipe.model)
               if name != recipe.name and data.get("gpu_memory_gib") is not None
               and _fits(data["gpu_memory_gib"], gpu_gib)]
    if fitting:
        return f"run the shipped recipe {fitting[0]} instead"
    changed = copy.deepcopy(recipe)
    steps = []
    if not changed.train.gradient_checkpointing:
        changed.train.gradient_checkpointing = True
        steps.append("train.gradient_checkpointing=true")
    while True:
        estimate = estimate_recipe(changed)
        if estimate is None:
            break
        if estimate.total_gib <= gpu_gib:
            return f"{' '.join(steps)} fits (about {estimate.total_gib:.1f} GiB)"
        if changed.train.batch_size == 1:
            break
        changed.train.batch_size //= 2
        changed.train.grad_accum *= 2
        steps = [s for s in steps if not s.startswith(("train.batch_size", "train.grad_accum"))]
        steps += [f"train.batch_size={changed.train.batch_size}", f"train.grad_accum={changed.train.grad_accum}"]
    return ("even batch 1 with gradient checkpointing does not fit: use a smaller train.max_length, "
            "train.method=qlora, or a larger GPU")


def copy(name: str, dest: str) -> Path:
    """Copy a shipped recipe to `dest` (a file, or an existing directory); never replaces a file."""
    source = find(name)
    if source is None:
        raise TasktuneError(f"no shipped recipe {name!r} (expected one of {sorted(shipped())}; see `tasktune recipes`)")
    target = Path(dest)
    if target.is_dir():
        target = target / source.name
    if target.exists() or target.is_symlink():
        raise TasktuneError(f"{target} already exists; choose another destination")
    from tasktune.atomic import write_bytes

    write_bytes(target, source.read_bytes())  # atomic, mode 0644
    return target


SWEEPS_DIR = RECIPES_DIR.parent / "sweeps"


def shipped_sweeps() -> dict[str, Path]:
    """{name: file} of every shipped sweep (`tasktune sweeps`)."""
    return {p.stem: p for p in sorted(SWEEPS_DIR.glob("*.yaml"))}


def find_sweep(name: str) -> Path | None:
    return shipped_sweeps().get(name.removesuffix(".yaml"))


def copy_sweep(name: str, dest: str) -> Path:
    """Copy a shipped sweep to `dest` to edit it; never replaces a file."""
    from tasktune.atomic import write_bytes

    source = find_sweep(name)
    if source is None:
        raise TasktuneError(f"no shipped sweep {name!r} (expected one of {sorted(shipped_sweeps())}; see "
                            "`tasktune sweeps`)")
    target = Path(dest)
    if target.is_dir():
        target = target / source.name
    if target.exists() or target.is_symlink():
        raise TasktuneError(f"{target} already exists; choose another destination")
    write_bytes(target, source.read_bytes())
    return target
