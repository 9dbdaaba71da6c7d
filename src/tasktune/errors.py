"""User-facing errors: the CLI turns these into a one-line message and exit code 2."""


class TasktuneError(Exception):
    """Bad input from the user (file, row, field, value): never a bug in tasktune."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM during training: a checkpoint was saved; the CLI exits with code 130."""

    def __init__(self, signal_name: str, step: int):
        super().__init__(f"{signal_name} received: checkpoint saved at step {step}; run the same command again "
                         "to resume")


def where(path, row=None, field=None) -> str:
    """Format a location such as `data.tsv, row 12, field 'label'` for error messages."""
    parts = [str(path)]
    if row is not None:
        parts.append(f"row {row}")
    if field is not None:
        parts.append(f"field {field!r}")
    return ", ".join(parts)
