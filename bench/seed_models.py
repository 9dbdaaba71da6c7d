"""The seed's models as local model directories, with random weights: their published architectures
(bench/model_shapes.py) and a tokenizer trained here, shaped like each model's own. Nothing is downloaded, so the
same directories exist on this machine, in CI and on a lent GPU machine (which reaches nothing outside).

- `llama-3.2-1b`: Llama 3's special tokens (`<|begin_of_text|>`, `<|end_of_text|>`) and, as Llama 3's tokenizer,
  no padding token: tasktune pads with the end-of-text token.
- `gemma-2-2b`: Gemma's `<bos>`/`<eos>`/`<pad>`, eager attention with logit soft-capping (as tasktune loads it).
- `gemma-2-2b-it`: the same with Gemma's chat turns (`<start_of_turn>user ... <end_of_turn>`) as its chat
  template, for `eval.prompt_format: chat`.

The tokenizer is a byte-level BPE trained on the embedded SST-2 sentences and SQuAD v2 paragraphs (a few
seconds); its ids are below every seed vocabulary, so a model keeps its published vocabulary size. `layers` and
`vocab` shrink a model where the CPU's budget needs it (hidden size, heads and everything else stay published).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_shapes import CONFIGS  # noqa: E402

TOKENIZER_VOCAB = 4096
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
SPECIALS = {"llama": {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": None},
            "gemma": {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}}
SEED_MODELS = {"llama-3.2-1b": ("llama-3.2-1b", "llama", False), "gemma-2-2b": ("gemma-2-2b", "gemma", False),
               "gemma-2-2b-it": ("gemma-2-2b", "gemma", True)}


def corpus() -> list[str]:
    """Text to train the tokenizer on: the embedded SST-2 sentences and SQuAD v2 paragraphs, and prompts of both
    tasks with their answers, so that the verbalizers (" positive", " negative") and the abstain word are single
    tokens, as they are in the seed models' own tokenizers."""
    from tasktune.tasks import get_task

    sst2_task, squad_task = get_task("sst2"), get_task("squad_v2")
    sst2, _ = sst2_task.load(None)
    squad, _ = squad_task.load(None)
    prompts = [sst2_task.spec.template.format_map(r) + sst2_task.verbalizers[r["label"]] for r in sst2[:4000]]
    prompts += [squad_task.spec.template.format_map(r) + " unanswerable" for r in squad[:2000]]
    return [r["text"] for r in sst2[:20000]] + list(dict.fromkeys(r["context"] for r in squad)) + prompts


def save_tokenizer(out: Path, family: str, chat: bool, texts: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    names = SPECIALS[family]
    specials = [t for t in (names["pad"], names["bos"], names["eos"]) if t]
    if chat:
        specials += ["<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = names["bos"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=names["eos"],
                                   pad_token=names["pad"], padding_side="left")
    if chat:
        fast.chat_template = GEMMA_CHAT_TEMPLATE
    fast.save_pretrained(out)


def make_seed_model(out: Path, name: str, layers: int | None = None, vocab: int | None = None,
                    texts: list[str] | None = None, seed: int = 0) -> Path:
    """A random-weight `name` (a key of SEED_MODELS) saved with its tokenizer under `out`; returns `out`."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    shape, family, chat = SEED_MODELS[name]
    cls_name, kwargs = CONFIGS[shape]
    kwargs = copy.deepcopy(kwargs)
    if layers is not None:
        kwargs["num_hidden_layers"] = layers
    if vocab is not None:
        kwargs["vocab_size"] = vocab
    save_tokenizer(out, family, chat, texts if texts is not None else corpus())
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    config = getattr(transformers, cls_name)(**kwargs, **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    return out
