"""Proof that tasktune wrote something, so that `--overwrite` replaces only what tasktune made.

A directory tasktune wrote holds `.tasktune`, a manifest of every file it wrote there (relative path, size,
sha256) and the command that wrote it, signed with HMAC-SHA256 under a key kept in tasktune's cache
(`$TASKTUNE_CACHE/owner.key`, mode 0600, made on first use). A marker file anyone can create proves nothing;
a manifest whose signature checks and whose every file is present and unchanged does. A directory may be
replaced only when every file in it is one the manifest lists, unchanged: a file a user added (or edited) is
the user's, and its presence refuses the replacement.

A run or sweep still in progress (`runs/.NAME.partial`, an unfinished `sweeps/NAME`) is signed as `partial`:
the Trainer writes and rotates checkpoints there between seals, so what is tasktune's there is what its kind's
layout names (`LAYOUTS`: the run's files and folders, a sweep's and its trials'); anything else in it is the
user's, refuses a replacement, and is left out of the manifest when the directory is finished. The key is made
only when something is signed, never while verifying: a lost key is said, not silently replaced.

Single files that tasktune writes outside a directory of its own (`recipe-reference --out FILE`) are recorded
the same way in the cache (`owned-files/`), keyed by absolute path.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
from pathlib import Path

from tasktune.atomic import write_bytes, write_json
from tasktune.cache import cache_dir
from tasktune.errors import TasktuneError
from tasktune.run_layout import RunLayout

MARKER = ".tasktune"
LOCK_SUFFIX = ".lock"

# What tasktune writes at the top of each kind of directory it makes (a run's: its RunLayout; the sweep's files):
# in an unfinished directory, whose files change between seals (checkpoints rotate), only these are tasktune's; a
# finished directory's manifest lists only files under them. Anything else in it is the user's.
LAYOUTS = {
    "run": RunLayout.top_level_names(),
    "sweep": {"spec.json", "fingerprint.json", "study.db", "study.db-journal", "study.db-wal", "study.db-shm",
              "trials", "test", "leaderboard.json", "leaderboard.md", "sweep.json", "report.md", "report.html",
              "plots"},
    "trial": {"recipe.json", "trial.json", "adapter", "train"},
}


def key_path() -> Path:
    return cache_dir() / "owner.key"


def _key(create: bool = False) -> bytes | None:
    """The signing key; None when there is none and `create` is false (verifying never makes a key: a new key
    would silently disown every directory signed with the old one)."""
    path = key_path()
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        if not create:
            return None
    # A cache tasktune used before (it holds anything) that lacks the key lost it: say so when replacing it.
    used_before = path.parent.is_dir() and any(path.parent.iterdir())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".owner.key.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex())
    try:
        os.link(tmp, path)  # never replaces a key another process made first
        if used_before:
            print(f"[tasktune] no ownership key at {path}: made a new one; directories signed before with another "
                  "key cannot be verified with it (restore that key file to keep managing them)", file=sys.stderr)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return bytes.fromhex(path.read_text().strip())


def _signature(payload: dict, create_key: bool = False) -> str | None:
    key = _key(create=create_key)
    if key is None:
        return None
    body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def _command() -> list[str]:
    return ["tasktune", *sys.argv[1:]] if Path(sys.argv[0]).name in ("tasktune", "__main__.py") else list(sys.argv)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _files(folder: Path) -> list[Path]:
    """Every non-directory entry under `folder` (links not followed), the marker excepted."""
    found = []
    for root, dirs, names in os.walk(folder):
        base = Path(root)
        found += [base / n for n in names]
        found += [base / d for d in dirs if (base / d).is_symlink()]  # a link to a directory is not ours either
    return sorted(p for p in found if p != folder / MARKER)


# --- directories ----------------------------------------------------------------------------------------------

def _in_layout(folder: Path, path: Path, kind: str) -> bool:
    names = LAYOUTS.get(kind)
    return names is None or path.relative_to(folder).parts[0] in names


def seal(folder: Path, kind: str, partial: bool = False) -> None:
    """Sign `folder` as tasktune's: the manifest lists every file now in it that tasktune wrote (under its kind's
    layout; none, for a partial directory, whose layout alone says what is tasktune's)."""
    folder = Path(folder)
    files = {} if partial else {p.relative_to(folder).as_posix(): _entry(p) for p in _files(folder)
                                if p.is_file() and not p.is_symlink() and _in_layout(folder, p, kind)}
    payload = {"written_by": "tasktune", "kind": kind, "partial": partial, "command": _command(), "files": files}
    write_json(folder / MARKER, {**payload, "hmac": _signature(payload, create_key=True)})


def read_marker(folder: Path) -> tuple[dict | None, str]:
    """(the verified marker, "") or (None, why it does not prove ownership)."""
    path = Path(folder) / MARKER
    if not path.is_file() or path.is_symlink():
        return None, f"no {MARKER} marker"
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
        payload = {k: marker[k] for k in ("written_by", "kind", "partial", "command", "files")}
        signed = marker["hmac"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"its {MARKER} file is not a tasktune manifest"
    expected = _signature(payload)
    if expected is None:
        return None, (f"tasktune's ownership key {key_path()} is missing (a wiped cache, or another TASKTUNE_CACHE?), "
                      f"so its {MARKER} manifest cannot be verified: restore that key file, or check the directory "
                      "yourself and remove it")
    if not isinstance(signed, str) or not hmac.compare_digest(signed, expected):
        why = f"its {MARKER} manifest is not signed by this tasktune installation (key {key_path()})"
        try:
            made, written = key_path().stat().st_mtime, path.stat().st_mtime
        except OSError:
            made, written = 0.0, 0.0
        if made > written:  # the key is younger than the signature: the old key was lost
            import datetime

            when = lambda t: datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")  # noqa: E731
            why += (f"; that key was made {when(made)}, after this was signed ({when(written)}): restore the "
                    "earlier key file, or check the directory yourself and remove it")
        return None, why
    return marker, ""


def add_to_seal(folder: Path, written: list[Path]) -> None:
    """After re-writing some files of a sealed directory (`tasktune report`, `params`): list them as ours."""
    folder = Path(folder)
    marker, why = read_marker(folder)
    if marker is None:
        raise TasktuneError(f"{folder}: {why}; refusing to write into it")
    files = dict(marker["files"])
    for path in written:
        path = Path(path)
        if path.is_file():
            files[path.relative_to(folder).as_posix()] = _entry(path)
    payload = {k: marker[k] for k in ("written_by", "kind", "partial", "command")}
    payload["files"] = files
    write_json(folder / MARKER, {**payload, "hmac": _signature(payload, create_key=True)})


def foreign_files(folder: Path, marker: dict) -> list[str]:
    """Files in `folder` that its manifest does not list, or that changed since tasktune wrote them."""
    listed = marker["files"]
    foreign = []
    for path in _files(folder):
        rel = path.relative_to(folder).as_posix()
        meta = listed.get(rel)
        if path.is_symlink() or not path.is_file() or meta is None:
            foreign.append(rel)
        elif path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            foreign.append(f"{rel} (changed)")
    return foreign


def _atomic_leftover(name: str, names: set[str]) -> bool:
    """The temporary file of an atomic write killed before its rename (`atomic.py`: `.NAME.XXXX.tmp`)."""
    return name.startswith(".") and name.endswith(".tmp") and name[1:].split(".tmp")[0].rsplit(".", 1)[0] in names


def partial_foreign(folder: Path, kind: str) -> list[str]:
    """Entries of an unfinished directory of `kind` that tasktune does not write there (a user's notes, a folder of
    theirs, a link), looking into the trial directories of a sweep as well."""
    names = LAYOUTS.get(kind)
    if names is None:  # a staging directory: hidden, unique, removed on failure
        return []
    foreign = []
    for entry in sorted(Path(folder).iterdir()):
        if entry.name == MARKER:
            continue
        if entry.is_symlink() or (entry.name not in names and not _atomic_leftover(entry.name, names)):
            foreign.append(entry.name)
        elif kind == "sweep" and entry.name == "trials" and entry.is_dir():
            for trial in sorted(entry.iterdir()):
                marker, _ = read_marker(trial) if trial.is_dir() and not trial.is_symlink() else (None, "")
                if marker is None:
                    foreign.append(f"trials/{trial.name}")
                    continue
                inner = (partial_foreign(trial, marker["kind"]) if marker["partial"]
                         else foreign_files(trial, marker))
                foreign += [f"trials/{trial.name}/{name}" for name in inner]
    return foreign


def protected(path: Path) -> str | None:
    """Why `path` may never be replaced whoever wrote it, or None."""
    resolved = Path(os.path.abspath(path))
    cwd = Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "it is the filesystem root"
    if resolved.resolve() == Path.home().resolve():
        return "it is the home directory"
    if resolved.resolve() == cwd:
        return "it is the working directory"
    if resolved.resolve() in cwd.parents:
        return "it contains the working directory"
    return None


def check_replaceable(path: Path, allow_partial: bool = False) -> None:
    """Raise unless `path` is a real directory whose every file tasktune wrote and nobody changed since."""
    path = Path(path)
    reason = protected(path)
    if reason:
        raise TasktuneError(f"{path}: refusing to replace it ({reason}); choose another output directory")
    if path.is_symlink():
        raise TasktuneError(f"{path} is a symbolic link; tasktune never replaces a link or writes through one: "
                            "choose another output directory")
    if not path.is_dir():
        raise TasktuneError(f"{path} exists and is not a directory; choose another output directory")
    marker, why = read_marker(path)
    if marker is None:
        raise TasktuneError(f"{path} was not written by tasktune ({why}); refusing to replace it even with "
                            "--overwrite; choose another output directory")
    # An unfinished directory, where allowed, owns what its layout names; otherwise only its manifest's files.
    foreign = (partial_foreign(path, marker["kind"]) if marker["partial"] and allow_partial
               else foreign_files(path, marker))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise TasktuneError(f"{path} holds {len(foreign)} file(s) tasktune did not write: {shown}; they are "
                            "yours, so it is not replaced even with --overwrite: move them or choose another "
                            "output directory")


# --- single files ----------------------------------------------------------------------------------------------

def _record_path(path: Path) -> Path:
    key = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()
    return cache_dir() / "owned-files" / f"{key}.json"


def write_owned_file(path: Path, data: bytes, overwrite: bool = False) -> Path:
    """Write a file tasktune owns: refuse an existing one unless `overwrite` and tasktune wrote it unchanged."""
    path = Path(path)
    if path.is_symlink():
        raise TasktuneError(f"{path} is a symbolic link; tasktune never writes through one: choose another file")
    if path.is_dir():
        raise TasktuneError(f"{path} is a directory; expected the path of a file to write")
    if path.exists():
        if not overwrite:
            raise TasktuneError(f"{path} already exists; choose another file or pass --overwrite")
        try:
            record = json.loads(_record_path(path).read_text())
            payload = {k: record[k] for k in ("path", "bytes", "sha256", "command")}
            expected = _signature(payload)
            ours = (expected is not None and hmac.compare_digest(record["hmac"], expected)
                    and record["path"] == os.path.abspath(path) and _entry(path) == {
                        "bytes": record["bytes"], "sha256": record["sha256"]})
        except (OSError, ValueError, KeyError, TypeError):
            ours = False
        if not ours:
            raise TasktuneError(f"{path} was not written by tasktune (or changed since it was); refusing to replace "
                                "it even with --overwrite: remove it yourself or choose another file")
    write_bytes(path, data)
    payload = {"path": os.path.abspath(path), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
               "command": _command()}
    write_json(_record_path(path), {**payload, "hmac": _signature(payload, create_key=True)})
    return path


# --- never write into what a command reads -----------------------------------------------------------------------

def check_outside(out: Path, reads: dict[str, str | Path | None], option: str = "--out") -> None:
    """Refuse an output directory that is, contains, or sits inside something the command reads, or that is the
    folder of a file it reads: replacing it would delete or change the command's own input."""
    target = Path(os.path.abspath(out)).resolve()
    for what, read in reads.items():
        if not read or str(read).startswith("hub:"):
            continue
        source = Path(read).expanduser()
        if not source.exists():
            continue
        source = source.resolve()
        clash = (target == source or source.is_relative_to(target) or
                 (source.is_dir() and target.is_relative_to(source)) or
                 (source.is_file() and target == source.parent))
        if clash:
            raise TasktuneError(f"{option} {out} overlaps the {what} this command reads ({read}); no command writes "
                                "into, replaces or sits inside what it reads: choose another directory")
