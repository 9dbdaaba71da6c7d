"""The Hugging Face Hub, the last rung of the data resolution order, for every dataset module: which hub
dataset a recipe means (`data.path: hub:ID[:CONFIG]`, else the task spec's `data.hub`) and one loader.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasktune.errors import TasktuneError


@dataclass(frozen=True)
class HubSource:
    dataset: str
    config: str | None
    split: str

    def __str__(self) -> str:  # how reports and fingerprints name it
        return f"hub:{self.dataset}" + (f":{self.config}" if self.config else "")


def named_by(path: str | None, spec) -> HubSource | None:
    """`hub:ID` or `hub:ID:CONFIG` as a data path (`hub:nyu-mll/glue:sst2`); the spec's config applies when the
    path names the spec's own dataset without one."""
    if not path or not path.startswith("hub:"):
        return None
    dataset, _, config = path.removeprefix("hub:").partition(":")
    if not dataset:
        raise TasktuneError(f"data path {path!r}: expected hub:ID or hub:ID:CONFIG")
    config = config or (spec.data.hub_config if dataset == spec.data.hub else None)
    return HubSource(dataset, config, spec.data.hub_split)


def of_spec(spec) -> HubSource:
    """The task's own hub dataset, when no local file was found."""
    if not spec.data.hub:
        raise TasktuneError(f"task {spec.name!r}: no data file found (pass data.path=FILE or set "
                            "$TASKTUNE_DATA_DIR) and the task names no hub dataset")
    return HubSource(spec.data.hub, spec.data.hub_config, spec.data.hub_split)


def load(source: HubSource, task_name: str):
    """The split as a `datasets.Dataset` (non-empty). `datasets` is an extra: it is only needed here."""
    try:
        import datasets
    except ImportError as exc:
        raise TasktuneError(f"no local data file was found for task {task_name!r} and `datasets` is not installed "
                            f"for the hub ({source}): pass data.path, set $TASKTUNE_DATA_DIR, or "
                            "pip install 'tasktune[hub]'") from exc
    try:
        ds = datasets.load_dataset(source.dataset, source.config, split=source.split)
    except Exception as exc:  # the hub raises many types; all mean "not available"
        raise TasktuneError(f"cannot load {source.dataset!r} from the Hugging Face Hub (offline?): {exc}") from exc
    if len(ds) == 0:
        raise TasktuneError(f"{source} split {source.split!r} has no rows")
    return ds
