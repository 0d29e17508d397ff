"""Write a WMT14-sized English-German stand-in corpus built from Multi30k sentences.

    python scripts/make_corpus.py --multi30k ../shared/data/multi30k --out data/wmt14_standin --pairs 4500000

WMT14 en-de has 4.5M training pairs of about 23 words a side (25-30 subwords at a 37k shared BPE
vocabulary), with a long tail of long sentences, and hundreds of thousands of word types per
language. Multi30k has short sentences (about 12 words) and only ~15k English / ~25k German types,
which would make tokenizer training and encoding look cheaper than they are. So each stand-in pair:

- joins 1 + Poisson(1) aligned Multi30k pairs (mean 2, tail to 6), giving WMT-like lengths;
- carries rare words drawn from Zipf distributions over very large pools, as a web-crawled corpus
  does: German noun compounds (``Hund`` + ``Straße`` -> ``Hundstraße``-style joins of two real
  nouns), English hyphenated compounds of two real words (``dog-street``), and proper names built
  from syllables that appear on both sides.

The script counts and prints the word types of what it wrote. The validation and test splits are
Multi30k's own, copied, so that a training run on the stand-in validates on real sentences.
Output: ``{out}/train.{en,de}.gz``, ``{out}/val.{en,de}.gz``, ``{out}/test_2016_flickr.{en,de}.gz``.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import sys
import time
from pathlib import Path

import numpy as np

SYLLABLES = ("ka", "lo", "mi", "ra", "ten", "vos", "dri", "sha", "bel", "gor", "nu", "fe", "zan", "quil", "tor",
             "pe", "wy", "hal", "don", "ix", "mar", "sel", "ku", "bra", "jen", "ost", "lu", "ve", "cas", "rin")
CHUNK = 100_000


def read(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.strip() for line in f]


def zipf_index(rng: np.random.Generator, size: int, pool: int, a: float) -> np.ndarray:
    """Indices in [0, pool) with Zipf(a) frequencies (index 0 the most frequent)."""
    return (rng.zipf(a, size) - 1) % pool


def name(i: int) -> str:
    """The i-th synthetic proper name: 2-4 syllables, capitalised, distinct for distinct i."""
    parts, n = [], i + len(SYLLABLES)
    while n:
        n, r = divmod(n, len(SYLLABLES))
        parts.append(SYLLABLES[r])
    return "".join(parts).capitalize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--multi30k", type=Path, default=Path("../shared/data/multi30k"), help="folder of SPLIT.LANG.gz")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--pairs", type=int, default=4_500_000, help="training pairs to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    en, de = read(args.multi30k / "train.en.gz"), read(args.multi30k / "train.de.gz")
    de_nouns = sorted({w for s in de for w in s.split() if w.isalpha() and w[0].isupper() and len(w) > 2})
    en_words = sorted({w for s in en for w in s.split() if w.isalpha() and w.islower() and len(w) > 2})
    rng = np.random.default_rng(args.seed)
    rng.shuffle(de_nouns)
    rng.shuffle(en_words)
    args.out.mkdir(parents=True, exist_ok=True)
    types: dict[str, set[str]] = {"en": set(), "de": set()}
    words = {"en": 0, "de": 0}
    start = time.perf_counter()
    with gzip.open(args.out / "train.en.gz", "wt", encoding="utf-8", compresslevel=1) as fen, \
            gzip.open(args.out / "train.de.gz", "wt", encoding="utf-8", compresslevel=1) as fde:
        for first in range(0, args.pairs, CHUNK):
            n = min(CHUNK, args.pairs - first)
            joins = np.minimum(1 + rng.poisson(1.0, n), 6)
            picks = rng.integers(0, len(en), int(joins.sum()))
            # Rare material per pair: a German compound, an English hyphenated compound, a name.
            has_compound, has_hyphen, has_name = (rng.random((3, n)) < np.array([[0.6], [0.3], [0.25]]))
            noun_a, noun_b = zipf_index(rng, n, len(de_nouns), 1.15), zipf_index(rng, n, len(de_nouns), 1.15)
            word_a, word_b = zipf_index(rng, n, len(en_words), 1.2), zipf_index(rng, n, len(en_words), 1.2)
            names = zipf_index(rng, n, 2_000_000, 1.1)
            where = rng.random((3, n))
            out_en, out_de = [], []
            at = 0
            for i in range(n):
                k = int(joins[i])
                e = " ".join(en[j] for j in picks[at:at + k]).split()
                g = " ".join(de[j] for j in picks[at:at + k]).split()
                at += k
                if has_compound[i]:
                    g[int(where[0, i] * len(g))] = de_nouns[noun_a[i]] + de_nouns[noun_b[i]].lower()
                if has_hyphen[i]:
                    e[int(where[1, i] * len(e))] = f"{en_words[word_a[i]]}-{en_words[word_b[i]]}"
                if has_name[i]:
                    proper = name(int(names[i]))
                    e.insert(int(where[2, i] * len(e)), proper)
                    g.insert(int(where[2, i] * len(g)), proper)
                types["en"].update(e)
                types["de"].update(g)
                words["en"] += len(e)
                words["de"] += len(g)
                out_en.append(" ".join(e))
                out_de.append(" ".join(g))
            fen.write("\n".join(out_en) + "\n")
            fde.write("\n".join(out_de) + "\n")
            print(f"{first + n} pairs, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    for split in ("val", "test_2016_flickr"):
        for lang in ("en", "de"):
            shutil.copyfile(args.multi30k / f"{split}.{lang}.gz", args.out / f"{split}.{lang}.gz")
    for lang in ("en", "de"):
        print(f"{lang}: {args.pairs} sentences, {words[lang] / args.pairs:.1f} words per sentence, "
              f"{len(types[lang])} word types")


if __name__ == "__main__":
    main()
