"""SentencePiece subword tokenizers: training, caching, loading, encode/decode.

Every model trained here uses the same special ids (:data:`PAD_ID`, :data:`UNK_ID`, :data:`BOS_ID`,
:data:`EOS_ID`), so the rest of the package can hard-code them. Trained models are cached under
``TokenizerConfig.cache_dir`` keyed by a SHA-256 of the training text and the settings, and copied
into each run directory so that a run is self-contained.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import sentencepiece as spm

from transformer.atomic import atomic_write_bytes
from transformer.config import TokenizerConfig

logger = logging.getLogger(__name__)

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
_SPECIAL_IDS = frozenset((PAD_ID, BOS_ID, EOS_ID))

# Threads for SentencePiece training and batch encoding; few, so that tokenizing never takes a whole machine.
_NUM_THREADS = min(4, os.cpu_count() or 1)


class Tokenizer:
    """One SentencePiece model: text <-> subword ids.

    Args:
        processor: a loaded ``SentencePieceProcessor``.
        path: the ``.model`` file it was loaded from.
    """

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path) -> None:
        self.processor = processor
        self.path = Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a ``.model`` file and check that its special ids are the fixed ones.

        Args:
            path: SentencePiece model file.

        Returns:
            The tokenizer.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: if the model's pad/unk/bos/eos ids differ from this module's constants.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        processor = spm.SentencePieceProcessor(model_file=str(path))
        found = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
        if found != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"{path}: special ids (pad, unk, bos, eos) are {found}, "
                f"expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}"
            )
        return cls(processor, path)

    @classmethod
    def from_bytes(cls, data: bytes, origin: str | Path) -> Tokenizer:
        """Rebuild a tokenizer from `to_bytes()` output (e.g. stored in a checkpoint named `origin`)."""
        return cls(spm.SentencePieceProcessor(model_proto=data), Path(origin))

    def to_bytes(self) -> bytes:
        """The serialized SentencePiece model, enough to rebuild this tokenizer."""
        return self.processor.serialized_model_proto()

    @property
    def vocab_size(self) -> int:
        """Number of ids, special ones included."""
        return self.processor.get_piece_size()

    def id_to_piece(self, i: int) -> str:
        """Return the subword string for id ``i`` (e.g. ``'▁the'``)."""
        return self.processor.id_to_piece(i)

    def encode(self, text: str) -> list[int]:
        """Encode one sentence to ids, without BOS/EOS.

        Args:
            text: the sentence.

        Returns:
            Subword ids.
        """
        return self.processor.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many sentences at once (SentencePiece parallelises this across threads).

        Args:
            texts: sentences.

        Returns:
            One id list per sentence, without BOS/EOS.
        """
        if not texts:
            return []
        return self.processor.encode(list(texts), out_type=int, num_threads=_NUM_THREADS)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text, skipping pad/bos/eos wherever they occur (unknowns render as ⁇).

        Args:
            ids: subword ids, e.g. a model output with BOS/EOS/padding still in it.

        Returns:
            The detokenized sentence.
        """
        return self.processor.decode([int(i) for i in ids if int(i) not in _SPECIAL_IDS])


def train_tokenizer(texts: Sequence[str], cfg: TokenizerConfig, model_prefix: str | Path) -> Tokenizer:
    """Train a SentencePiece model on all of ``texts`` and write ``{model_prefix}.model``.

    Training is deterministic for the same texts and settings: every sentence is used in the given
    order (no sampling or shuffling). ``hard_vocab_limit`` is off, so a corpus too small for
    ``cfg.vocab_size`` yields a smaller vocabulary instead of an error.

    Args:
        texts: training sentences.
        cfg: model type, vocabulary size and character coverage.
        model_prefix: output path without the ``.model`` suffix; parent folders are created.

    Returns:
        The trained tokenizer, loaded from ``{model_prefix}.model``.
    """
    if not any(text.strip() for text in texts):
        raise ValueError("cannot train a tokenizer: every training sentence is empty or blank")
    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    logger.info("training %s tokenizer (vocab %d) on %d sentences -> %s.model",
                cfg.type, cfg.vocab_size, len(texts), model_prefix)
    # The model comes back as bytes rather than through model_prefix, which SentencePiece would
    # record inside the model: the same texts and settings then give the same file, byte for byte.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type=cfg.type,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        hard_vocab_limit=False,
        input_sentence_size=0,  # 0 = use every sentence rather than a random sample
        shuffle_input_sentence=False,
        num_threads=_NUM_THREADS,
        minloglevel=2,  # SentencePiece's own progress output would flood the training log
    )
    Path(f"{model_prefix}.model").write_bytes(model.getvalue())
    return Tokenizer.load(f"{model_prefix}.model")


# Seed of the sentence sample a tokenizer is trained on: fixed, so that the same corpus and
# tokenizer.sample_size always give the same vocabulary.
SAMPLE_SEED = 0


def sample_pairs(chunks: Iterable[tuple[Sequence[str], Sequence[str]]], size: int) -> tuple[list[str], list[str]]:
    """Draw ``size`` sentence pairs uniformly from a stream of chunks, seeded, in one pass.

    Reservoir sampling with geometric skips (Li's "Algorithm L"): only the sample is held, and the
    random draws are a few per kept pair, not one per pair read. The kept pairs are returned in corpus
    order, so a corpus of at most ``size`` pairs (or ``size == 0``) comes back whole and unchanged.

    Args:
        chunks: ``(source sentences, target sentences)`` blocks, e.g. a corpus read chunk by chunk.
        size: pairs to keep; 0 keeps every pair.

    Returns:
        ``(src_texts, tgt_texts)`` of the sampled pairs.
    """
    rng = random.Random(SAMPLE_SEED)
    src_kept: list[str] = []
    tgt_kept: list[str] = []
    where: list[int] = []  # corpus position of each kept pair
    read = 0
    weight, next_pick = 0.0, -1  # Algorithm L's state once the reservoir is full
    for src, tgt in chunks:
        start, read = read, read + len(src)
        if size == 0 or len(where) < size:
            take = len(src) if size == 0 else min(size - len(where), len(src))
            src_kept += src[:take]
            tgt_kept += tgt[:take]
            where += range(start, start + take)
            if size and len(where) == size and next_pick < 0:
                weight = math.exp(math.log(1.0 - rng.random()) / size)
                next_pick = size + int(math.log(1.0 - rng.random()) / math.log(1.0 - weight))
        while 0 <= next_pick < read:
            slot = rng.randrange(size)
            src_kept[slot], tgt_kept[slot], where[slot] = src[next_pick - start], tgt[next_pick - start], next_pick
            weight *= math.exp(math.log(1.0 - rng.random()) / size)
            next_pick += int(math.log(1.0 - rng.random()) / math.log(1.0 - weight)) + 1
    order = sorted(range(len(where)), key=where.__getitem__)
    return [src_kept[i] for i in order], [tgt_kept[i] for i in order]


def _cache_key(cfg: TokenizerConfig, corpora: Sequence[Sequence[str]]) -> str:
    """SHA-256 over the settings that change the model and every line of every corpus."""
    h = hashlib.sha256()
    settings = {
        "type": cfg.type,
        "vocab_size": cfg.vocab_size,
        "character_coverage": cfg.character_coverage,
        "special_ids": [PAD_ID, UNK_ID, BOS_ID, EOS_ID],
        "sentencepiece": spm.__version__,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for corpus in corpora:
        # Separator between corpora so that moving a line from one to the other changes the key.
        h.update(b"\x00corpus\x00")
        for line in corpus:
            h.update(line.encode("utf-8"))
            h.update(b"\n")
    return h.hexdigest()


def _cached(cfg: TokenizerConfig, name: str, corpora: Sequence[Sequence[str]]) -> Tokenizer:
    """Load the cached model for ``corpora`` + settings, training (atomically) if absent."""
    key = _cache_key(cfg, corpora)
    path = Path(cfg.cache_dir) / f"{name}.{cfg.type}{cfg.vocab_size}.{key[:16]}.model"
    if path.is_file():
        logger.info("reusing cached tokenizer %s", path)
        return Tokenizer.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Train under a private name and rename, so concurrent runs never read a half-written model.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        train_tokenizer([line for corpus in corpora for line in corpus], cfg, Path(tmp) / "spm")
        os.replace(Path(tmp) / "spm.model", path)
    return Tokenizer.load(path)


def load_or_train_tokenizers(
    cfg: TokenizerConfig,
    src_texts: Sequence[str],
    tgt_texts: Sequence[str],
    src_lang: str,
    tgt_lang: str,
) -> tuple[Tokenizer, Tokenizer]:
    """Return (source, target) tokenizers, reusing cached models when data and settings match.

    Args:
        cfg: tokenizer settings; ``cfg.joint`` selects one shared model or one per language.
        src_texts: source training sentences.
        tgt_texts: target training sentences.
        src_lang: source language code (names the cache file).
        tgt_lang: target language code.

    Returns:
        ``(src_tok, tgt_tok)``; with ``cfg.joint`` both are the same object.
    """
    if cfg.joint:
        tok = _cached(cfg, f"joint.{src_lang}-{tgt_lang}", [src_texts, tgt_texts])
        return tok, tok
    return _cached(cfg, src_lang, [src_texts]), _cached(cfg, tgt_lang, [tgt_texts])


def copy_tokenizers(tokenizers: Mapping[str, Tokenizer], run_dir: str | Path) -> dict[str, str]:
    """Copy tokenizer models into a run directory so the run is self-contained.

    A single model shared by every language is written once as ``spm.model``; otherwise each
    language gets ``spm.{lang}.model``.

    Args:
        tokenizers: language code -> tokenizer, e.g. ``{"de": src_tok, "en": tgt_tok}``.
        run_dir: destination folder (created if needed).

    Returns:
        Language code -> model path relative to ``run_dir``; pass to :func:`load_tokenizers`.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    joint = len({id(t) for t in tokenizers.values()}) == 1
    paths: dict[str, str] = {}
    for lang, tok in tokenizers.items():
        name = "spm.model" if joint else f"spm.{lang}.model"
        target = run_dir / name
        if name not in paths.values():
            atomic_write_bytes(target, tok.to_bytes())  # works for tokenizers rebuilt from a checkpoint too
        paths[lang] = name
    return paths


def load_tokenizers(run_dir: str | Path, paths: Mapping[str, str]) -> dict[str, Tokenizer]:
    """Load the tokenizers written by :func:`copy_tokenizers`.

    Args:
        run_dir: the run directory.
        paths: language code -> relative model path, as returned by :func:`copy_tokenizers`.

    Returns:
        Language code -> tokenizer; languages sharing a file share one object.
    """
    loaded: dict[str, Tokenizer] = {}
    by_file: dict[str, Tokenizer] = {}
    for lang, rel in paths.items():
        if rel not in by_file:
            by_file[rel] = Tokenizer.load(Path(run_dir) / rel)
        loaded[lang] = by_file[rel]
    return loaded
