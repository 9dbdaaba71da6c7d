"""tasktune: adapt a decoder LLM to a task with LoRA and measure what it bought.

`tasktune.run(...)` and `tasktune.evaluate(...)` are the Python API (see `tasktune.api`); importing the
package loads neither torch nor transformers (the command line's `--help` stays instant).
"""

from tasktune._version import __version__  # noqa: F401


def run(recipe: str, **kwargs):
    """See `tasktune.api.run`."""
    from tasktune.api import run as _run

    return _run(recipe, **kwargs)


def evaluate(model: str, task: str, data: str | None = None, **kwargs):
    """See `tasktune.api.evaluate`."""
    from tasktune.api import evaluate as _evaluate

    return _evaluate(model, task, data, **kwargs)


def sweep(sweep_file: str, *overrides: str, overwrite: bool = False):
    """See `tasktune.api.sweep`."""
    from tasktune.api import sweep as _sweep

    return _sweep(sweep_file, *overrides, overwrite=overwrite)
