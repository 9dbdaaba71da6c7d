"""Directories tasktune writes: staged under a hidden name, renamed into place when complete, marked as
tasktune's own, and never replacing anything tasktune did not create.

- `write_json` / `write_jsonl` / `write_text`: atomic file writes (unique temp name, fsync, rename).
- `StagingDir`: one-shot outputs (`eval --out`, `score --out`, `export --out`, `compare --out`).
- `RunDir`: a resumable run directory, locked against a second process.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from tasktune.errors import TasktuneError

# Every directory tasktune creates as an output holds this file; only such directories may be replaced.
MARKER = ".tasktune"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Write atomically: a uniquely named temp file in the same folder, fsync, rename, fsync the folder.
    A reader never sees half a file, and two writers never share a temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # our own temp file only
        raise
    _fsync_dir(path.parent)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def mark_as_ours(folder: Path, kind: str) -> None:
    write_json(Path(folder) / MARKER, {"written_by": "tasktune", "kind": kind})


def is_ours(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def _protected(path: Path) -> str | None:
    """Why `path` may never be replaced, or None."""
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "it is the filesystem root"
    if resolved == Path.home().resolve():
        return "it is the home directory"
    if resolved == cwd:
        return "it is the working directory"
    if resolved in cwd.parents:
        return "it contains the working directory"
    return None


def check_replaceable(path: Path) -> None:
    """Raise unless `path` is a directory tasktune wrote (it holds the marker) in a place that may be replaced."""
    path = Path(path)
    reason = _protected(path)
    if reason:
        raise TasktuneError(f"{path}: refusing to replace it ({reason}); choose another output directory")
    if not path.is_dir() or not is_ours(path):
        raise TasktuneError(f"{path} was not written by tasktune (no {MARKER} marker); refusing to replace it "
                            "even with --overwrite; choose another output directory")


def remove_ours(path: Path) -> None:
    """Delete a directory, only after checking that tasktune wrote it."""
    check_replaceable(path)
    shutil.rmtree(path)


def _replace_with(work: Path, final: Path) -> None:
    """Move `work` to `final`; an existing `final` (already checked replaceable) is moved aside first and
    deleted only after the new directory is in place."""
    if final.exists() and any(final.iterdir()):
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, aside / final.name)
        os.replace(work, final)
        remove_ours(aside / final.name)
        aside.rmdir()
    else:
        if final.exists():
            final.rmdir()  # empty
        os.replace(work, final)
    _fsync_dir(final.parent)


class StagingDir:
    """`with StagingDir(final) as work:` writes into a hidden sibling; it becomes `final` on success and is
    removed on any error, so a failed command never leaves a half-written directory behind.

    An existing non-empty `final` is refused unless `overwrite`, and even then replaced only when tasktune
    wrote it (marker file) and it is not the working directory, one of its parents, home or the root.
    """

    def __init__(self, final: Path, overwrite: bool = False, kind: str = "output"):
        self.final = Path(final)
        self.kind = kind
        self.work: Path | None = None
        if self.final.exists() and not self.final.is_dir():
            raise TasktuneError(f"{self.final} exists and is not a directory; choose another output directory")
        reason = _protected(self.final)
        if reason:
            raise TasktuneError(f"{self.final}: refusing to write output there ({reason}); "
                                "choose a new directory")
        if self.final.is_dir() and any(self.final.iterdir()):
            if not overwrite:
                raise TasktuneError(f"{self.final} already exists and is not empty; choose another directory "
                                    "or pass --overwrite")
            check_replaceable(self.final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.final.parent))
        mark_as_ours(self.work, self.kind)
        return self.work

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.work, ignore_errors=True)  # made by __enter__ with a unique name
            return False
        _replace_with(self.work, self.final)
        return False


class RunLock:
    """An exclusive lock on a run, held by the process working on it. It is an OS file lock (flock): the
    kernel releases it when the process exits or is killed, so a stale lock never blocks the next run."""

    def __init__(self, final: Path):
        self.path = Path(final).parent / f".{Path(final).name}.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise TasktuneError(f"{self.path.parent / self.path.name[1:-5]} is in use by another tasktune "
                                    f"process (pid {holder}); wait for it to finish or stop it") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class RunDir:
    """A resumable run directory.

    Work happens in `.NAME.partial` beside the final directory, which appears (by rename) only when every
    stage is done. Re-running the same recipe resumes the partial directory: finished stages (recorded in
    `stages.json`) are not redone and training continues from its last complete checkpoint. A different
    recipe is refused unless `overwrite`, and only a directory tasktune wrote is ever replaced. The main
    process holds `RunLock` from construction until `release()`; other processes of one launch pass
    `lock=False` and follow it.
    """

    def __init__(self, final: Path, config: dict, overwrite: bool = False, lock: bool = True):
        self.final = Path(final)
        self.work = self.final.parent / f".{self.final.name}.partial"
        self.config_text = yaml.safe_dump(config, sort_keys=False)
        self.complete = False
        self.resumed = False
        self.lock = RunLock(self.final) if lock else None
        if self.lock:
            self.lock.acquire()
        try:
            self._inspect(overwrite)
        except BaseException:
            self.release()
            raise

    def _inspect(self, overwrite: bool) -> None:
        if self.final.exists():
            if self._same_config(self.final) and not overwrite:
                self.complete = True
                return
            if not overwrite:
                raise TasktuneError(f"{self.final} already exists with a different recipe; choose another name or "
                                    "pass --overwrite")
            check_replaceable(self.final)  # replaced only at finish(), when the new run is complete
        if self.work.exists():
            if self._same_config(self.work) and not overwrite:
                self.resumed = True
                return
            if not overwrite:
                raise TasktuneError(f"{self.work} holds an unfinished run of a different recipe; choose another "
                                    "name or pass --overwrite")
            remove_ours(self.work)

    def _same_config(self, folder: Path) -> bool:
        path = folder / "recipe.yaml"
        return path.is_file() and path.read_text() == self.config_text

    def start(self) -> Path:
        if not self.resumed:
            self.work.mkdir(parents=True)
            mark_as_ours(self.work, "run")
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
        _replace_with(self.work, self.final)
        return self.final

    def release(self) -> None:
        if self.lock:
            self.lock.release()


def require_finished_run(run_dir: Path, needs: tuple[str, ...] = ("report.json",)) -> Path:
    """The run directory, or a one-line error saying why it is not a finished tasktune run."""
    run_dir = Path(run_dir)
    partial = run_dir.parent / f".{run_dir.name}.partial"
    if not run_dir.is_dir():
        hint = f" (an unfinished run is in {partial}: re-run its command to resume)" if partial.is_dir() else ""
        raise TasktuneError(f"{run_dir} is not a directory{hint}")
    if run_dir.name.endswith(".partial"):
        raise TasktuneError(f"{run_dir} is an unfinished run: re-run its command to resume it first")
    missing = [name for name in ("recipe.yaml", "stages.json", *needs) if not (run_dir / name).exists()]
    if missing:
        raise TasktuneError(f"{run_dir} is not a finished tasktune run (missing {', '.join(missing)})")
    return run_dir


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
