"""Parallel text -> subword ids -> token-bucketed batches.

The pipeline is four steps, each a function or class here:

1. :func:`load_split` reads sentence pairs from local files or the Hugging Face hub.
2. :func:`encode_pairs` turns them into ids (source gets EOS), dropping empty or over-long pairs
   for training only, and remembers each kept pair's original index.
3. :func:`make_batches` groups similar lengths so that padded tokens per batch stay under a budget;
   :class:`BatchSampler` shuffles those batches per epoch and shards them across ranks.
4. :func:`collate` pads one batch into tensors: ``src``, ``tgt_in`` = BOS + y, ``tgt_out`` = y + EOS.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from transformer.config import DataConfig
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
# Tried in this order after the split name and language, e.g. train.de.gz then train.de.txt.gz.
LOCAL_SUFFIXES = (".gz", ".txt.gz", "", ".txt")


class DataError(ValueError):
    """The corpus is missing, malformed or inconsistent; the message names the file or column."""


def read_lines(path: Path) -> list[str]:
    """Read a UTF-8 (optionally gzip) file as stripped lines, splitting on ``\\n`` only.

    ``str.splitlines`` is avoided on purpose: it also splits on characters such as U+2028 and
    U+0085 that occur inside real sentences, which would misalign source and target.
    """
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 byte {raw[e.start:e.start + 1]!r}") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start an empty one
    return [line.strip() for line in lines]


def _local_file(folder: Path, name: str, lang: str) -> Path:
    """Find ``{folder}/{name}.{lang}{suffix}`` for the first existing suffix."""
    stem = folder / f"{name}.{lang}"
    for suffix in LOCAL_SUFFIXES:
        path = Path(f"{stem}{suffix}")
        if path.is_file():
            return path
    tried = ", ".join(repr(s) for s in LOCAL_SUFFIXES)
    raise DataError(f"missing file {stem}[suffix]; tried suffixes {tried}")


def local_split_files(cfg: DataConfig, splits: Sequence[str]) -> list[Path]:
    """The files in ``cfg.local_dir`` that :func:`load_split` reads for `splits`, those that exist;
    none when the data comes from the hub."""
    if cfg.local_dir is None or not Path(cfg.local_dir).is_dir():
        return []
    names = {"train": cfg.train_split, "valid": cfg.valid_split, "test": cfg.test_split}
    found = []
    for split in splits:
        for lang in (cfg.src_lang, cfg.tgt_lang):
            try:
                found.append(_local_file(Path(cfg.local_dir), names[split], lang))
            except DataError:
                pass  # reading it will say that it is missing
    return found


def _load_local(cfg: DataConfig, name: str) -> tuple[list[str], list[str]]:
    """Read one split's source and target files from ``cfg.local_dir``."""
    folder = Path(cfg.local_dir)
    src_path = _local_file(folder, name, cfg.src_lang)
    tgt_path = _local_file(folder, name, cfg.tgt_lang)
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(
            f"line counts differ: {src_path} has {len(src)} lines, {tgt_path} has {len(tgt)} lines"
        )
    return src, tgt


def _load_hub(cfg: DataConfig, split_name: str) -> tuple[list[str], list[str]]:
    """Read one split from a Hugging Face dataset, through ``cfg.hub_field`` when set."""
    import datasets  # imported lazily: it is slow to import and local files do not need it

    where = f"hub dataset {cfg.hub_name!r} (config {cfg.hub_config!r}, split {split_name!r})"
    # The hub client logs a warning for every retry of every request (two dozen lines offline); the
    # error raised at the end says what went wrong.
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=split_name)
    except Exception as e:  # datasets raises many unrelated types for "not found"/"no network"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{where}: cannot load: {first_line}") from e
    finally:
        hub_logger.setLevel(level)
    langs = (cfg.src_lang, cfg.tgt_lang)
    if cfg.hub_field is None:
        for lang in langs:
            if lang not in ds.column_names:
                raise DataError(f"{where}: no column {lang!r}; columns are {ds.column_names}")
        columns = [list(ds[lang]) for lang in langs]
    else:
        if cfg.hub_field not in ds.column_names:
            raise DataError(f"{where}: no column {cfg.hub_field!r}; columns are {ds.column_names}")
        columns = [[], []]
        for row, pair in enumerate(ds[cfg.hub_field]):
            for lang, column in zip(langs, columns):
                if not isinstance(pair, dict) or lang not in pair:
                    keys = sorted(pair) if isinstance(pair, dict) else type(pair).__name__
                    raise DataError(f"{where}: row {row} of {cfg.hub_field!r} has no {lang!r} ({keys})")
                column.append(pair[lang])
    src, tgt = ([(s or "").strip() for s in column] for column in columns)
    return src, tgt


def load_split(cfg: DataConfig, split: str) -> tuple[list[str], list[str]]:
    """Load the sentence pairs of one logical split.

    Local files in ``cfg.local_dir`` win when that folder exists (``{name}.{lang}`` with suffix
    ``.gz``, ``.txt.gz``, none or ``.txt``); otherwise ``cfg.hub_name`` is loaded with ``datasets``.
    Lines are stripped of surrounding whitespace; nothing is dropped here.

    Args:
        cfg: data settings (languages, folder or hub dataset, split names).
        split: ``"train"``, ``"valid"`` or ``"test"``.

    Returns:
        ``(src_texts, tgt_texts)`` of equal length.

    Raises:
        DataError: unknown split, no source configured, missing file, differing line counts,
            invalid UTF-8, or a missing language column.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if cfg.local_dir is not None and Path(cfg.local_dir).is_dir():
        name = {"train": cfg.train_split, "valid": cfg.valid_split, "test": cfg.test_split}[split]
        src, tgt = _load_local(cfg, name)
        origin = cfg.local_dir
    elif cfg.hub_name is not None:
        name = {"train": cfg.hub_train_split, "valid": cfg.hub_valid_split, "test": cfg.hub_test_split}[split]
        if cfg.local_dir is not None:
            logger.warning("data.local_dir %r is not a folder; trying hub dataset %r instead", cfg.local_dir, cfg.hub_name)
            try:
                src, tgt = _load_hub(cfg, name)
            except DataError as e:
                raise DataError(f"data.local_dir {cfg.local_dir!r} is not a folder, and the fallback failed: {e}") from None
        else:
            src, tgt = _load_hub(cfg, name)
        origin = cfg.hub_name
    elif cfg.local_dir is not None:
        raise DataError(f"data.local_dir {cfg.local_dir!r} is not a folder and data.hub_name is not set")
    else:
        raise DataError("no data source: set data.local_dir or data.hub_name")
    if split == "train":
        for lang, texts in ((cfg.src_lang, src), (cfg.tgt_lang, tgt)):
            if not any(texts):  # lines are stripped: blank ones are empty
                raise DataError(f"{origin}: every {lang} line of the training split is empty or blank; "
                                "there is nothing to train the tokenizer and the model on")
    logger.info("loaded %d %s pairs (%s-%s) from %s", len(src), split, cfg.src_lang, cfg.tgt_lang, origin)
    return src, tgt


@dataclass
class ParallelData:
    """Encoded sentence pairs.

    Attributes:
        src: source ids per pair, ending with EOS.
        tgt: target ids per pair, without BOS/EOS (added by :func:`collate`).
        indices: position of each kept pair in the texts given to :func:`encode_pairs`.
        n_dropped_empty: pairs dropped because a side was empty.
        n_dropped_long: pairs dropped because a side had more than ``max_len`` tokens.
    """

    src: list[list[int]]
    tgt: list[list[int]]
    indices: list[int]
    n_dropped_empty: int = 0
    n_dropped_long: int = 0

    def __len__(self) -> int:
        return len(self.src)

    @property
    def src_lens(self) -> list[int]:
        """Length of each ``src`` row as it will be padded (EOS included)."""
        return [len(s) for s in self.src]

    @property
    def tgt_lens(self) -> list[int]:
        """Length of each ``tgt_in``/``tgt_out`` row as it will be padded (tokens + 1)."""
        return [len(t) + 1 for t in self.tgt]


def encode_pairs(
    src_texts: Sequence[str],
    tgt_texts: Sequence[str],
    src_tok: Tokenizer,
    tgt_tok: Tokenizer,
    max_len: int,
    drop: bool = True,
) -> ParallelData:
    """Tokenize sentence pairs, optionally dropping empty and over-long ones.

    Args:
        src_texts: source sentences.
        tgt_texts: target sentences, aligned with ``src_texts``.
        src_tok: source tokenizer.
        tgt_tok: target tokenizer (may be the same object).
        max_len: with ``drop``, pairs with more than this many subword tokens (specials excluded)
            on either side are dropped.
        drop: drop empty and over-long pairs (training); False keeps every pair so that outputs stay
            aligned with references (validation, test).

    Returns:
        The encoded pairs with their original indices and drop counts.

    Raises:
        DataError: if the two sides have different lengths.
    """
    if len(src_texts) != len(tgt_texts):
        raise DataError(f"{len(src_texts)} source sentences but {len(tgt_texts)} target sentences")
    src_ids = src_tok.encode_batch(src_texts)
    tgt_ids = tgt_tok.encode_batch(tgt_texts)
    data = ParallelData(src=[], tgt=[], indices=[])
    for i, (s, t) in enumerate(zip(src_ids, tgt_ids)):
        if drop and (not s or not t):
            data.n_dropped_empty += 1
        elif drop and (len(s) > max_len or len(t) > max_len):
            data.n_dropped_long += 1
        else:
            data.src.append(s + [EOS_ID])
            data.tgt.append(t)
            data.indices.append(i)
    if data.n_dropped_empty or data.n_dropped_long:
        logger.info("kept %d of %d pairs: dropped %d empty, %d longer than %d tokens",
                    len(data), len(src_ids), data.n_dropped_empty, data.n_dropped_long, max_len)
    return data


def bucket_batches(src_lens: np.ndarray | Sequence[int], tgt_lens: np.ndarray | Sequence[int],
                   max_tokens: int) -> list[np.ndarray]:
    """Group example indices into batches of similar length under a padded-token budget.

    Examples are sorted by (target length, source length, index) and cut greedily so that
    ``len(batch) * max(longest source, longest target) <= max_tokens``; an example longer than the
    budget on its own gets a batch to itself. The result is deterministic. The sort is an array
    operation and each batch is a view into one index array, so millions of examples cost a few
    bytes each.

    Args:
        src_lens: (N,) padded source length per example (for :class:`ParallelData`: ``data.src_lens``).
        tgt_lens: (N,) padded target length per example (``data.tgt_lens``, i.e. tokens + 1).
        max_tokens: budget of padded tokens per side per batch.

    Returns:
        Batches as int64 index arrays, in increasing length order; every index appears exactly once.
    """
    src = np.asarray(src_lens, dtype=np.int64)
    tgt = np.asarray(tgt_lens, dtype=np.int64)
    if src.shape != tgt.shape:
        raise ValueError(f"{len(src)} source lengths but {len(tgt)} target lengths")
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    order = np.lexsort((np.arange(len(src)), src, tgt))  # last key sorts first: target, source, index
    widths = np.maximum(src, tgt)[order].tolist()
    # The cut is a running maximum that restarts at every cut: sequential, so one pass in Python
    # over plain ints (about a second per few million examples).
    starts = [0]
    width = 0
    for i, w in enumerate(widths):
        if w > width:
            width = w
        if (i - starts[-1] + 1) * width > max_tokens and i > starts[-1]:
            starts.append(i)
            width = w
    bounds = starts[1:] + [len(widths)] if widths else []
    return [order[a:b] for a, b in zip(starts, bounds)]


def make_batches(src_lens: Sequence[int], tgt_lens: Sequence[int], max_tokens: int) -> list[list[int]]:
    """:func:`bucket_batches` with each batch as a list of ints.

    Args:
        src_lens: padded source length per example (for :class:`ParallelData`: ``data.src_lens``).
        tgt_lens: padded target length per example (``data.tgt_lens``, i.e. tokens + 1).
        max_tokens: budget of padded tokens per side per batch.

    Returns:
        Batches of indices, in increasing length order; every index appears exactly once.
    """
    return [batch.tolist() for batch in bucket_batches(src_lens, tgt_lens, max_tokens)]


class BatchSampler:
    """Per-epoch shuffled order of fixed batches, sharded across data-parallel ranks.

    The batches themselves never change (their lengths are bucketed once); only their order does,
    seeded by ``seed + epoch`` so that a resumed run replays the same order. Each rank takes every
    ``world_size``-th shuffled batch, truncated so that all ranks step the same number of times.

    Args:
        batches: batches of example indices, e.g. from :func:`make_batches` or :func:`bucket_batches`.
        seed: base seed of the shuffle.
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of data-parallel processes.
    """

    def __init__(self, batches: Sequence[Sequence[int]], seed: int, rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if len(batches) < world_size:
            raise ValueError(f"{len(batches)} batches cannot be shared by {world_size} ranks")
        self.batches = batches
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self.batches) // self.world_size

    def epoch_batches(self, epoch: int) -> list[Sequence[int]]:
        """Return this rank's batches for ``epoch``, in shuffled order.

        Args:
            epoch: epoch number; the same (seed, epoch) always gives the same order.

        Returns:
            ``len(self)`` batches of example indices.
        """
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.batches), generator=generator).tolist()
        mine = order[self.rank::self.world_size][: len(self)]
        return [self.batches[i] for i in mine]


@dataclass
class Batch:
    """Padded tensors for one batch; ``PAD_ID`` fills the padding.

    The positions of the real tokens are computed here, on the host, so that the model's token
    packing and the loss's label selection never read a device tensor to find them.

    Attributes:
        src: (B, S) source ids, each row ending with EOS.
        tgt_in: (B, T) decoder input, BOS followed by the target tokens.
        tgt_out: (B, T) decoder labels, the target tokens followed by EOS.
        n_src_tokens: non-pad tokens in ``src``.
        n_tgt_tokens: non-pad tokens in ``tgt_out`` (the number of predicted labels).
        indices: the example index of each row in its :class:`ParallelData`.
        src_index: (n_src_tokens,) positions of the real source tokens in the flattened (B * S)
            ``src``, in order; None when no row is padded.
        tgt_index: (n_tgt_tokens,) positions of the labels in the flattened (B * T) ``tgt_out``.
    """

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    n_src_tokens: int
    n_tgt_tokens: int
    indices: list[int] = field(default_factory=list)
    src_index: torch.Tensor | None = None
    tgt_index: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        """Return a copy with the tensors on ``device``.

        For a GPU the tensors are first put in pinned host memory, so that the copies run
        asynchronously and the host can prepare the next batch while the GPU computes.
        """
        device = torch.device(device)

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if device.type == "cuda" and t.device.type == "cpu":
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        return Batch(
            src=move(self.src), tgt_in=move(self.tgt_in), tgt_out=move(self.tgt_out),
            n_src_tokens=self.n_src_tokens, n_tgt_tokens=self.n_tgt_tokens, indices=self.indices,
            src_index=move(self.src_index), tgt_index=move(self.tgt_index),
        )


def _pad(rows: list[list[int]]) -> torch.Tensor:
    """Stack id lists into a (B, L) LongTensor right-padded with ``PAD_ID``."""
    out = torch.full((len(rows), max(len(r) for r in rows)), PAD_ID, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _real_positions(lengths: list[int], width: int) -> torch.Tensor:
    """(N,) positions of the real tokens of right-padded rows in the flattened (B * width) batch, in order."""
    real = torch.arange(width) < torch.tensor(lengths).unsqueeze(1)  # (B, width)
    return real.flatten().nonzero().squeeze(1)


def collate(indices: Sequence[int], data: ParallelData) -> Batch:
    """Pad the examples ``indices`` of ``data`` into a :class:`Batch`.

    Args:
        indices: example indices into ``data`` (not the original text indices): a list or an int array.
        data: encoded pairs (:class:`ParallelData`, or anything with the same ``src``/``tgt`` rows).

    Returns:
        The batch; ``tgt_in`` and ``tgt_out`` are the target shifted against each other by one.
    """
    if len(indices) == 0:
        raise ValueError("cannot collate an empty batch")
    src = [data.src[i] for i in indices]
    tgt = [data.tgt[i] for i in indices]
    src_lengths, tgt_lengths = [len(s) for s in src], [len(t) + 1 for t in tgt]
    src_width, tgt_width = max(src_lengths), max(tgt_lengths)
    return Batch(
        src=_pad(src),
        tgt_in=_pad([[BOS_ID] + t for t in tgt]),
        tgt_out=_pad([t + [EOS_ID] for t in tgt]),
        n_src_tokens=sum(src_lengths),
        n_tgt_tokens=sum(tgt_lengths),
        indices=list(indices),
        src_index=None if min(src_lengths) == src_width else _real_positions(src_lengths, src_width),
        tgt_index=_real_positions(tgt_lengths, tgt_width),
    )
