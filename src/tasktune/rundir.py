"""Directories tasktune writes: staged under a hidden name, renamed into place when complete, signed as
tasktune's own (`ownership.py`), and never replacing anything tasktune did not create.

- `write_json` / `write_jsonl` / `write_text`: atomic file writes (`atomic.py`).
- `StagingDir`: one-shot outputs (`eval --out`, `score --out`, `export --out`, `compare --out`), locked.
- `RunDir`: a resumable run directory, locked against a second process.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from tasktune.atomic import fsync_dir as _fsync_dir
from tasktune.atomic import write_bytes, write_json, write_jsonl, write_text  # noqa: F401 (the writers' home)
from tasktune.errors import TasktuneError
from tasktune.ownership import MARKER, check_replaceable, protected, read_marker, seal, sha256_file  # noqa: F401
from tasktune.run_layout import RunLayout


def mark_as_ours(folder: Path, kind: str) -> None:
    """Sign a directory tasktune is still writing (a run in progress, a staged output) as its own."""
    seal(folder, kind, partial=True)


def is_ours(folder: Path) -> bool:
    return read_marker(folder)[0] is not None


def remove_ours(path: Path, allow_partial: bool = False) -> None:
    """Delete a directory, only after checking (again, here) that tasktune wrote every file in it."""
    check_replaceable(path, allow_partial=allow_partial)
    shutil.rmtree(path)


def _replace_with(work: Path, final: Path, kind: str) -> None:
    """Seal `work` (its manifest lists every file now in it) and move it to `final`; an existing `final` is
    checked again, moved aside, and deleted only after the new directory is in place."""
    seal(work, kind)
    if final.is_symlink():
        raise TasktuneError(f"{final} is a symbolic link; tasktune never replaces a link: choose another directory")
    if final.exists() and any(final.iterdir()):
        check_replaceable(final)
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, aside / final.name)
        os.replace(work, final)
        shutil.rmtree(aside)  # holds only the directory checked just above
    else:
        if final.exists():
            final.rmdir()  # empty
        os.replace(work, final)
    _fsync_dir(final.parent)


def _check_output_place(final: Path, what: str) -> None:
    """One-line refusals for an output path that cannot be a directory of tasktune's."""
    if final.is_symlink():
        raise TasktuneError(f"{final} is a symbolic link; tasktune never writes through or replaces a link: "
                            f"choose another {what}")
    if final.exists() and not final.is_dir():
        raise TasktuneError(f"{final} exists and is not a directory; choose another {what}")
    for parent in final.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TasktuneError(f"{parent} is a file, so {final} cannot be created; choose another {what}")
            break
    reason = protected(final)
    if reason:
        raise TasktuneError(f"{final}: refusing to write output there ({reason}); choose a new directory")


class StagingDir:
    """`with StagingDir(final) as work:` writes into a hidden sibling; it becomes `final` on success and is
    removed on any error, so a failed command never leaves a half-written directory behind.

    An existing non-empty `final` is refused unless `overwrite`, and even then replaced only when tasktune
    wrote every file in it (`ownership.check_replaceable`) and it is not the working directory, one of its
    parents, home or the root. The output is locked like a run directory from construction to the end, so two
    commands writing the same `--out` cannot both succeed.
    """

    def __init__(self, final: Path, overwrite: bool = False, kind: str = "output"):
        self.final = Path(final)
        self.kind = kind
        self.work: Path | None = None
        self._check(overwrite)
        self.lock = RunLock(self.final)
        self.lock.acquire()
        try:
            self._check(overwrite)  # again, now that no other tasktune process can be writing it
        except BaseException:
            self.lock.release()
            raise

    def _check(self, overwrite: bool) -> None:
        _check_output_place(self.final, "output directory")
        if self.final.is_dir() and any(self.final.iterdir()):
            if not overwrite:
                raise TasktuneError(f"{self.final} already exists and is not empty; choose another directory "
                                    "or pass --overwrite")
            check_replaceable(self.final)

    def __enter__(self) -> Path:
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self.work = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.partial-", dir=self.final.parent))
            mark_as_ours(self.work, self.kind)
        except BaseException:
            if self.work is not None:
                shutil.rmtree(self.work, ignore_errors=True)
            self.lock.release()
            raise
        return self.work

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                shutil.rmtree(self.work, ignore_errors=True)  # made by __enter__ with a unique name
                return False
            try:
                _replace_with(self.work, self.final, self.kind)
            except BaseException:
                shutil.rmtree(self.work, ignore_errors=True)
                raise
            return False
        finally:
            self.lock.release()


class RunLock:
    """An exclusive lock on a run (or an output directory), held by the process working on it. It is an OS
    file lock (flock) on `.NAME.lock` beside it: the kernel releases it when the process exits or is killed, so
    a stale lock never blocks the next run. The holder deletes the lock file when it releases it; a process
    that locked a file deleted meanwhile tries again on the new one, so two never hold the lock at once."""

    def __init__(self, final: Path):
        self.path = Path(final).parent / f".{Path(final).name}.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            self._refuse_foreign_file()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise TasktuneError(f"{self.path.parent / self.path.name[1:-5]} is in use by another tasktune "
                                        f"process (pid {holder}); wait for it to finish or stop it") from None
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder deleted this file after we opened it: lock the new one
        else:
            raise TasktuneError(f"{self.path}: could not take the lock")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def _refuse_foreign_file(self) -> None:
        """A lock file holds a pid (or nothing, for an instant): anything else at that path is not tasktune's and
        is never truncated, written or deleted."""
        try:
            info = os.lstat(self.path)
        except FileNotFoundError:
            return
        ours = False
        if os.path.isfile(self.path) and not os.path.islink(self.path) and info.st_size <= 32:
            ours = self.path.read_bytes().strip().isdigit() or info.st_size == 0
        if not ours:
            raise TasktuneError(f"{self.path} exists and is not a tasktune lock file (it holds no pid); tasktune "
                                "leaves it alone: move it, or choose another name")

    def release(self) -> None:
        if self.fd is not None:
            # While still holding it (nobody can be mid-acquire on it and win), and only the file we wrote our pid in.
            if self.path.is_file() and self.path.read_bytes().strip() == str(os.getpid()).encode():
                self.path.unlink()
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
        _check_output_place(self.final, "run name or output_dir")
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
                if read_marker(self.work)[0] is None:
                    raise TasktuneError(f"{self.work} looks like an unfinished run, but tasktune did not sign it "
                                        f"({read_marker(self.work)[1]}); refusing to write into it")
                self.resumed = True
                return
            if not overwrite:
                raise TasktuneError(f"{self.work} holds an unfinished run of a different recipe; choose another "
                                    "name or pass --overwrite")
            remove_ours(self.work, allow_partial=True)

    def _same_config(self, folder: Path) -> bool:
        path = RunLayout(folder).recipe
        return path.is_file() and path.read_text() == self.config_text

    def start(self) -> Path:
        if not self.resumed:
            self.work.mkdir(parents=True)
            mark_as_ours(self.work, "run")
            write_text(RunLayout(self.work).recipe, self.config_text)
            write_json(RunLayout(self.work).stages, {"done": []})
        return self.work

    def done(self, stage: str) -> bool:
        return stage in json.loads(RunLayout(self.work).stages.read_text())["done"]

    def mark(self, stage: str) -> None:
        stages = json.loads(RunLayout(self.work).stages.read_text())
        stages["done"].append(stage)
        write_json(RunLayout(self.work).stages, stages)

    before_finish = None  # called just before the directory is sealed (the pipeline closes run.log there)

    def finish(self) -> Path:
        if self.before_finish is not None:
            self.before_finish()
        _replace_with(self.work, self.final, "run")
        return self.final

    def release(self) -> None:
        if self.lock:
            self.lock.release()


def require_finished_run(run_dir: Path, trained: bool = False) -> Path:
    """The run directory, or a one-line error saying why it is not a finished tasktune run (`trained`: one whose
    trained weights and training summary are there too)."""
    run_dir = Path(run_dir)
    partial = run_dir.parent / f".{run_dir.name}.partial"
    if not run_dir.is_dir():
        hint = f" (an unfinished run is in {partial}: re-run its command to resume)" if partial.is_dir() else ""
        raise TasktuneError(f"{run_dir} is not a directory{hint}")
    if run_dir.name.endswith(".partial"):
        raise TasktuneError(f"{run_dir} is an unfinished run: re-run its command to resume it first")
    missing = [path.relative_to(run_dir).as_posix() for path in RunLayout(run_dir).finished_paths(trained)
               if not path.exists()]
    if missing:
        raise TasktuneError(f"{run_dir} is not a finished tasktune run (missing {', '.join(missing)})")
    return run_dir
