"""Checkpoints that can be trusted on resume: sealed after writing, skipped when damaged, and a signal
handler that finishes the step and saves one before stopping."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from transformers import TrainerCallback

from tasktune.rundir import sha256_file, write_json

SEAL = "tasktune_complete.json"


class SealCheckpoints(TrainerCallback):
    """After the Trainer writes checkpoint-N, record every file's size and sha256 in it. A checkpoint without
    a matching seal (killed mid-write, truncated, corrupted) is never resumed from."""

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                     for f in sorted(folder.iterdir()) if f.is_file() and f.name != SEAL}
            write_json(folder / SEAL, {"step": state.global_step, "files": files})


def complete_checkpoint(folder: Path) -> bool:
    seal = folder / SEAL
    try:
        files = json.loads(seal.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == meta["bytes"]
               and sha256_file(folder / name) == meta["sha256"] for name, meta in files.items())


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest sealed checkpoint whose files still match their seal; damaged ones are skipped."""
    found = sorted((p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for folder in found:
        if complete_checkpoint(folder):
            return folder
        print(f"[tasktune] skipping incomplete or damaged checkpoint {folder}")
    return None


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM: finish the current step, save a checkpoint, stop; the run can then be resumed."""

    def __init__(self):
        self.received = None
        self._previous = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def on_step_end(self, args, state, control, **kwargs):
        if self.received:
            control.should_save = True
            control.should_training_stop = True
