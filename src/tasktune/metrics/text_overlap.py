"""BLEU (sacrebleu), ROUGE-1/2/L (rouge-score) and METEOR (nltk + WordNet), all offline.

WordNet comes from Debian's `wordnet-base` + `wordnet-sense-index` (/usr/share/wordnet), copied (nltk refuses
symlinks) into an nltk_data folder in the tasktune cache with the `lexnames` table those packages lack.
Without WordNet, METEOR runs with exact + stem matching only and is reported as `meteor_exact_stem`.
"""

from __future__ import annotations

import shutil
from functools import lru_cache
from pathlib import Path

WORDNET_SOURCES = (Path("/usr/share/wordnet"),)
# WordNet 3.0's lexicographer files (wninput(5WN)/lexnames(5WN)): number, name, syntactic category.
LEXNAMES = """adj.all 3|adj.pert 3|adv.all 4|noun.Tops 1|noun.act 1|noun.animal 1|noun.artifact 1|noun.attribute 1|
noun.body 1|noun.cognition 1|noun.communication 1|noun.event 1|noun.feeling 1|noun.food 1|noun.group 1|
noun.location 1|noun.motive 1|noun.object 1|noun.person 1|noun.phenomenon 1|noun.plant 1|noun.possession 1|
noun.process 1|noun.quantity 1|noun.relation 1|noun.shape 1|noun.state 1|noun.substance 1|noun.time 1|
verb.body 2|verb.change 2|verb.cognition 2|verb.communication 2|verb.competition 2|verb.consumption 2|
verb.contact 2|verb.creation 2|verb.emotion 2|verb.motion 2|verb.perception 2|verb.possession 2|verb.social 2|
verb.stative 2|verb.weather 2|adj.ppl 3"""


def _lexnames_table() -> str:
    entries = [e.strip() for e in LEXNAMES.replace("\n", "").split("|")]
    return "".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(e.split() for e in entries))


@lru_cache(maxsize=1)
def wordnet_available() -> bool:
    """Make nltk find WordNet without its downloader; True when WordNet loads."""
    import nltk

    from tasktune.cache import cache_dir

    root = cache_dir() / "nltk_data"
    target = root / "corpora" / "wordnet"
    if not (target / "lexnames").is_file():
        source = next((s for s in WORDNET_SOURCES if (s / "data.noun").is_file()), None)
        if source is not None:
            tmp = target.with_name("wordnet.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp, symlinks=False)
            (tmp / "lexnames").write_text(_lexnames_table())
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return bool(wordnet.synsets("dog"))
    except LookupError:
        return False


def _tokenize(text: str) -> list[str]:
    from nltk.tokenize import word_tokenize

    return word_tokenize(text, preserve_line=True)  # preserve_line: no punkt sentence model needed


class _NoWordNet:
    """Stands in for WordNet in nltk's METEOR: no synonyms, so only exact and stem matches count."""

    @staticmethod
    def synsets(*_args, **_kwargs):
        return []


def meteor(predictions: list[str], references: list[list[str]]) -> tuple[str, float]:
    """Mean sentence METEOR over examples; the key says whether WordNet synonyms were used."""
    from nltk.translate.meteor_score import meteor_score

    if wordnet_available():
        from nltk.corpus import wordnet
        key, wn = "meteor", wordnet
    else:
        key, wn = "meteor_exact_stem", _NoWordNet()
    scores = [meteor_score([_tokenize(r) for r in refs], _tokenize(pred), wordnet=wn)
              for pred, refs in zip(predictions, references)]
    return key, sum(scores) / len(scores) if scores else 0.0


def bleu(predictions: list[str], references: list[list[str]]) -> dict:
    """`bleu`: corpus BLEU-4 without smoothing (0 when no prediction has a matching 4-gram);
    `bleu_smoothed`: mean sentence-level BLEU with exponential smoothing and effective order."""
    import sacrebleu

    streams = max(len(r) for r in references)
    # sacrebleu wants equal-length reference streams: repeat an example's last reference to fill.
    ref_streams = [[refs[min(i, len(refs) - 1)] for refs in references] for i in range(streams)]
    corpus = sacrebleu.corpus_bleu(predictions, ref_streams, smooth_method="none")
    sentence = [sacrebleu.sentence_bleu(p, refs).score for p, refs in zip(predictions, references)]
    return {"bleu": corpus.score, "bleu_smoothed": sum(sentence) / len(sentence) if sentence else 0.0}


def rouge(predictions: list[str], references: list[list[str]]) -> dict:
    """Mean ROUGE-1/2/L F-measure with the Porter stemmer, best reference per example (no bootstrap)."""
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeL")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = dict.fromkeys(kinds, 0.0)
    for pred, refs in zip(predictions, references):
        scores = scorer.score_multi(refs, pred)
        for k in kinds:
            totals[k] += scores[k].fmeasure
    n = max(len(predictions), 1)
    return {k: v / n for k, v in totals.items()}


def text_overlap_metrics(predictions: list[str], references: list[list[str]]) -> dict:
    key, value = meteor(predictions, references)
    return {**bleu(predictions, references), key: value, **rouge(predictions, references)}
