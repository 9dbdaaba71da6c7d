"""Dataset loaders: one module per dataset, each returning validated in-memory rows."""

import os
from pathlib import Path

from tasktune.errors import TasktuneError


def resolve_data_path(path: str | None, task_dir: str, filenames: tuple[str, ...]) -> Path | None:
    """Explicit path → `$TASKTUNE_DATA_DIR/<task_dir>/<first existing filename>` → None (the hub)."""
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise TasktuneError(f"data file {p} does not exist")
        if p.is_dir():
            for name in filenames:
                if (p / name).is_file():
                    return p / name
            raise TasktuneError(f"data directory {p} holds none of {list(filenames)}")
        return p
    root = os.environ.get("TASKTUNE_DATA_DIR")
    if root:
        for name in filenames:
            candidate = Path(root) / task_dir / name
            if candidate.is_file():
                return candidate
    return None


def read_text(path: Path) -> str:
    """Read a UTF-8 file, naming the byte offset and line of the first invalid byte."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TasktuneError(f"{path}, line {line}: invalid UTF-8 byte at offset {exc.start} "
                            "(expected a UTF-8 text file)") from exc
    if not text.strip():
        raise TasktuneError(f"{path} is empty (expected a header and data rows)")
    return text
