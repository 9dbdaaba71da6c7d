"""Where tasktune keeps what it makes for itself: converted models, the nltk data it builds, its ownership key.

A leaf module (no torch): metrics, ownership and models all read the same folder."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("TASKTUNE_CACHE", Path.home() / ".cache" / "tasktune"))
