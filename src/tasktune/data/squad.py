"""SQuAD-format questions (SQuAD v2 and any dataset in its layout) from the official JSON, JSONL, or the hub.

Each question becomes `{"id", "title", "context", "question", "answers": [text, ...], "answer_starts",
"is_impossible"}`; `answers` is empty for unanswerable questions. A directory pools every `*.json` /
`*.jsonl` file in it (official train and dev parts alike), then the split decides what is test.

JSONL rows and hub rows are flat records; a spec whose data names its fields otherwise maps them with
`data.columns` (`{context: passage, question: query, ...}`). The official JSON layout is SQuAD's own and
keeps its names.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasktune.data import format_suffix, hub, read_text, resolve
from tasktune.errors import TasktuneError

def _require(obj, key, kind, where):
    if not isinstance(obj, dict) or key not in obj:
        raise TasktuneError(f"{where}: missing {key!r} (expected the official SQuAD v2 layout "
                            "data[].paragraphs[].qas[])")
    value = obj[key]
    if not isinstance(value, kind):
        raise TasktuneError(f"{where}: {key!r} must be {kind.__name__}, got {type(value).__name__}")
    return value


def _impossible(obj: dict, default: bool, where: str) -> bool:
    """`is_impossible` as the official data writes it: a JSON boolean (a string such as "false" is refused,
    since `bool("false")` would silently make every question unanswerable)."""
    value = obj.get("is_impossible", default)
    if not isinstance(value, bool):
        raise TasktuneError(f"{where}: 'is_impossible' must be a JSON boolean (true or false), got {value!r}")
    return value


def _check_offsets(context: str, answers: list[str], starts: list, where: str) -> None:
    """Every answer must sit in the context where its `answer_start` says (the official data holds this). An
    offset of None means the format gave none (JSONL answers written as plain strings)."""
    if len(starts) != len(answers):
        raise TasktuneError(f"{where}: {len(answers)} answer text(s) but {len(starts)} answer_start value(s)")
    for text, start in zip(answers, starts):
        if not isinstance(text, str):
            raise TasktuneError(f"{where}: answer text must be a string, got {text!r}")
        if start is None:
            continue
        if isinstance(start, bool) or not isinstance(start, int):
            raise TasktuneError(f"{where}: answer_start must be an integer, got {start!r}")
        if not 0 <= start <= len(context) - len(text):
            raise TasktuneError(f"{where}: answer_start {start} puts {text!r} outside the context "
                                f"({len(context)} characters)")
        found = context[start:start + len(text)]
        if found != text:
            raise TasktuneError(f"{where}: the context at answer_start {start} reads {found!r}, not the answer "
                                f"text {text!r}")


def _question(qid, title, context, question, answers, starts, impossible, where) -> dict:
    if not question.strip():
        raise TasktuneError(f"{where}: empty question")
    if not context.strip():
        raise TasktuneError(f"{where}: empty context")
    if not impossible and not answers:
        raise TasktuneError(f"{where}: answerable question (is_impossible false) has no answers")
    if impossible and answers:
        raise TasktuneError(f"{where}: is_impossible is true but the question has {len(answers)} answer(s); "
                            "unanswerable questions keep their candidates in plausible_answers")
    _check_offsets(context, answers, starts, where)
    return {"id": qid, "title": title, "context": context, "question": question.strip(),
            "answers": [] if impossible else answers, "answer_starts": [] if impossible else starts,
            "is_impossible": impossible}


def load_official(path: Path) -> list[dict]:
    try:
        doc = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise TasktuneError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from exc
    rows = []
    for a, article in enumerate(_require(doc, "data", list, str(path))):
        title = str(article.get("title", f"article-{a}")) if isinstance(article, dict) else ""
        for p, paragraph in enumerate(_require(article, "paragraphs", list, f"{path}, data[{a}]")):
            where_p = f"{path}, data[{a}].paragraphs[{p}]"
            context = _require(paragraph, "context", str, where_p)
            for q, qa in enumerate(_require(paragraph, "qas", list, where_p)):
                where_q = f"{where_p}.qas[{q}]"
                qid = _require(qa, "id", str, where_q)
                question = _require(qa, "question", str, where_q)
                impossible = _impossible(qa, False, f"{where_q} (id {qid})")
                answers = qa.get("answers", [])
                if not isinstance(answers, list) or not all(isinstance(x, dict) and isinstance(x.get("text"), str)
                                                            and "answer_start" in x for x in answers):
                    raise TasktuneError(f"{where_q} (id {qid}): 'answers' must be a list of {{text, answer_start}}")
                rows.append(_question(qid, title, context, question, [x["text"] for x in answers],
                                      [x["answer_start"] for x in answers], impossible,
                                      f"{where_q} (id {qid})"))
    return rows


def _jsonl_answers(obj, where) -> tuple[list[str], list[int]]:
    answers = obj.get("answers", [])
    if isinstance(answers, dict):  # the hub layout: {"text": [...], "answer_start": [...]}
        texts = answers.get("text", [])
        starts = answers.get("answer_start", [None] * len(texts) if isinstance(texts, list) else None)
        if not isinstance(texts, list) or not isinstance(starts, list):
            raise TasktuneError(f"{where}: 'answers' must be {{text: [...], answer_start: [...]}} (lists)")
        return list(texts), list(starts)
    if isinstance(answers, list):
        texts = [a.get("text") if isinstance(a, dict) else a for a in answers]
        if not all(isinstance(t, str) for t in texts):
            raise TasktuneError(f"{where}: 'answers' must hold strings or {{text, answer_start}} objects")
        return texts, [a.get("answer_start") if isinstance(a, dict) else None for a in answers]
    raise TasktuneError(f"{where}: 'answers' must be a list or {{text: [...]}}")


FIELDS = ("id", "title", "context", "question", "answers", "is_impossible")  # a flat record's fields


def renamed(obj: dict, columns: dict[str, str], where: str) -> dict:
    """A flat record with the spec's `data.columns` applied: each of FIELDS read from the column the spec
    names for it."""
    out = dict(obj)
    for name, column in columns.items():
        if column not in obj:
            raise TasktuneError(f"{where}: missing {column!r} (the task's data.columns.{name})")
        out[name] = obj[column]
    return out


def flat_question(obj, columns: dict[str, str], where: str) -> dict:
    """One question from a flat record (a JSONL line or a hub row)."""
    if not isinstance(obj, dict):
        raise TasktuneError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    obj = renamed(obj, columns, where)
    for key in ("id", "question", "context"):
        _require(obj, key, str, where)
    title = obj.get("title", "")
    if not isinstance(title, str):
        raise TasktuneError(f"{where}: 'title' must be a string, got {type(title).__name__}")
    texts, starts = _jsonl_answers(obj, where)
    impossible = _impossible(obj, not texts, f"{where} (id {obj['id']})")
    return _question(obj["id"], title, obj["context"], obj["question"], texts, starts, impossible,
                     f"{where} (id {obj['id']})")


def load_jsonl(path: Path, columns: dict[str, str] | None = None) -> list[dict]:
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TasktuneError(f"{where}: not valid JSON ({exc.msg})") from exc
        rows.append(flat_question(obj, columns or {}, where))
    return rows


def hub_questions(ds, name: str, columns: dict[str, str] | None = None) -> list[dict]:
    """Questions of a hub dataset (`data.hub.load`) in SQuAD's hub layout, fields mapped as for JSONL."""
    return [flat_question(dict(r), columns or {}, f"{name}[{i}]") for i, r in enumerate(ds)]


def _load_file(path: Path, columns: dict[str, str]) -> list[dict]:
    suffix = format_suffix(path)
    if suffix == ".jsonl":
        return load_jsonl(path, columns)
    if suffix == ".json":
        return load_official(path)
    raise TasktuneError(f"{path}: unknown SQuAD v2 format {suffix!r} (expected .json or .jsonl, optionally .gz)")


def pick(folder: Path) -> list[Path]:
    """Every SQuAD file in a data directory, pooled (an official train part and a dev part alike)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and format_suffix(p) in (".json", ".jsonl"))


def load(spec, path: str | None = None) -> tuple[list[dict], str]:
    """Questions and where they came from: `path` (a file, or a directory whose SQuAD files are pooled), else
    `$TASKTUNE_DATA_DIR/<task>/`, else the embedded copy, else the spec's hub dataset (or `hub:ID`)."""
    files = resolve(spec, path, pick)
    if isinstance(files, hub.HubSource):
        return hub_questions(hub.load(files, spec.name), str(files), spec.data.columns), str(files)
    rows, seen = [], {}
    for file in files:
        for row in _load_file(file, spec.data.columns):
            if row["id"] in seen:
                raise TasktuneError(f"{file}: duplicate question id {row['id']!r} (first seen in {seen[row['id']]})")
            seen[row["id"]] = file
            rows.append(row)
    if not rows:
        raise TasktuneError(f"{', '.join(map(str, files))}: no questions found")
    return rows, ", ".join(str(f) for f in files)
