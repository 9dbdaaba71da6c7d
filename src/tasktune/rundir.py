"""The run directory: built under a temporary name and renamed into place only when complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import yaml

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


class RunDir:
    """A resumable run directory.

    Work happens in `.NAME.partial` beside the final directory, which appears (by rename) only when every
    stage is done. Re-running the same recipe resumes the partial directory: finished stages (recorded in
    `stages.json`) are not redone and training continues from its last complete checkpoint. A different
    recipe is refused unless `overwrite`.
    """

    def __init__(self, final: Path, config: dict, overwrite: bool = False):
        self.final = Path(final)
        self.work = self.final.parent / f".{self.final.name}.partial"
        self.config_text = yaml.safe_dump(config, sort_keys=False)
        self.complete = False
        self.resumed = False
        if self.final.exists():
            if self._same_config(self.final) and not overwrite:
                self.complete = True
                return
            if not overwrite:
                raise TasktuneError(f"{self.final} already exists with a different recipe; choose another name or "
                                    "pass --overwrite")
        if self.work.exists():
            if self._same_config(self.work) and not overwrite:
                self.resumed = True
                return
            if not overwrite:
                raise TasktuneError(f"{self.work} holds an unfinished run of a different recipe; choose another "
                                    "name or pass --overwrite")
            shutil.rmtree(self.work)

    def _same_config(self, folder: Path) -> bool:
        path = folder / "recipe.yaml"
        return path.is_file() and path.read_text() == self.config_text

    def start(self) -> Path:
        if not self.resumed:
            self.work.mkdir(parents=True)
            write_text(self.work / "recipe.yaml", self.config_text)
            write_json(self.work / "stages.json", {"done": []})
        return self.work

    def done(self, stage: str) -> bool:
        return stage in json.loads((self.work / "stages.json").read_text())["done"]

    def mark(self, stage: str) -> None:
        stages = json.loads((self.work / "stages.json").read_text())
        stages["done"].append(stage)
        write_json(self.work / "stages.json", stages)

    def finish(self) -> Path:
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.work, self.final)
        return self.final


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
