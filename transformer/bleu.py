"""BLEU the way papers computed it, beside standard sacreBLEU: the paper's WMT14 flavour and Multi30k's.

The paper's 27.3/28.4 (and most papers of its time) are not sacreBLEU scores: tensor2tensor's
``get_ende_bleu.sh`` Moses-tokenizes hypotheses and references (``tokenizer.perl -l de``), splits
hyphenated compounds into ``word ##AT##-##AT## word`` (as Stanford's and GNMT's evaluations did), and
counts with ``multi-bleu.perl``: case-sensitive, on those tokens, without smoothing. Splitting
compounds gives partial credit for half of a compound, so this flavour is usually higher than
sacreBLEU's detokenized 13a score on the same output. Here ``sacremoses`` (a Python port of the
Moses tokenizer) tokenizes and sacreBLEU counts, with its own tokenization switched off.

Multi30k results (e.g. the text-only baselines of multimodal translation papers) are scored on the
dataset's customary preprocessing instead: lowercased, punctuation-normalised
(``normalize-punctuation.perl``) and Moses-tokenized text, counted by fairseq's or ``multi-bleu.perl``'s
tokenized BLEU, without compound splitting.

This module imports nothing from the rest of the package, and ``sacremoses`` only when a tokenized
flavour is asked for, so that standard sacreBLEU needs nothing more than sacreBLEU.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from sacrebleu.metrics import BLEU

# perl -ple 's{(\S)-(\S)}{$1 ##AT##-##AT## $2}g': non-overlapping, left to right, like re.sub.
_COMPOUND = re.compile(r"(\S)-(\S)")

PAPER_LABEL = "BLEU (paper: Moses-tokenized, compounds split, multi-bleu counting)"
MULTI30K_LABEL = "BLEU (Multi30k papers: lowercased, punctuation-normalised, Moses-tokenized)"
STANDARD_LABEL = "BLEU (standard sacreBLEU, on detokenized text)"
FLAVOUR_LABELS = {"paper": PAPER_LABEL, "multi30k": MULTI30K_LABEL}  # by `tokenized_bleu` flavour


def moses() -> Any:
    """The sacremoses module, which the tokenized flavours need (imported here, not with this module).

    Raises:
        ImportError: one line saying how to install it.
    """
    try:
        import sacremoses
    except ImportError:
        raise ImportError("the paper's and Multi30k's BLEU flavours need sacremoses (Moses tokenization): "
                          "pip install sacremoses") from None
    return sacremoses


def split_compounds(text: str) -> str:
    """Mark hyphens inside words as their own tokens: ``rich-text`` -> ``rich ##AT##-##AT## text``."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", text)


def paper_tokenize(texts: Sequence[str], lang: str) -> list[str]:
    """Moses-tokenize (with Moses' default XML escaping) and split compounds, as ``get_ende_bleu.sh``.

    Args:
        texts: detokenized sentences.
        lang: language code of the sentences (Moses' rules differ, e.g. for apostrophes in ``en``).

    Returns:
        Space-separated tokens per sentence.
    """
    tokenizer = moses().MosesTokenizer(lang=lang)
    return [split_compounds(tokenizer.tokenize(text, return_str=True)) for text in texts]


def multi30k_tokenize(texts: Sequence[str], lang: str) -> list[str]:
    """Lowercase, normalise punctuation and Moses-tokenize, as Multi30k's preprocessing scripts do.

    Args:
        texts: detokenized sentences.
        lang: language code of the sentences.

    Returns:
        Space-separated lowercase tokens per sentence.
    """
    sacremoses = moses()
    normalizer, tokenizer = sacremoses.MosesPunctNormalizer(lang=lang), sacremoses.MosesTokenizer(lang=lang)
    return [tokenizer.tokenize(normalizer.normalize(text.lower()), return_str=True, escape=False) for text in texts]


def tokenized_bleu(
    hypotheses: Sequence[str], references: Sequence[str], lang: str, flavour: str = "paper"
) -> tuple[float, str]:
    """Corpus BLEU counted on tokens the way ``multi-bleu.perl`` counts them (no smoothing).

    Args:
        hypotheses: detokenized system outputs.
        references: one detokenized reference per hypothesis.
        lang: target language code.
        flavour: "paper" (the paper's WMT14 flavour, `paper_tokenize`) or "multi30k" (Multi30k
            papers' flavour, `multi30k_tokenize`).

    Returns:
        ``(score, details)``: BLEU in [0, 100] and sacreBLEU's line with the n-gram precisions and
        brevity penalty.

    Raises:
        ValueError: if the two lists differ in length or are empty, or for an unknown flavour.
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:  # sacreBLEU fails on an empty corpus with an IndexError
        raise ValueError("no sentences to score")
    if flavour not in FLAVOUR_LABELS:
        raise ValueError(f"unknown BLEU flavour {flavour!r}; known: {', '.join(FLAVOUR_LABELS)}")
    tokenize = {"paper": paper_tokenize, "multi30k": multi30k_tokenize}[flavour]
    bleu = BLEU(tokenize="none", smooth_method="none", force=True)
    score = bleu.corpus_score(tokenize(hypotheses, lang), [tokenize(references, lang)])
    return score.score, str(score)


def paper_bleu(hypotheses: Sequence[str], references: Sequence[str], lang: str) -> tuple[float, str]:
    """Corpus BLEU in the paper's flavour: ``get_ende_bleu.sh`` tokenization, ``multi-bleu.perl`` counting."""
    return tokenized_bleu(hypotheses, references, lang, "paper")


def multi30k_bleu(hypotheses: Sequence[str], references: Sequence[str], lang: str) -> tuple[float, str]:
    """Corpus BLEU as Multi30k papers report it: lowercased, normalised, tokenized, unsmoothed counting."""
    return tokenized_bleu(hypotheses, references, lang, "multi30k")
