"""BLEU / METEOR / ROUGE against published values."""

import pytest

from tasktune.metrics import text_overlap


def test_bleu_matches_sacrebleu_published_example():
    # sacrebleu's README example: BLEU = 48.53.
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [["The dog bit the man.", "The dog had bit the man."],
            ["It was not unexpected.", "No one was surprised."],
            ["The man bit him first.", "The man had bitten the dog."]]
    assert text_overlap.bleu(hyps, refs)["bleu"] == pytest.approx(48.53, abs=0.01)


def test_corpus_bleu_is_zero_for_short_answers_but_smoothed_is_not():
    scores = text_overlap.bleu(["Paris", "the Seine"], [["Paris"], ["the Seine"]])
    assert scores["bleu"] == 0.0  # no 4-grams anywhere
    assert scores["bleu_smoothed"] == pytest.approx(100.0)  # effective order: exact short matches


def test_meteor_matches_nltk_documented_example():
    if not text_overlap.wordnet_available():
        pytest.skip("WordNet (Debian wordnet-base + wordnet-sense-index) is not installed")
    hyp = "It is a guide to action which ensures that the military always obeys the commands of the party"
    ref = "It is a guide to action that ensures that the military will forever heed Party commands"
    key, value = text_overlap.meteor([hyp], [[ref]])
    assert key == "meteor" and round(value, 4) == 0.6944  # nltk's doctest value


def test_meteor_without_wordnet_says_so(monkeypatch):
    monkeypatch.setattr(text_overlap, "wordnet_available", lambda: False)
    key, value = text_overlap.meteor(["the cat sat"], [["the cat sat"]])
    assert key == "meteor_exact_stem" and value > 0.9


def test_lexnames_table_has_45_files():
    table = text_overlap._lexnames_table().splitlines()
    assert len(table) == 45 and table[0] == "00\tadj.all\t3" and table[44] == "44\tadj.ppl\t3"


def test_rouge_with_stemming_and_best_reference():
    scores = text_overlap.rouge(["the cats sat"], [["a dog", "the cat sat"]])
    assert scores["rouge1"] == pytest.approx(1.0) and scores["rougeL"] == pytest.approx(1.0)
