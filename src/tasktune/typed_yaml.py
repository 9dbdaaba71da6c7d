"""YAML files read as typed data: recipes, task specs and sweep files (a leaf: config and tasks both use it).

Read safely (data, never code), without aliases, capped in size; mappings become dataclasses whose unknown keys
and wrong types are one-line errors naming the file."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import fields
from pathlib import Path

import yaml

from tasktune.errors import TasktuneError


def _coerce(value, annotation, key: str, source: str):
    """Convert a YAML value to the field's type, or explain what was expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())) and type(None) in args:
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise TasktuneError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TasktuneError(f"{source}: {key} must be a mapping, got {value!r}")
        return {_coerce(k, args[0], f"{key} key", source): _coerce(v, args[1], f"{key}.{k}", source)
                for k, v in value.items()}
    if dataclasses.is_dataclass(annotation):
        return build_dataclass(annotation, value, f"{key}.", source)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TasktuneError(f"{source}: {key} must be true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TasktuneError(f"{source}: {key} must be a number, got {value!r}")
        try:
            number = float(value) if annotation is float else int(value)
        except ValueError as exc:
            raise TasktuneError(f"{source}: {key} must be {annotation.__name__}, got {value!r}") from exc
        if annotation is int and isinstance(value, float) and not value.is_integer():
            raise TasktuneError(f"{source}: {key} must be an integer, got {value!r}")
        return number
    if annotation is str:
        if value is None or isinstance(value, (dict, list)):
            raise TasktuneError(f"{source}: {key} must be a string, got {value!r}")
        return str(value)
    return value


def build_dataclass(cls, data: dict, prefix: str, source: str):
    """A dataclass from a YAML mapping: unknown keys and wrong types are one-line errors naming `source`."""
    if not isinstance(data, dict):
        raise TasktuneError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise TasktuneError(f"{source}: unknown key(s) {[prefix + k for k in unknown]} "
                            f"(expected one of {sorted(prefix + k for k in known)})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, value or {}, f"{prefix}{name}.", source)
        else:
            kwargs[name] = _coerce(value, hint, prefix + name, source)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise TasktuneError(f"{source}: {exc}") from exc


MAX_YAML_BYTES = 1 << 20  # no real recipe or task spec comes near 1 MiB (the shipped ones are ~1-3 KiB)


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without aliases: `*name` can expand a 600-byte file into gigabytes (nested references), and
    no recipe or spec needs one."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in tasktune files",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """A key given twice is refused: PyYAML keeps the last one, silently dropping a whole section (a second
        `train:` replaces the first)."""
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1}): give each key once",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def yaml_error_line(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: where, and what (PyYAML's own text spans several lines with a snippet)."""
    mark = getattr(exc, "problem_mark", None)
    problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def read_yaml_text(path: Path, what: str) -> str:
    """A YAML file's text, at most MAX_YAML_BYTES, decoded as UTF-8 without newline translation (so its
    sha256 is the file's)."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise TasktuneError(f"{path}: {size:,} bytes; a {what} file is expected to be under {MAX_YAML_BYTES:,}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TasktuneError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def parse_yaml_mapping(text: str, what: str, where: str) -> dict:
    """YAML text that must hold a mapping (a recipe, a task spec), read safely: data, never code; no aliases."""
    try:
        loaded = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (safe loader)
    except yaml.YAMLError as exc:
        raise TasktuneError(f"{where}: not valid YAML for a {what} ({yaml_error_line(exc)})") from exc
    if not isinstance(loaded, dict):
        raise TasktuneError(f"{where}: expected a mapping of {what} keys, got {type(loaded).__name__}")
    return loaded


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping, read with `read_yaml_text` and `parse_yaml_mapping`."""
    return parse_yaml_mapping(read_yaml_text(path, what), what, str(path))
