"""SST-2 rows from GLUE TSV, Kaggle-style CSV/TSV, JSONL, or the Hugging Face Hub.

Every row becomes `{"id": int, "sentence": str, "label": 0|1}`; `id` is the 0-based data-row index
in the source, so a saved split can be traced back to the file.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from tasktune.data import format_suffix, locate, read_text
from tasktune.errors import TasktuneError, where

TEXT_COLUMNS = ("sentence", "text", "review", "reviews", "phrase")
LABEL_COLUMNS = ("label", "labels", "rating", "ratings", "sentiment")
LABEL_WORDS = {"0": 0, "1": 1, "negative": 0, "positive": 1, "neg": 0, "pos": 1}
HUB_IDS = ("stanfordnlp/sst2", "nyu-mll/glue")
FILENAMES = ("train.tsv", "train.csv", "train.jsonl", "train.tsv.gz", "train.csv.gz", "train.jsonl.gz")


def _label(value, path, row, field) -> int:
    key = str(value).strip().lower()
    if isinstance(value, float) and value.is_integer():
        key = str(int(value))
    if key not in LABEL_WORDS:
        raise TasktuneError(f"{where(path, row, field)}: label {value!r} is not 0/1 "
                            "(or negative/positive)")
    return LABEL_WORDS[key]


def _sentence(value, path, row, field) -> str:
    """The text exactly as given: GLUE rows end with a space before the tab, and lm-evaluation-harness keeps
    it in the prompt; stripping it changed 13 of 872 fp32 `score` decisions on Gemma 3 270M. Emptiness is
    checked on a stripped copy only."""
    if not isinstance(value, str) or not value.strip():
        raise TasktuneError(f"{where(path, row, field)}: empty sentence (expected non-empty text)")
    return value


def _pick(columns: list[str], names: tuple[str, ...]) -> str | None:
    lowered = {c.strip().lower(): c for c in columns}
    return next((lowered[n] for n in names if n in lowered), None)


def load_delimited(path: Path) -> list[dict]:
    delimiter = "\t" if format_suffix(path) == ".tsv" else ","
    text = read_text(path)
    # GLUE's TSV has no quoting; quotes in CSV files are honoured.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    try:
        return _rows_from(reader, path, delimiter)
    except csv.Error as exc:
        raise TasktuneError(f"{path}, line {reader.line_num}: not valid {'TSV' if delimiter == chr(9) else 'CSV'} "
                            f"({exc})") from exc


def _rows_from(reader, path: Path, delimiter: str) -> list[dict]:
    header = next(reader, [])
    text_col, label_col = _pick(header, TEXT_COLUMNS), _pick(header, LABEL_COLUMNS)
    if text_col is None or label_col is None:
        other = "," if delimiter == "\t" else "\t"
        wrong = header and other in header[0]
        hint = f" (the header contains {other!r}: wrong delimiter?)" if wrong else ""
        raise TasktuneError(
            f"{path}, header: columns {header} do not include a text column {list(TEXT_COLUMNS)} and a "
            f"label column {list(LABEL_COLUMNS)} separated by {delimiter!r}{hint}")
    ti, li = header.index(text_col), header.index(label_col)
    rows = []
    for n, fields in enumerate(reader):
        line = n + 2  # 1-based, after the header
        if not fields:
            continue
        if len(fields) != len(header):
            raise TasktuneError(f"{path}, line {line}: {len(fields)} fields, expected {len(header)} "
                                f"separated by {delimiter!r}")
        rows.append({"id": len(rows), "sentence": _sentence(fields[ti], path, f"{line}", text_col),
                     "label": _label(fields[li], path, f"{line}", label_col)})
    return rows


def load_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TasktuneError(f"{path}, line {n}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise TasktuneError(f"{path}, line {n}: expected a JSON object, got {type(obj).__name__}")
        text_col, label_col = _pick(list(obj), TEXT_COLUMNS), _pick(list(obj), LABEL_COLUMNS)
        if text_col is None or label_col is None:
            raise TasktuneError(f"{path}, line {n}: keys {sorted(obj)} lack a text key "
                                f"{list(TEXT_COLUMNS)} or a label key {list(LABEL_COLUMNS)}")
        rows.append({"id": len(rows), "sentence": _sentence(obj[text_col], path, n, text_col),
                     "label": _label(obj[label_col], path, n, label_col)})
    return rows


def load_hub(hub_id: str = "stanfordnlp/sst2", split: str = "train") -> list[dict]:
    try:
        import datasets
    except ImportError as exc:
        raise TasktuneError("no local SST-2 file was given and `datasets` is not installed for the hub: "
                            "pass --data PATH, set $TASKTUNE_DATA_DIR, or pip install 'tasktune[hub]'") from exc
    try:
        if hub_id == "nyu-mll/glue":
            ds = datasets.load_dataset("nyu-mll/glue", "sst2", split=split)
        else:
            ds = datasets.load_dataset(hub_id, split=split)
    except Exception as exc:  # the hub raises many types; all mean "not available"
        raise TasktuneError(f"cannot load {hub_id!r} from the Hugging Face Hub (offline?): {exc}") from exc
    return [{"id": i, "sentence": _sentence(r["sentence"], hub_id, i, "sentence"),
             "label": _label(r["label"], hub_id, i, "label")} for i, r in enumerate(ds)]


def pick(folder: Path) -> list[Path]:
    """The SST-2 file in a data directory: the first of FILENAMES that exists."""
    return [folder / name for name in FILENAMES if (folder / name).is_file()][:1]


def load(path: str | None = None) -> tuple[list[dict], str]:
    """Rows and a description of where they came from."""
    if path in HUB_IDS or (path and path.startswith("hub:")):
        hub_id = path.removeprefix("hub:")
        return load_hub(hub_id), f"hub:{hub_id}"
    files = locate(path, "sst2", pick)
    if files is None:
        return load_hub(), "hub:stanfordnlp/sst2"
    resolved = files[0]
    suffix = format_suffix(resolved)
    if suffix in (".tsv", ".csv"):
        rows = load_delimited(resolved)
    elif suffix in (".jsonl", ".json"):
        rows = load_jsonl(resolved)
    else:
        raise TasktuneError(f"{resolved}: unknown SST-2 format {suffix!r} (expected .tsv, .csv or .jsonl, "
                            "optionally .gz)")
    if not rows:
        raise TasktuneError(f"{resolved} has a header but no data rows")
    return rows, str(resolved)
