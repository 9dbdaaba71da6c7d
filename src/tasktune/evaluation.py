"""Evaluation of one model on examples of one task: the task declares requests per protocol, the runner
executes them, the task turns the results into prediction records and the records into metrics.

Every caller goes through here: the pipeline's zero-shot and fine-tuned stages, the validation that drives
early stopping, `tasktune eval` and the Python API.
"""

from __future__ import annotations

from tasktune.inference_requests import check_positions
from tasktune.runner import RequestRunner


def predict(task, runner: RequestRunner, builder, examples: list[dict], protocols: list[str], head: str = "causal_lm",
            generate_ids: set | None = None) -> tuple[list[dict], dict]:
    """One prediction record per example, and the seconds each protocol took.

    `generate_ids` restricts the task's sampled protocols (classification's slower `generate`) to those ids.
    """
    records = task.new_records(examples)
    seconds = {}
    for protocol in task.protocols(protocols, head):
        chosen = [i for i, ex in enumerate(examples)
                  if protocol not in task.sampled_protocols or generate_ids is None or ex["id"] in generate_ids]
        if not chosen:
            continue
        requests, notes = task.requests(builder, [examples[i] for i in chosen], protocol)
        check_positions(requests, [examples[i] for i in chosen], runner.positions, "the evaluated data")
        results, seconds[protocol], processes = runner.run(requests, desc=protocol)
        for i, note, process in zip(chosen, notes, processes):
            records[i].update(note)
            if runner.shard and max(processes) > 0:  # which process predicted it (several under a launcher)
                records[i].setdefault("process", process)
        task.read_results([records[i] for i in chosen], protocol, results)
    return records, seconds


def choose_threshold(task, runner: RequestRunner, builder, validation: list[dict]) -> float | None:
    """The task's decision threshold chosen on the validation slice, when its type has one (extractive QA's
    abstention); None for classification (argmax decides)."""
    if task.calibration_protocol is None or not validation:
        return None
    records, _ = predict(task, runner, builder, validation, [task.calibration_protocol])
    return task.choose_threshold(records)


def validation_records(task, runner: RequestRunner, builder, validation: list[dict], head: str = "causal_lm") -> list[dict]:
    """The prediction records of the validation slice, under the task's validation protocol."""
    records, _ = predict(task, runner, builder, validation, [task.validation_protocol(head)], head)
    return records


def validation_metrics(task, runner: RequestRunner, builder, validation: list[dict], head: str = "causal_lm") -> dict:
    """The metric early stopping reads, on the validation slice."""
    return task.validation_metrics(validation_records(task, runner, builder, validation, head))


def validation_figure(task, records: list[dict], head: str = "causal_lm") -> dict:
    """The validation slice's figure (the task's metric with its 95% interval and n) from its records."""
    return task.figure(task.score(records), column=task.validation_protocol(head))


def evaluate(task, runner: RequestRunner, builder, examples: list[dict], protocols: list[str], head: str = "causal_lm",
             generate_ids: set | None = None, validation: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """Metrics and prediction records. With `validation`, a task whose decisions need a threshold chooses it
    there first and reports the calibrated decision beside the raw one."""
    threshold = choose_threshold(task, runner, builder, validation or [])
    records, seconds = predict(task, runner, builder, examples, protocols, head, generate_ids)
    extra = {} if threshold is None else {"na_threshold": threshold}
    return task.score(records, seconds, **extra), records
