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


def default_for(task: str, model: str, cuda: bool) -> Path | None:
    """The shipped recipe for `tasktune run --task T --model M`: the one for this task and model if it exists,
    else the task's CPU recipe on a machine without CUDA and its first GPU recipe on one with it; None when no
    shipped recipe trains this task (then the recipe defaults apply)."""
    import yaml

    from tasktune.models import KNOWN_MODELS

    def same_model(a: str, b: str) -> bool:
        ids = {name: (KNOWN_MODELS[name].hub_id if name in KNOWN_MODELS else name) for name in (a, b)}
        return ids[a] == ids[b]

    candidates = []
    for name, path in shipped().items():
        if "/" in name:  # accelerate configs
            continue
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if data.get("task") == task:
            candidates.append((name, path, str(data.get("model", ""))))
    for _, path, recipe_model in candidates:
        if same_model(recipe_model, model):
            return path
    for name, path, _ in candidates:
        if name.endswith("-cpu") != cuda:
            return path
    return candidates[0][1] if candidates else None


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
