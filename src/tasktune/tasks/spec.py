"""A task declared as data: one YAML file says what the data looks like, how a prompt is built, which words
stand for the labels, and how the result is judged. `tasks/sst2.yaml` and `tasks/squad_v2.yaml` ship with
tasktune; a recipe's `task:` names one of them or a path to a user's spec (`tasktune tasks show sst2` prints one
to copy). A spec is data, never code: it is read with `yaml.safe_load`, its templates take named fields only,
and nothing in it names an import or a callable. Every mistake is a one-line error before any model loads.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from tasktune.errors import TasktuneError
from tasktune.prompt_template import template_fields

TASKS_DIR = Path(__file__).parent


@dataclass
class LabelSpec:
    name: str                      # the label as reports show it
    verbalizer: str                # the words that stand for it after the prompt (" positive"); may be several tokens
    values: list[str] = field(default_factory=list)  # how the data writes it (case-insensitive); default: [name]


@dataclass
class DataSpec:
    files: list[str] = field(default_factory=list)   # file names looked for in a data directory, in order
    text_column: list[str] = field(default_factory=lambda: ["text"])    # candidates, first present wins
    label_column: list[str] = field(default_factory=lambda: ["label"])  # classification only
    # extractive_qa: the data's field for each of id, title, context, question, answers, is_impossible where its
    # name differs (JSONL and hub rows), e.g. {context: passage, question: query}
    columns: dict[str, str] = field(default_factory=dict)
    hub: str | None = None          # Hugging Face dataset id (used when no file is found; named in model cards)
    hub_config: str | None = None
    hub_split: str = "train"
    embedded: bool = False          # a copy ships in tasktune/data/embedded/<task name>/


@dataclass
class TaskSpec:
    name: str
    type: str                       # classification | extractive_qa | multiple_choice | generation, or a plug-in
    description: str = ""
    template: str = ""              # str.format-style, named fields only: {text}, or any column of the data
    labels: list[LabelSpec] = field(default_factory=list)  # classification: two or more
    abstain_word: str = "unanswerable"  # extractive_qa: what the model says for an unanswerable question
    max_new_tokens: int = 0         # generate protocol; 0: the type's default (the longest verbalizer plus one token)
    stop: list[str] = field(default_factory=list)     # generation: texts that end an answer (besides the EOS token)
    metrics: list[str] = field(default_factory=list)  # generation: exact, contains, regex, json_fields, chrf, ...
    regex: str = ""                 # generation, metric regex: the pattern whose first group is compared
    split_by: str | None = None     # default split policy (see SPLITS)
    headline: str = ""              # the metric a report leads with
    data: DataSpec = field(default_factory=DataSpec)
    source: str = ""                # where the spec was read from (filled in by `load_spec`)
    text: str = ""                  # the file as read (filled in by `load_spec`): runs record this, not the path

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def validate(spec: TaskSpec) -> TaskSpec:
    from tasktune.tasks.base import task_type

    where = spec.source
    kind = task_type(spec.type, where)  # the registry of task types (tasks/base.py)
    if not spec.name.replace("-", "_").isidentifier():
        raise TasktuneError(f"{where}: name {spec.name!r} must be letters, digits, '_' or '-'")
    if not spec.template.strip():
        raise TasktuneError(f"{where}: template is empty (expected a prompt such as \"{{text}}\\nAnswer:\")")
    fields = template_fields(spec.template, where)
    if not fields:
        raise TasktuneError(f"{where}: template has no field, so every prompt would be the same")
    if spec.split_by is not None and spec.split_by not in kind.split_policies:
        raise TasktuneError(f"{where}: split_by {spec.split_by!r} does not apply to type {spec.type!r} "
                            f"(expected one of {list(kind.split_policies)})")
    kind.check_spec(spec)
    return spec


def check_verbalizers(verbalizers: list[str], where: str) -> None:
    if any(not v.strip() for v in verbalizers):
        raise TasktuneError(f"{where}: verbalizers {verbalizers} must be non-empty words")
    if len({v.strip().lower() for v in verbalizers}) != len(verbalizers):
        raise TasktuneError(f"{where}: verbalizers {verbalizers} are not different words")
    words = [v.strip().lower().split() for v in verbalizers]
    for i, a in enumerate(words):
        for j, b in enumerate(words):
            if i != j and b[: len(a)] == a:  # the generate protocol reads the first words: one must not prefix another
                raise TasktuneError(f"{where}: verbalizer {verbalizers[i]!r} is the start of {verbalizers[j]!r}; a "
                                    "generated answer could not tell them apart")


def shipped() -> dict[str, Path]:
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.yaml"))}


_PARSED: dict[str, dict] = {}  # sha256 of a spec's text -> its YAML mapping: a run parses each spec once


def load_spec(name_or_path: str) -> TaskSpec:
    """A shipped task by name, or a spec file by path. The file is read once per call and parsed once per
    content in a process (the recipe check, the run, its report and its controls all ask for it)."""
    from tasktune.typed_yaml import build_dataclass, parse_yaml_mapping, read_yaml_text

    path = shipped().get(name_or_path) or Path(name_or_path).expanduser()
    if not path.is_file():
        raise TasktuneError(f"task {name_or_path!r} is neither a shipped task ({sorted(shipped())}) nor a spec file")
    text = read_yaml_text(path, "task")
    key = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if key not in _PARSED:
        _PARSED[key] = parse_yaml_mapping(text, "task", str(path))
    data = copy.deepcopy(_PARSED[key])
    for name in ("name", "type"):
        if name not in data:
            raise TasktuneError(f"{path}: missing {name!r} (a task spec needs name, type and template)")
    spec = build_dataclass(TaskSpec, {**data, "source": str(path), "text": text}, "", str(path))
    return validate(spec)
