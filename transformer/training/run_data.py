"""The data a run trains on: its tokenizers and encoded splits, and the fingerprint of its training
split that a resumed run compares with the data it finds.

Under data parallelism every rank reads and encodes the corpus, but the tokenizer of a new run on
the in-memory path is trained (or found in its cache) by rank 0 alone and sent to the others, so
that all ranks encode with the very same model.

This module imports nothing from the training loop (`transformer.train`), which builds on it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from transformer.checkpoint import checkpoint_tokenizers
from transformer.config import Config
from transformer.data.batches import DataError, ParallelData, encode_pairs, load_split
from transformer.data.prepare import Corpus, corpus_change, corpus_now, ensure_prepared
from transformer.data.prepared import PreparedData
from transformer.data.tokenizer import Tokenizer, load_or_train_tokenizers, sample_pairs
from transformer.training.distributed import Ranks

log = logging.getLogger(__name__)


def prepare_data(
    cfg: Config, run_dir: Path, resume_state: dict | None, ranks: Ranks | None = None
) -> tuple[Tokenizer, Tokenizer, ParallelData | PreparedData, tuple[list[str], list[str]], ParallelData]:
    """Get the tokenizers and the encoded training pairs (memory-mapped from data.prepared_dir, which
    is prepared first if needed, or encoded in memory), and load and encode the validation split."""
    if cfg.data.prepared_dir is not None:
        train, tokenizers = ensure_prepared(cfg)
        src_tok, tgt_tok = tokenizers[cfg.data.src_lang], tokenizers[cfg.data.tgt_lang]
        if resume_state is not None:
            saved = checkpoint_tokenizers(resume_state, cfg.tokenizer.joint, run_dir)
            if [t.to_bytes() for t in saved] != [src_tok.to_bytes(), tgt_tok.to_bytes()]:
                raise DataError(f"{cfg.data.prepared_dir}: its tokenizer is not the one the run was trained with "
                                "(the folder was prepared again with other data or settings)")
    else:
        train_src, train_tgt = load_split(cfg.data, "train")
        if resume_state is not None:
            # A resumed run must keep its vocabulary, even if the tokenizer cache was cleared.
            src_tok, tgt_tok = checkpoint_tokenizers(resume_state, cfg.tokenizer.joint, run_dir)
        else:
            src_tok, tgt_tok = _run_tokenizers(cfg, train_src, train_tgt, ranks or Ranks())
        train = encode_pairs(train_src, train_tgt, src_tok, tgt_tok, cfg.data.max_len)
    valid_src, valid_tgt = load_split(cfg.data, "valid")
    valid = encode_pairs(valid_src, valid_tgt, src_tok, tgt_tok, cfg.data.max_len, drop=False)
    return src_tok, tgt_tok, train, (valid_src, valid_tgt), valid


def _run_tokenizers(cfg: Config, train_src: list[str], train_tgt: list[str], ranks: Ranks) -> tuple[Tokenizer, Tokenizer]:
    """The tokenizers of a new run: trained, or found in the cache, on a sample of the training split
    by rank 0, whose models the other ranks receive."""
    trained: list[Tokenizer] = []

    def train_on_main() -> list[bytes]:
        sample = sample_pairs([(train_src, train_tgt)], cfg.tokenizer.sample_size)
        trained.extend(load_or_train_tokenizers(cfg.tokenizer, *sample, cfg.data.src_lang, cfg.data.tgt_lang))
        return [tok.to_bytes() for tok in dict.fromkeys(trained)]  # one model where the vocabulary is joint

    models = ranks.from_main(train_on_main)
    if trained:
        return trained[0], trained[1]
    src_tok = Tokenizer.from_bytes(models[0], "the tokenizer of rank 0")
    return src_tok, src_tok if len(models) == 1 else Tokenizer.from_bytes(models[1], "the tokenizer of rank 0")


def training_data_fingerprint(cfg: Config, data: ParallelData | PreparedData | None = None) -> list[dict[str, Any]] | None:
    """What identifies the training split: each file's path, size, modification time and SHA-256, or
    the hub dataset's fingerprint (see `prepare.Corpus`); for prepared `data`, as its manifest
    recorded them when it was prepared from the corpus, which its checks have since compared with
    the corpus. None, with a warning, where the corpus cannot be read (prepared data copied to a
    machine without it)."""
    if isinstance(data, PreparedData):
        return data.manifest["inputs"]
    try:
        return Corpus(cfg.data).fingerprint(with_content=True)
    except DataError as e:
        log.warning("cannot fingerprint the training corpus (%s): a resumed run cannot check that it is unchanged", e)
        return None


def resumed_data_fingerprint(
    cfg: Config, state: dict[str, Any], path: Path, accept_change: bool
) -> list[dict[str, Any]] | None:
    """Check that the training data is the data the run was started on, before any work; return the
    fingerprint the resumed run records (None: to be taken once the data is loaded).

    Raises:
        DataError: the data changed and `accept_change` is false.
    """
    recorded = state.get("data_fingerprint")
    if recorded is None:
        log.warning("%s records no fingerprint of its training data: cannot check that it is unchanged", path)
        return None
    try:
        # The run's prepared folder names its hub dataset; loading it only for a fingerprint is not needed.
        current = corpus_now(cfg.data, load_hub=cfg.data.prepared_dir is None)
    except DataError:
        if cfg.data.prepared_dir is None:
            raise
        return recorded  # the corpus is not on this machine: the prepared folder's own checks are left
    change = corpus_change(recorded, current)
    if change is None:
        return recorded
    if not accept_change:
        raise DataError(f"{change} since the run started (the fingerprint in {path} differs): resuming would train "
                        "on other data. Put the data back, or pass --accept-data-change to train on it as it is now")
    if cfg.data.prepared_dir is not None:
        # Preparing the changed corpus trains a new tokenizer, which the run's model cannot use.
        raise DataError(f"{change} since the run started (the fingerprint in {path} differs), and with "
                        "data.prepared_dir it would be prepared with a new tokenizer, which the run cannot resume "
                        "with: put the data back, or start a new run")
    log.warning("%s since the run started; training on it as it is now (--accept-data-change)", change)
    return Corpus(cfg.data).fingerprint(with_content=True)
