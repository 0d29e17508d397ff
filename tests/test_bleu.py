"""The paper's BLEU flavour (tensor2tensor's get_ende_bleu.sh) and Multi30k's, on sentences worked out by hand."""

from __future__ import annotations

import math

import pytest
from sacrebleu.metrics import BLEU

from transformer.bleu import multi30k_bleu, multi30k_tokenize, paper_bleu, paper_tokenize, split_compounds


def test_compounds_are_split_as_the_perl_one_liner_splits_them():
    assert split_compounds("rich-text format") == "rich ##AT##-##AT## text format"
    # s{(\S)-(\S)}{...}g matches do not overlap: after "a-b" the next match would need the "b" again.
    assert split_compounds("a-b-c") == "a ##AT##-##AT## b-c"
    assert split_compounds("a - b, -b, a-") == "a - b, -b, a-"


def test_moses_tokenization_escapes_and_splits_punctuation_as_tokenizer_perl():
    assert paper_tokenize(['Das ist ein "Test", oder?'], "de") == ["Das ist ein &quot; Test &quot; , oder ?"]
    assert paper_tokenize(["Der Hund-Besitzer läuft."], "de") == ["Der Hund ##AT##-##AT## Besitzer läuft ."]


def test_bleu_of_a_split_compound_is_the_hand_computed_value():
    # Tokens: Der Hund ##AT##-##AT## Besitzer läuft|rennt .  -> matches 5/6, 3/5, 2/4, 1/3; equal lengths.
    score, _ = paper_bleu(["Der Hund-Besitzer läuft."], ["Der Hund-Besitzer rennt."], "de")
    assert score == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-9)
    # Standard 13a keeps "Hund-Besitzer" whole: 3/4, 1/3, 0/2, 0/1 matches, the zeros smoothed by
    # sacreBLEU's "exp" method to 1/(2*2) and 1/(4*1): a much lower score for the same output.
    standard = BLEU().corpus_score(["Der Hund-Besitzer läuft."], [["Der Hund-Besitzer rennt."]]).score
    assert standard == pytest.approx(100 * (3 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25, abs=1e-9)


def test_brevity_penalty_is_applied_on_moses_tokens():
    # Hypothesis 6 tokens, reference 8: BP = exp(1 - 8/6); matches 6/6, 4/5, 3/4, 2/3.
    score, _ = paper_bleu(["Der Hund-Besitzer läuft."], ["Der Hund-Besitzer läuft heute schnell."], "de")
    assert score == pytest.approx(100 * math.exp(1 - 8 / 6) * (1 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25, abs=1e-9)


def test_no_smoothing_a_missing_order_of_ngrams_gives_zero_as_multi_bleu():
    score, _ = paper_bleu(["Ein Test"], ["Ein Test hier ."], "de")
    assert score == 0.0


@pytest.mark.parametrize("flavour", [paper_bleu, multi30k_bleu])
def test_mismatched_lengths_are_refused(flavour):
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        flavour(["a", "b"], ["a"], "en")


def test_multi30k_tokenization_lowercases_normalises_quotes_and_keeps_compounds():
    assert multi30k_tokenize(["Ein Mann sagt „Hallo“ – zum Hund-Besitzer."], "de") == [
        'ein mann sagt " hallo " - zum hund-besitzer .']
    assert multi30k_tokenize(["A man's dog."], "en") == ["a man 's dog ."]


def test_multi30k_bleu_ignores_case_and_quote_style_but_not_compounds():
    score, _ = multi30k_bleu(["Der Mann sagt „Hallo“ laut."], ['der mann sagt "hallo" laut.'], "de")
    assert score == pytest.approx(100.0, abs=1e-9)
    # Tokens: der hund-besitzer läuft|rennt . -> matches 3/4, 1/3, 0/2: unsmoothed, so 0, where the
    # paper's WMT14 flavour, splitting the compound, gives partial credit.
    score, _ = multi30k_bleu(["Der Hund-Besitzer läuft."], ["Der Hund-Besitzer rennt."], "de")
    assert score == 0.0
    # 7 tokens each, one wrong: 6/7, 4/6, 2/5, 1/4.
    score, _ = multi30k_bleu(["Ein Hund rennt über die Wiese."], ["ein HUND läuft über die Wiese ."], "de")
    assert score == pytest.approx(100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25, abs=1e-9)
