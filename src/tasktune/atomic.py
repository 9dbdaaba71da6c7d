"""Atomic file writes: a uniquely named temp file in the same folder, fsync, rename, fsync the folder.

A reader never sees half a file, a full disk or a kill never truncates a file that was there before, and two
writers never share a temp file. Files get the usual mode (0666 less the umask, so 0644 by default), not
mkstemp's 0600. An OSError always names the path it was writing.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def fsync_dir(folder: Path) -> None:
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


def umask() -> int:
    """The process umask (read by setting it and back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_with(path: Path, writer) -> None:
    """`writer(temp_path)` writes the file (our bytes, or a library's own save function) into a temp file of
    ours beside `path`; then fsync, the usual mode, rename, fsync the folder."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)  # our own temp file only
        if exc.filename is None:  # a write or fsync error names no file: name the one being written
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
