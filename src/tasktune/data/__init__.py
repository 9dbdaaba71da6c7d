"""Dataset loaders: one module per dataset, each returning validated in-memory rows.

Where the data comes from when a recipe names no path: `$TASKTUNE_DATA_DIR/<task>/`, then the copy embedded
in the package (`data/embedded/`, gzip-compressed), then the Hugging Face Hub.
"""

import errno
import gzip
import hashlib
import os
from pathlib import Path
from typing import Callable

from tasktune.errors import TasktuneError

EMBEDDED_DIR = Path(__file__).parent / "embedded"


def format_suffix(path: Path) -> str:
    """The format part of a file name: `.tsv` for both `train.tsv` and `train.tsv.gz`."""
    path = Path(path)
    return Path(path.stem).suffix.lower() if path.suffix.lower() == ".gz" else path.suffix.lower()


def locate(path: str | None, task_dir: str, pick: Callable[[Path], list[Path]],
           embedded: bool = True) -> list[Path] | None:
    """The data files to read: an explicit file or directory (`pick` chooses files in a directory) →
    `$TASKTUNE_DATA_DIR/<task_dir>/` → the embedded copy (shipped tasks only) → None, meaning the hub."""
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            if p.is_symlink():  # exists() follows links: say which link is broken, not that nothing is there
                target = os.readlink(p)
                try:
                    p.stat()
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        raise TasktuneError(f"data file {p} is a symbolic link that loops ({p} -> {target}); "
                                            "expected a file or directory") from None
                raise TasktuneError(f"data file {p} is a symbolic link to {target}, which does not exist")
            raise TasktuneError(f"data file {p} does not exist")
        if p.is_dir():
            files = pick(p)
            if not files:
                raise TasktuneError(f"data directory {p} holds no data file tasktune reads for {task_dir}")
            return files
        return [p]
    candidates = [Path(os.environ["TASKTUNE_DATA_DIR"]) / task_dir] if os.environ.get("TASKTUNE_DATA_DIR") else []
    for folder in candidates + ([EMBEDDED_DIR / task_dir] if embedded else []):
        if folder.is_dir() and pick(folder):
            return pick(folder)
    return None


def resolve(spec, path: str | None, pick: Callable[[Path], list[Path]]):
    """What a dataset module reads for `spec`: a list of local files, or a `hub.HubSource` (`hub:ID` as the
    path, or the spec's hub dataset when no local file is found)."""
    from tasktune.data import hub

    named = hub.named_by(path, spec)
    if named is not None:
        return named
    files = locate(path, spec.name, pick, embedded=spec.data.embedded)
    return hub.of_spec(spec) if files is None else files


def source_origin(source: str) -> str:
    """`path`, `TASKTUNE_DATA_DIR`, `embedded` or `hub`: where a loader's recorded source came from."""
    return "hub" if source.startswith("hub:") else origin([Path(f) for f in source.split(", ")])


def origin(files: list[Path] | None) -> str:
    """Which rung of the resolution order the files came from (recorded in the report and model card)."""
    if files is None:
        return "hub"
    resolved = Path(files[0]).resolve()
    if EMBEDDED_DIR.resolve() in resolved.parents:
        return "embedded"
    env = os.environ.get("TASKTUNE_DATA_DIR")
    if env and Path(env).resolve() in resolved.parents:
        return "TASKTUNE_DATA_DIR"
    return "path"


def content_sha256(path: Path) -> str:
    """sha256 of a data file's content: of the decompressed bytes for a .gz file."""
    if Path(path).suffix.lower() != ".gz":
        from tasktune.rundir import sha256_file

        return sha256_file(path)
    h = hashlib.sha256()
    with gzip.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_text(path: Path) -> str:
    """Read a UTF-8 file (gzip-compressed when it ends in .gz), naming the line of the first invalid byte."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix.lower() == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise TasktuneError(f"{path}: not a valid gzip file ({exc})") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TasktuneError(f"{path}, line {line}: invalid UTF-8 byte at offset {exc.start} "
                            "(expected a UTF-8 text file)") from exc
    if not text.strip():
        raise TasktuneError(f"{path} is empty (expected a header and data rows)")
    return text
