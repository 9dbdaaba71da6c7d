"""Classification rows from CSV/TSV, JSONL (each optionally .gz) or the Hugging Face Hub, read as a task spec
says: which column holds the text, which the label, and how the data writes each label.

Every row becomes `{"id": int, "text": str, "label": int, "fields": {column: text}}`: `id` is the 0-based
data-row index in the source (so a saved split traces back to the file), `label` the index of the spec's
label, and `fields` every column, which prompt templates may name. Text is kept exactly as given (GLUE rows end
with a space before the tab, and lm-evaluation-harness keeps it); emptiness is checked on a stripped copy.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from tasktune.data import format_suffix, hub, read_text, resolve
from tasktune.errors import TasktuneError, where
from tasktune.prompt_template import template_fields


class LabelMap:
    """The data's way of writing each label → the label's index (case-insensitive; 1.0 reads as 1)."""

    def __init__(self, spec):
        self.names = [label.name for label in spec.labels]
        self.index = {value.strip().lower(): i for i, label in enumerate(spec.labels)
                      for value in (label.values or [label.name])}

    def __call__(self, value, path, row, column) -> int:
        key = str(value).strip().lower()
        if isinstance(value, float) and value.is_integer():
            key = str(int(value))
        if key not in self.index:
            raise TasktuneError(f"{where(path, row, column)}: label {value!r} is not one of the task's labels "
                                f"(expected one of {sorted(self.index)})")
        return self.index[key]


def _text(value, path, row, column) -> str:
    if not isinstance(value, str):
        kind = {bool: "true/false", int: "a number", float: "a number", type(None): "null"}.get(type(value),
                                                                                             type(value).__name__)
        raise TasktuneError(f"{where(path, row, column)}: {kind} ({json.dumps(value)[:40]}), expected text (a "
                            "JSON string)")
    if not value.strip():
        raise TasktuneError(f"{where(path, row, column)}: empty text (expected non-empty text)")
    return value


def _pick(columns: list[str], names: list[str]) -> str | None:
    lowered = {c.strip().lower(): c for c in columns}
    return next((lowered[n.lower()] for n in names if n.lower() in lowered), None)


class TableReader:
    def __init__(self, spec):
        self.spec = spec
        self.labels = LabelMap(spec)
        self.template_fields = template_fields(spec.template, spec.source)

    def columns(self, header: list[str], path, line) -> tuple[str, str]:
        text_col, label_col = _pick(header, self.spec.data.text_column), _pick(header, self.spec.data.label_column)
        if text_col is None or label_col is None:
            raise TasktuneError(
                f"{path}, {line}: columns {header} do not include a text column {self.spec.data.text_column} and a "
                f"label column {self.spec.data.label_column} (task spec {self.spec.source})")
        missing = [f for f in self.template_fields if f != "text" and f not in header]
        if missing:
            raise TasktuneError(f"{path}, {line}: the task's template names field(s) {missing} that the data lacks "
                                f"(columns: {header}; `text` is the text column)")
        return text_col, label_col

    def row(self, values: dict, n: int, path, line, text_col: str, label_col: str) -> dict:
        fields = {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
        fields["text"] = _text(values[text_col], path, line, text_col)
        return {"id": n, "text": fields["text"], "label": self.labels(values[label_col], path, line, label_col),
                "fields": fields}

    def delimited(self, path: Path) -> list[dict]:
        delimiter = "\t" if format_suffix(path) == ".tsv" else ","
        text = read_text(path)
        # GLUE's TSV has no quoting; quotes in CSV files are honoured.
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        # strict: a quote must close before the delimiter (`"a"b,1` is an error, not the text `ab`).
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
        return self._delimited_rows(reader, path, delimiter)

    @staticmethod
    def _records(reader, path: Path, delimiter: str):
        """(first line, last line, fields) of each record; a malformed one is an error naming its lines."""
        end = reader.line_num
        while True:
            start = end + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                lines = (f"line {reader.line_num}" if reader.line_num <= start else
                         f"lines {start}-{reader.line_num} (a quote opened on line {start}: a stray quote?)")
                raise TasktuneError(f"{path}, {lines}: not valid {'TSV' if delimiter == chr(9) else 'CSV'} "
                                    f"({exc})") from None
            end = reader.line_num
            yield start, end, values

    def _delimited_rows(self, reader, path: Path, delimiter: str) -> list[dict]:
        records = self._records(reader, path, delimiter)
        header = next(records, (1, 1, []))[2]
        twice = sorted({c for c in header if header.count(c) > 1})
        if twice:
            raise TasktuneError(f"{path}, header: column(s) {twice} appear more than once; expected each column "
                                "named once")
        other = "," if delimiter == "\t" else "\t"
        try:
            text_col, label_col = self.columns(header, path, "header")
        except TasktuneError as exc:
            if header and other in header[0]:
                raise TasktuneError(f"{exc} (the header contains {other!r}: wrong delimiter?)") from None
            raise
        rows = []
        for line, end, values in records:  # the physical lines this record took
            if not values:
                continue
            if end > line:
                # A quoted field with line breaks: in a table of short texts, a stray quote that swallowed the rows
                # after it far more often than a real multi-line text (which JSONL holds unambiguously).
                raise TasktuneError(f"{path}, lines {line}-{end}: one record runs over {end - line + 1} lines (a quote "
                                    f"opened on line {line} closes only on line {end}: a stray quote?); quote only "
                                    "whole fields, or give text with line breaks as JSONL")
            if len(values) != len(header):
                raise TasktuneError(f"{path}, line {line}: {len(values)} fields, expected {len(header)} "
                                    f"separated by {delimiter!r}")
            rows.append(self.row(dict(zip(header, values)), len(rows), path, f"{line}", text_col, label_col))
        return rows

    def jsonl(self, path: Path) -> list[dict]:
        rows = []
        for n, obj in json_objects(path):
            text_col, label_col = self.columns(list(obj), path, f"line {n}")
            rows.append(self.row(obj, len(rows), path, n, text_col, label_col))
        return rows

    def hub(self, ds, name: str) -> list[dict]:
        """Rows of a hub dataset (`data.hub.load`); a ClassLabel column's integers become its class names."""
        text_col, label_col = self.columns(list(ds.column_names), name, "columns")
        names = getattr(ds.features[label_col], "names", None)
        rows = []
        for i, r in enumerate(ds):
            values = dict(r)
            if names is not None:  # a ClassLabel column: its integer means the class at that position
                values[label_col] = names[values[label_col]]
            rows.append(self.row(values, i, name, i, text_col, label_col))
        return rows


def json_objects(path: Path):
    """(line number, object) for each non-blank line of a JSON-lines file (UTF-8, optionally .gz); a line that is
    not a JSON object is refused naming the file and line."""
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TasktuneError(f"{path}, line {n}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise TasktuneError(f"{path}, line {n}: expected a JSON object, got {type(obj).__name__}")
        yield n, obj


def pick_files(spec):
    def pick(folder: Path) -> list[Path]:
        return [folder / name for name in spec.data.files if (folder / name).is_file()][:1]
    return pick


def load(spec, path: str | None = None) -> tuple[list[dict], str]:
    """Rows and a description of where they came from: `path` (a file, or a directory holding one of the spec's
    `data.files`), else `$TASKTUNE_DATA_DIR/<task>/`, else the embedded copy, else the spec's hub dataset."""
    reader = TableReader(spec)
    files = resolve(spec, path, pick_files(spec))
    if isinstance(files, hub.HubSource):
        return reader.hub(hub.load(files, spec.name), str(files)), str(files)
    resolved = files[0]
    suffix = format_suffix(resolved)
    if suffix in (".tsv", ".csv"):
        rows = reader.delimited(resolved)
    elif suffix in (".jsonl", ".json"):
        rows = reader.jsonl(resolved)
    else:
        raise TasktuneError(f"{resolved}: unknown data format {suffix!r} (expected .tsv, .csv or .jsonl, "
                            "optionally .gz)")
    if not rows:
        raise TasktuneError(f"{resolved} has a header but no data rows")
    return rows, str(resolved)
