"""The one evaluation runner. Task types declare *requests* (score these continuations after this context,
generate from this prompt with this stop rule, classify this input); the runner executes them: it groups
requests that can share a batch, length-sorts and batches them (`infer.py` holds the batched kernels),
shards them across the processes of `accelerate launch` / `torchrun`, gathers the results in request order,
and times each call. No task calls the model itself.

Like lm-evaluation-harness's `Instance`s (loglikelihood / generate_until) executed by one `LM` class.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from tasktune import infer
from tasktune.inference_requests import Classify, Generate, Score  # noqa: F401 (the requests run here)
from tasktune.inference_requests import model_positions
from tasktune.memory import release


@dataclass(frozen=True)
class Generated:
    text: str
    watch_prob: float | None = None
    watch_is_top: bool | None = None
    watch_margin: float | None = None  # the watched token's logit minus the best other's at the first step


Request = Score | Generate | Classify


class RequestRunner(Protocol):
    """What executes requests: `Runner` (PyTorch, here) and `llama_cpp_runtime.LlamaCppRunner` (a GGUF file)."""
    positions: int | None  # the longest sequence the model reads
    shard: bool            # whether results came from several processes

    def run(self, requests: list[Request], desc: str = "evaluate") -> tuple[list, float, list[int]]: ...


class Runner:
    """Executes requests with one model. `shard=False` runs everything in this process (validation inside the
    Trainer's evaluation, which each process runs in full)."""

    def __init__(self, model, tokenizer, batch_size: int, shard: bool = True):
        self.model, self.tokenizer, self.batch_size, self.shard = model, tokenizer, batch_size, shard
        self.positions = model_positions(getattr(infer.unwrap(model), "config", None))

    def run(self, requests: list[Request], desc: str = "evaluate") -> tuple[list, float, list[int]]:
        """Results in request order (list[float] log-probs for Score, Generated, list[float] logits for
        Classify), the seconds taken (the slowest process's), and which process computed each result."""
        from accelerate import PartialState
        from accelerate.utils import gather_object

        state = PartialState()
        processes = state.num_processes if self.shard else 1
        rank = state.process_index if self.shard else 0
        mine = list(range(rank, len(requests), processes))
        start = time.perf_counter()
        results = self._execute([requests[i] for i in mine], desc)
        seconds = time.perf_counter() - start
        release()  # variable-shape batches leave freed blocks the allocator would otherwise keep
        if processes == 1:
            return results, seconds, [0] * len(requests)
        gathered = gather_object([(i, rank, r) for i, r in zip(mine, results)])
        ordered = sorted(gathered, key=lambda item: item[0])
        return [r for _, _, r in ordered], max(gather_object([seconds])), [p for _, p, _ in ordered]

    def _execute(self, requests: list[Request], desc: str) -> list:
        """Requests that share settings run as one batched call; results go back to their positions."""
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(_group_key(request), []).append(i)
        results: list = [None] * len(requests)
        for key, members in groups.items():
            for i, result in zip(members, self._run_group(key, [requests[i] for i in members], desc)):
                results[i] = result
        return results

    def _run_group(self, key: tuple, group: list[Request], desc: str) -> list:
        """One group at the largest batch that fits: accelerate's `find_executable_batch_size` retries after an
        out-of-memory error, here at half the batch (said on the console); later groups start from what fitted."""
        from accelerate.utils import find_executable_batch_size

        def halve() -> int:
            return self.batch_size // 2

        @find_executable_batch_size(starting_batch_size=self.batch_size, reduce_batch_size_fn=halve)
        def at_batch_size(batch_size: int) -> list:
            if batch_size != self.batch_size:
                print(f"[tasktune] out of memory at evaluation batch {self.batch_size}: trying {batch_size}")
                self.batch_size = batch_size
            return self._run_group_at(key, group, desc)

        return at_batch_size()

    def _run_group_at(self, key: tuple, group: list[Request], desc: str) -> list:
        pad = self.tokenizer.pad_token_id
        kind = key[0]
        if kind is Score:
            continuations = [list(c) for c in key[1]]
            contexts = [list(r.context) for r in group]
            if all(len(c) == 1 for c in continuations):  # one forward per request, head at the last position
                logprobs = infer.score_tokens(self.model, contexts, [c[0] for c in continuations], pad,
                                              self.batch_size, desc)
            else:  # one row per (request, continuation), summed over the continuation's tokens
                logprobs = infer.score_continuations(self.model, contexts, continuations, pad, self.batch_size,
                                                     desc)
            return logprobs.tolist()
        if kind is Classify:
            return infer.classify(self.model, [list(r.input) for r in group], pad, self.batch_size, desc).tolist()
        _, max_new_tokens, stop_at_newline, watch, suppress, stop_strings = key
        out = infer.generate(self.model, self.tokenizer, [list(r.prompt) for r in group], max_new_tokens,
                             self.batch_size, stop_at_newline=stop_at_newline, first_token_id=watch,
                             suppress_first=suppress, stop_strings=stop_strings, desc=desc)
        if watch is None:
            return [Generated(text) for text in out.texts]
        watched = zip(out.texts, out.first_token_probs, out.first_token_is_top, out.first_token_margins)
        return [Generated(text, prob, top, margin) for text, prob, top, margin in watched]


def _group_key(request: Request) -> tuple:
    if isinstance(request, Score):
        return (Score, request.continuations)
    if isinstance(request, Classify):
        return (Classify,)
    return (Generate, request.max_new_tokens, request.stop_at_newline, request.watch_token,
            request.suppress_watch_token, request.stop_strings)
