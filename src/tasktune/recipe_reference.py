"""docs/recipe-reference.md, generated from the recipe dataclasses (`tasktune recipe-reference`): every key
with its type, default, allowed values and meaning. A test fails when the file is stale."""

from __future__ import annotations

import dataclasses
import json
import typing

from tasktune import config


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "")
    return {"<class 'str'>": "str", "<class 'int'>": "int", "<class 'float'>": "float",
            "<class 'bool'>": "bool"}.get(text, text)


def _default(f: dataclasses.Field) -> str:
    if f.metadata.get("required"):
        return "required"
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return "unset" if value is None else f"`{json.dumps(value)}`"


def _allowed(name: str) -> str:
    if name in config.CHOICES:
        return ", ".join(f"`{c}`" for c in config.CHOICES[name])
    if name == "protocols":
        return ", ".join(f"`{p}`" for p in config.PROTOCOLS)
    if name == "gguf":
        from tasktune.gguf_export import GGUF_TYPES

        return ", ".join(f"`{t}`" for t in GGUF_TYPES)
    if name == "report_to":
        return "`none`, " + ", ".join(f"`{n}`" for n in config.LOGGERS)
    if name in config.POSITIVE:
        return "> 0"
    if name in config.NON_NEGATIVE:
        return ">= 0"
    if name in config.UNIT_INTERVAL:
        low, high = config.UNIT_INTERVAL[name]
        return f"[{low:g}, {high:g})"
    if name in config.CLOSED_UNIT_INTERVAL:
        return "[0, 1]"
    return ""


def rows(cls, prefix: str = "") -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, allowed, meaning) of every leaf key of a recipe dataclass."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += rows(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, _type_name(hints[f.name]), _default(f), _allowed(f.name),
                        f.metadata.get("help", "")))
    return out


def render() -> str:
    lines = ["# Recipe reference", "",
             "Every key a recipe (YAML) may hold, generated from `src/tasktune/config.py` by "
             "`tasktune recipe-reference --out docs/recipe-reference.md`; do not edit by hand. Override any key on "
             "the command line as `section.key=value` (`train.learning_rate=1e-4`); "
             "`tasktune run RECIPE --print-config` prints the resolved recipe.", "",
             "| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for key, kind, default, allowed, meaning in rows(config.Recipe):
        cells = [f"`{key}`", f"`{kind}`", default, allowed, meaning]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
