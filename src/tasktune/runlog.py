"""run.log: everything a run prints, in the run directory, without progress-bar noise.

stdout and stderr are teed while the run lasts: the terminal sees what it always saw; the log gets every line
except progress-bar redraws (carriage-return updates) and terminal colour codes. Lines printed before the run
directory exists (loading, checks) are held and written when it does.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _Tee:
    def __init__(self, stream, log: "RunLog"):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.add(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding ... of the real stream
        return getattr(self.stream, name)


class RunLog:
    def __init__(self):
        self.pending: list[str] = []
        self.file = None
        self.saved = None

    def __enter__(self) -> "RunLog":
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout, sys.stderr = self.saved
        self.close()

    def add(self, text: str) -> None:
        if "\r" in text:  # a progress bar redrawing itself
            return
        text = ANSI.sub("", text)
        if self.file is None:
            self.pending.append(text)
        else:
            self.file.write(text)
            self.file.flush()

    def attach(self, path: Path) -> None:
        """From now on write to `path` (appended: a resumed run continues its log), held lines first."""
        self.file = open(path, "a", encoding="utf-8")
        self.file.write("".join(self.pending))
        self.file.flush()
        self.pending = []

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
