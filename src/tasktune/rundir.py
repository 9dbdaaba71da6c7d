"""The run directory: built under a temporary name and renamed into place only when complete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tasktune.errors import TasktuneError


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp file + rename) so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


class StagingDir:
    """`with StagingDir(final) as work:` writes into a hidden sibling; it becomes `final` on success and
    is deleted on any error, so a failed command never leaves a half-written directory behind."""

    def __init__(self, final: Path, overwrite: bool = False):
        self.final = Path(final)
        if self.final.exists() and not overwrite:
            raise TasktuneError(f"{self.final} already exists; choose another name or pass --overwrite")
        self.overwrite = overwrite
        self.work = self.final.parent / f".{self.final.name}.partial-{os.getpid()}"

    def __enter__(self) -> Path:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        return self.work

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.work, ignore_errors=True)
            return False
        if self.final.exists() and self.overwrite:
            shutil.rmtree(self.final)
        os.replace(self.work, self.final)
        return False
