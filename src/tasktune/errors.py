"""User-facing errors: the CLI turns these into a one-line message and exit code 2."""


class TasktuneError(Exception):
    """Bad input from the user (file, row, field, value): never a bug in tasktune."""


def where(path, row=None, field=None) -> str:
    """Format a location such as `data.tsv, row 12, field 'label'` for error messages."""
    parts = [str(path)]
    if row is not None:
        parts.append(f"row {row}")
    if field is not None:
        parts.append(f"field {field!r}")
    return ", ".join(parts)
