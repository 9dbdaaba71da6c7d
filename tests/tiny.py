"""Tiny random causal LMs (hidden 64, 2 layers) with a word-level tokenizer, saved like a hub model.

They go through the same `--model DIR` code path as a real model; a LoRA step takes milliseconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

POSITIVE_WORDS = ["good", "great", "lovely", "brilliant", "fun", "charming", "moving", "superb"]
NEGATIVE_WORDS = ["bad", "awful", "dull", "boring", "messy", "tedious", "weak", "clumsy"]
FILLER = ["the", "film", "movie", "story", "is", "was", "a", "an", "very", "quite", "and", "but", "plot",
          "acting", "really", "so", "of", "it", "this", "cast"]
PROMPT_WORDS = ["Question", "Is", "this", "sentence", "positive", "or", "negative", "Answer", "?", ":", ".",
                ",", "Title", "Context", "unanswerable", "when", "who", "what", "where", "Paris", "France",
                "capital", "in", "1900", "born", "city", "river", "Seine", "flows", "through", "answer"]
# The words of examples/news-topics (its prompt and multi-token label words).
NEWS_WORDS = ["Headline", "Topic", "world", "news", "sports", "business", "finance", "science", "technology",
              "wins", "title", "shares", "rise", "new", "planet", "election"]
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
VOCAB = SPECIALS + sorted(set(POSITIVE_WORDS + NEGATIVE_WORDS + FILLER + PROMPT_WORDS))
NEWS_VOCAB = VOCAB + sorted(set(NEWS_WORDS) - set(VOCAB))


# `tasktune run` of the shipped SST-2 recipe on a tiny model: no cost checks and no compile (these tests are not
# about them), fp32, every row (not the recipe's whole sentences only), 16 validation rows. Later overrides win, so
# a test's `extra` can change any of them.
TINY_RUN_RECIPE = "sst2-gemma3-270m-cpu"
TINY_RUN_OVERRIDES = ["eval.controls=[]", "eval.perplexity=null", "train.compile=false", "dtype=fp32",
                      "data.val_size=16", "data.limit_validation=null", "data.limit_train=null",
                      "data.train_sentences=null", "eval.limit_generate=null"]


def run_args(model, data, out, name="r", *extra, steps=4, eval_steps=2, batch_size=4, protocols="score"):
    """The argv of a short tiny-model `tasktune run`; `protocols=None` keeps the recipe's own."""
    return ["run", TINY_RUN_RECIPE, *TINY_RUN_OVERRIDES, f"model={model}", f"data.path={data}",
            f"output_dir={out}", f"name={name}", *([f"eval.protocols={protocols}"] if protocols else []),
            f"train.max_steps={steps}", f"train.eval_steps={eval_steps}", f"train.batch_size={batch_size}", *extra]


def save_tokenizer(out: Path, vocab: list[str] = VOCAB) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")
    fast.save_pretrained(out)


def tiny_config(arch: str, vocab_size: int = len(VOCAB)):
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "gemma2":
        return Gemma2Config(**common, head_dim=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                            sliding_window=16)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=16)
    raise ValueError(arch)


def make_tiny_model(out: Path, arch: str = "llama", seed: int = 0, vocab: list[str] = VOCAB) -> Path:
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(vocab)))
    model.save_pretrained(out)
    save_tokenizer(out, vocab)
    return out


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Synthetic SST-2-like rows: the label is carried by one sentiment word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        word = rng.choice(POSITIVE_WORDS if label else NEGATIVE_WORDS)
        words = rng.sample(FILLER, rng.randint(2, 7)) + [word]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_sst2_tsv(path: Path, n: int = 120, seed: int = 0) -> Path:
    lines = ["sentence\tlabel"] + [f"{s} \t{l}" for s, l in sentiment_rows(n, seed)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_sst2_jsonl(path: Path, n: int = 40, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps({"sentence": s, "label": l}) + "\n" for s, l in sentiment_rows(n, seed)))
    return path


def squad_doc(n_articles: int = 4) -> dict:
    """A small official-layout SQuAD v2 document with answerable and unanswerable questions."""
    data = []
    for a in range(n_articles):
        qas = [
            {"id": f"a{a}-q1", "question": "what is the capital of France ?", "is_impossible": False,
             "answers": [{"text": "Paris", "answer_start": 0}, {"text": "Paris", "answer_start": 0}]},
            {"id": f"a{a}-q2", "question": "what river flows through Paris ?", "is_impossible": False,
             "answers": [{"text": "the Seine", "answer_start": 33}]},
            {"id": f"a{a}-q3", "question": "who was born in 1900 ?", "is_impossible": True, "answers": [],
             "plausible_answers": [{"text": "Paris", "answer_start": 0}]},
        ]
        context = "Paris is the capital of France . the Seine flows through the city ."
        data.append({"title": f"Article_{a}", "paragraphs": [{"context": context, "qas": qas}]})
    return {"version": "v2.0", "data": data}


def write_squad_json(path: Path, n_articles: int = 4) -> Path:
    path.write_text(json.dumps(squad_doc(n_articles)))
    return path
