"""What both examples need from the Multi30k text: its lines, and a SentencePiece model trained on them."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3  # the package's special ids


def read_lines(path: Path, limit: int = 0) -> list[str]:
    """The lines of a (gzipped) text file, at most `limit` of them (0: all)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return lines[:limit] if limit else lines


def train_tokenizer(sentences: list[str], vocab_size: int) -> spm.SentencePieceProcessor:
    """A BPE SentencePiece model with the package's special ids (pad 0, unk 1, bos 2, eos 3)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=model.getvalue())
