"""A prompt template is a str.format string over a row's named fields; this reads which fields it names (the data
loaders check their columns against it, the task specs their fields)."""

from __future__ import annotations

import string

from tasktune.errors import TasktuneError


def template_fields(template: str, where: str) -> list[str]:
    """The named fields of a str.format template; positional, attribute and index fields are refused."""
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise TasktuneError(f"{where}: template is not a valid str.format template ({exc})") from exc
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise TasktuneError(f"{where}: template field {{{name}{'!' + conversion if conversion else ''}"
                                f"{':' + spec if spec else ''}}} must be a plain name such as {{text}} "
                                "(no positions, attributes, indexes, conversions or format specs)")
        names.append(name)
    return names
