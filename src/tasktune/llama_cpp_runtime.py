"""The same requests, executed by llama.cpp (through llama-cpp-python) on a GGUF file: what a user ships to
llama.cpp, Ollama or LM Studio, measured with the protocol the adapter was measured with.

`LlamaCppRunner` has the `RequestRunner` contract of `runner.Runner`: task types declare `Score` / `Generate`
requests in token ids, and this runner feeds those ids to llama.cpp (so a prompt is the same prompt in both
runtimes) and reads llama.cpp's own logits: a `Score` is the summed log-softmax of each continuation token, a
`Generate` is greedy decoding (argmax of the runtime's logits at each step) until an end-of-generation token of
the GGUF's vocabulary, a newline or stop text where asked, or `max_new_tokens`, detokenized by llama.cpp.
`tokenizer_agreement` says whether llama.cpp's own tokenizer gives the same ids for the prompt texts (a runtime
fed text, as Ollama's server is, tokenizes them itself); a disagreement is reported with the rows.

One sequence at a time (llama.cpp's Python API has no batched greedy decoding); the context's KV cache is kept
while a Score request's continuations are read, one token per step.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from tasktune.errors import TasktuneError
from tasktune.inference_requests import Classify, Generate, Score
from tasktune.runner import Generated


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise TasktuneError("running a GGUF file through llama.cpp needs llama-cpp-python: pip install "
                            "'tasktune[llama-cpp]' (it builds llama.cpp from source: about 5 minutes on 2 cores with "
                            "CMAKE_ARGS=-DLLAVA_BUILD=OFF)"
                            ) from None
    return llama_cpp


def cpu_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_gguf(model: Path, adapter: Path | None = None, n_ctx: int = 2048):
    """A llama.cpp model on the CPU, quiet, with a LoRA adapter GGUF applied at its alpha when given."""
    llama_cpp = require_llama_cpp()
    for path, what in ((model, "model"), (adapter, "adapter")):
        if path is not None and not Path(path).is_file():
            raise TasktuneError(f"{what} {path} is not a file (expected a .gguf file)")
    try:
        return llama_cpp.Llama(model_path=str(model), lora_path=str(adapter) if adapter else None, n_ctx=n_ctx,
                               n_threads=cpu_threads(), n_gpu_layers=0, logits_all=False, verbose=False, seed=0)
    except (ValueError, RuntimeError) as exc:  # llama-cpp-python's errors for a file it cannot load
        raise TasktuneError(f"llama.cpp cannot load {model}" + (f" with {adapter}" if adapter else "")
                            + f": {exc}") from None


def check_gguf_inputs(model: str, adapter: str | None) -> None:
    """`--runtime llama.cpp` reads GGUF files only: refused in one line before anything loads."""
    for path, what in ((model, "--model"), (adapter, "--adapter")):
        if path is None:
            continue
        if not str(path).endswith(".gguf") or not Path(path).is_file():
            raise TasktuneError(f"{what} {path}: --runtime llama.cpp needs a .gguf file (a model exported with "
                                "`tasktune export RUN --gguf TYPE`, or a base GGUF with --adapter FILE.gguf)")
    require_llama_cpp()


def compare_with_run(task, run_dir: Path, shipped_dir: Path, columns: list[str]) -> dict:
    """Each test row's shipped prediction against the run's fine-tuned one on the same rows: the task's paired
    tests (adapter first, so a gain is what shipping added) and, per report column, how often the decisions
    (`task.decision_key`) agree."""
    from tasktune.run_layout import RunLayout, read_jsonl

    adapter = read_jsonl(RunLayout.predictions(RunLayout(run_dir).stage("finetuned")))
    shipped = read_jsonl(RunLayout.predictions(shipped_dir))
    by_id = {r["id"]: r for r in adapter}
    agreement = {}
    for column in columns:
        key = task.decision_key(column)
        pairs = [(r[key], by_id[r["id"]][key]) for r in shipped if key in r and key in by_id.get(r["id"], {})]
        if pairs:
            agreement[column] = {"key": key, "n": len(pairs), "same": sum(a == b for a, b in pairs)}
    return {"adapter_predictions": str(RunLayout(run_dir).stage("finetuned")),
            "paired": task.paired(adapter, shipped), "agreement": agreement}


class LlamaCppRunner:
    """Executes requests with llama.cpp; results as `runner.Runner` gives them."""

    shard = False  # one process: llama.cpp uses the CPU's threads itself

    def __init__(self, llm):
        self.llm = llm
        self.positions = llm.n_ctx()
        self.n_vocab = llm.n_vocab()
        self.llama_cpp = require_llama_cpp()
        self.vocab = self.llama_cpp.llama_model_get_vocab(llm.model)

    def run(self, requests: list, desc: str = "evaluate") -> tuple[list, float, list[int]]:
        from tasktune.infer import progress

        start = time.perf_counter()
        results = []
        for request in progress(requests, f"{desc} (llama.cpp)"):
            if isinstance(request, Score):
                results.append(self.score(request))
            elif isinstance(request, Generate):
                results.append(self.generate(request))
            elif isinstance(request, Classify):
                raise TasktuneError("a classification head (seqcls) has no GGUF form; llama.cpp runs causal LMs")
            else:
                raise TasktuneError(f"llama.cpp cannot run a {type(request).__name__} request")
        return results, time.perf_counter() - start, [0] * len(requests)

    def last_logits(self) -> np.ndarray:
        """The logits after the last token evaluated (llama.cpp keeps only that row without `logits_all`)."""
        pointer = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).astype(np.float64)

    @staticmethod
    def log_softmax(logits: np.ndarray) -> np.ndarray:
        shifted = logits - logits.max()
        return shifted - np.log(np.exp(shifted).sum())

    def evaluate_from_start(self, tokens: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(tokens)

    def score(self, request: Score) -> list[float]:
        context = list(request.context)
        self.evaluate_from_start(context)
        after_context = self.log_softmax(self.last_logits())
        sums = []
        for continuation in request.continuations:
            total, logprobs = 0.0, after_context
            self.llm.n_tokens = len(context)  # the next eval drops what came after the context from the cache
            for i, token in enumerate(continuation):
                total += float(logprobs[token])
                if i + 1 < len(continuation):
                    self.llm.eval([token])
                    logprobs = self.log_softmax(self.last_logits())
            sums.append(total)
        return sums

    def generate(self, request: Generate) -> Generated:
        from tasktune.infer import cut_at_stops

        self.evaluate_from_start(list(request.prompt))
        new: list[int] = []
        watch = {}
        text = ""
        for step in range(request.max_new_tokens):
            logits = self.last_logits()
            if step == 0 and request.watch_token is not None:
                token = request.watch_token
                others = logits.copy()
                others[token] = -np.inf
                watch = {"watch_prob": float(np.exp(self.log_softmax(logits)[token])),
                         "watch_is_top": bool(logits.argmax() == token),
                         "watch_margin": float(logits[token] - others.max())}
                if request.suppress_watch_token:
                    logits = others
            token = int(logits.argmax())
            if self.llama_cpp.llama_vocab_is_eog(self.vocab, token):
                break
            new.append(token)
            text = self.llm.detokenize(new).decode("utf-8", errors="replace")
            if (request.stop_at_newline and "\n" in text) or any(s in text for s in request.stop_strings):
                break
            self.llm.eval([token])
        if request.stop_at_newline:
            text = text.split("\n", 1)[0]
        text = cut_at_stops(text, request.stop_strings)
        return Generated(text, **watch)

    def tokenizer_agreement(self, builder, examples: list[dict], shown: int = 5) -> dict:
        """Whether llama.cpp's tokenizer gives the prompts the Hugging Face tokenizer's ids (the rows evaluated):
        the count, and the first rows that differ with where."""
        differ = []
        for example in examples:
            text = builder.render(example)
            ours = builder.encode(text)
            theirs = self.llm.tokenize(text.encode("utf-8"), add_bos=builder.add_special_tokens, special=True)
            if ours != theirs:
                at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                differ.append({"id": example["id"], "position": at, "hugging_face": ours[at:at + 4],
                               "llama_cpp": theirs[at:at + 4]})
        return {"rows": len(examples), "same_ids": len(examples) - len(differ), "differ": differ[:shown]}
