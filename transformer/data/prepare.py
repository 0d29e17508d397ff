"""Prepare a training corpus once: `transformer-prepare --config configs/NAME.yaml [key=value ...]`.

What ``fairseq-preprocess`` is to fairseq. The training split is read as a stream, in chunks (local
``.gz``/text files, or a Hugging Face dataset batch by batch from its Arrow files), so memory does
not grow with the corpus. Then:

1. cleaning, as settings, counted in the log: Moses ``clean-corpus-n``-style word-count and ratio
   filters (``data.clean_max_words``, ``data.clean_ratio``) and exact-duplicate removal (``data.dedup``);
2. SentencePiece is trained once, on ``tokenizer.sample_size`` pairs drawn with a fixed seed
   (reservoir sampling, so only the sample is held), through the tokenizer cache;
3. worker processes encode chunks; empty pairs and pairs over ``data.max_len`` tokens are dropped as
   :func:`transformer.data.batches.encode_pairs` drops them, and the ids are appended to flat arrays on disk
   (the layout is in :mod:`transformer.data.prepared`) with a manifest fingerprinting inputs and settings.

Everything is written into a temporary sibling folder that is renamed into place at the end, so an
interrupted prepare leaves nothing that training would pick up; the next prepare deletes what a
killed one left (its folder names the process). The prepared folder must hold none of its inputs
(it is replaced as a whole), and a disk that fills up ends in one line naming it, with nothing left
behind. `transformer-train` calls
:func:`ensure_prepared` when ``data.prepared_dir`` is set: one process per machine (local rank 0)
prepares if the folder is missing, stale (corpus or settings changed), truncated or edited, while the
other ranks wait at a barrier; then every rank maps the same files.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import errno
import gzip
import hashlib
import itertools
import json
import logging
import logging.handlers
import multiprocessing
import os
import queue
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from transformer.atomic import WriteError, check_not_an_input, remove_stale_staging_folders, staging_folder
from transformer.config import Config, ConfigError, DataConfig, load_config
from transformer.data.batches import DataError, _local_file
from transformer.data.prepared import (
    FORMAT_VERSION,
    MANIFEST,
    SIDES,
    PreparedData,
    damaged_file,
    file_sha256,
    open_prepared,
    read_manifest,
    settings_difference,
)
from transformer.data.tokenizer import SAMPLE_SEED, Tokenizer, copy_tokenizers, load_or_train_tokenizers, sample_pairs

# The errors of a write that the disk refused, as opposed to a failure of the work itself.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EIO}

logger = logging.getLogger(__name__)

CHUNK_PAIRS = 50_000  # pairs read, cleaned and encoded at a time: bounds memory, not the result
# Non-zero ranks wait this long at the barrier for the prepare of a WMT-sized corpus on a slow machine.
PREPARE_TIMEOUT = datetime.timedelta(hours=6)

Chunk = tuple[list[str], list[str]]
# Folders built beside data.prepared_dir: the new version being written, and the old one being deleted.
STAGING_KINDS = ("tmp", "old")


# ---- reading the training split as a stream of chunks ----

def _file_blocks(path: Path, block_bytes: int = 1 << 24) -> Iterator[list[str]]:
    """Stripped lines of a UTF-8 (optionally gzip) file, split on ``\\n`` only as
    :func:`transformer.data.batches.read_lines` splits them, in blocks of about ``block_bytes``.

    Whole blocks are decoded and split at once: per-line reads cost more than the rest of a prepare.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    lines_before, rest = 0, b""
    try:
        with opener(path, "rb") as f:
            while True:
                raw = f.read(block_bytes)
                data = rest + raw
                cut = len(data) if not raw else data.rfind(b"\n") + 1
                data, rest = data[:cut], data[cut:]
                if data:
                    try:
                        text = data.decode("utf-8")
                    except UnicodeDecodeError as e:
                        line = lines_before + data.count(b"\n", 0, e.start) + 1
                        raise DataError(f"{path}:{line}: invalid UTF-8 byte {data[e.start:e.start + 1]!r}") from e
                    lines = text.split("\n")
                    if lines[-1] == "":
                        lines.pop()  # the final newline ends the last line; it does not start an empty one
                    lines_before += len(lines)
                    yield [line.strip() for line in lines]
                if not raw:
                    return
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


def _local_chunks(src_path: Path, tgt_path: Path, size: int) -> Iterator[Chunk]:
    """Aligned chunks of ``size`` pairs from two line files; differing line counts raise, naming both."""
    readers = [_file_blocks(src_path), _file_blocks(tgt_path)]
    buffers: list[list[str]] = [[], []]
    done = [False, False]
    n = 0
    while True:
        for side in (0, 1):
            while not done[side] and len(buffers[side]) < size:
                block = next(readers[side], None)
                if block is None:
                    done[side] = True
                else:
                    buffers[side] += block
        take = min(size, len(buffers[0]), len(buffers[1]))
        if take == 0:
            if buffers[0] or buffers[1]:
                short, long_ = (0, 1) if not buffers[0] else (1, 0)
                paths = (src_path, tgt_path)
                longer = n + len(buffers[long_]) + sum(len(b) for b in readers[long_])
                raise DataError(f"line counts differ: {paths[short]} has {n} lines, {paths[long_]} has {longer} lines")
            return
        chunk = (buffers[0][:take], buffers[1][:take])
        buffers = [buffers[0][take:], buffers[1][take:]]
        n += take
        yield chunk


def _hub_dataset(cfg: DataConfig) -> Any:
    """The Hugging Face training split (Arrow-backed; nothing is read into Python lists here)."""
    import datasets  # imported lazily: slow to import, and local files do not need it

    try:
        return datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.hub_train_split)
    except Exception as e:  # datasets raises many unrelated types for "not found"/"no network"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"hub dataset {cfg.hub_name!r} (config {cfg.hub_config!r}, split "
                        f"{cfg.hub_train_split!r}): cannot load: {first_line}") from e


def _hub_chunks(cfg: DataConfig, ds: Any, size: int) -> Iterator[Chunk]:
    """Chunks of a Hugging Face split, read batch by batch from its Arrow table."""
    column = cfg.hub_field
    for name in [column] if column else [cfg.src_lang, cfg.tgt_lang]:
        if name not in ds.column_names:
            raise DataError(f"hub dataset {cfg.hub_name!r}: no column {name!r}; columns are {ds.column_names}")
    row = 0
    for batch in ds.iter(batch_size=size):
        if column is None:
            src, tgt = batch[cfg.src_lang], batch[cfg.tgt_lang]
        else:
            src, tgt = [], []
            for i, pair in enumerate(batch[column]):
                if not isinstance(pair, dict) or cfg.src_lang not in pair or cfg.tgt_lang not in pair:
                    raise DataError(f"hub dataset {cfg.hub_name!r}: row {row + i} of {column!r} lacks "
                                    f"{cfg.src_lang!r} or {cfg.tgt_lang!r}")
                src.append(pair[cfg.src_lang])
                tgt.append(pair[cfg.tgt_lang])
        row += len(src)
        yield [(s or "").strip() for s in src], [(t or "").strip() for t in tgt]


class Corpus:
    """The training split named by a data config, readable as chunks any number of times.

    Local files in ``cfg.local_dir`` win when that folder exists, as in :func:`transformer.data.batches.load_split`.
    """

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.hub = None
        if cfg.local_dir is not None and Path(cfg.local_dir).is_dir():
            self.paths = [_local_file(Path(cfg.local_dir), cfg.train_split, lang) for lang in (cfg.src_lang, cfg.tgt_lang)]
        elif cfg.hub_name is not None:
            self.paths = []
            self.hub = _hub_dataset(cfg)
        elif cfg.local_dir is not None:
            raise DataError(f"data.local_dir {cfg.local_dir!r} is not a folder and data.hub_name is not set")
        else:
            raise DataError("no data source: set data.local_dir or data.hub_name")

    def chunks(self, size: int | None = None) -> Iterator[Chunk]:
        size = size or CHUNK_PAIRS
        if self.hub is not None:
            return _hub_chunks(self.cfg, self.hub, size)
        return _local_chunks(self.paths[0], self.paths[1], size)

    def fingerprint(self, with_content: bool) -> list[dict[str, Any]]:
        """What identifies the input: each file's path, size, modification time and (optionally)
        SHA-256, or the Hugging Face dataset's own fingerprint."""
        if self.hub is not None:
            return [{"hub": self.cfg.hub_name, "config": self.cfg.hub_config, "split": self.cfg.hub_train_split,
                     "fingerprint": self.hub._fingerprint}]
        found = []
        for path in self.paths:
            stat = path.stat()
            entry = {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            if with_content:
                entry["sha256"] = file_sha256(path)
            found.append(entry)
        return found


def reads_hub(d: DataConfig) -> bool:
    """Whether the training split comes from the Hugging Face hub (local files win where their folder
    exists, as in `Corpus`)."""
    return not (d.local_dir is not None and Path(d.local_dir).is_dir()) and d.hub_name is not None


def corpus_now(d: DataConfig, load_hub: bool = True) -> list[dict[str, Any]]:
    """The training corpus's fingerprint now, without content (see `corpus_change`).

    Args:
        load_hub: for a hub dataset, load it for its own fingerprint; False names it by its name,
            config and split alone, which `corpus_change` then compares with a recorded fingerprint.

    Raises:
        DataError: the corpus cannot be read.
    """
    if not load_hub and reads_hub(d):
        return [{"hub": d.hub_name, "config": d.hub_config, "split": d.hub_train_split}]
    return Corpus(d).fingerprint(with_content=False)


def settings(cfg: Config) -> dict[str, Any]:
    """Every setting that changes the prepared ids, as stored in (and compared with) the manifest."""
    d, t = cfg.data, cfg.tokenizer
    return {
        "format": FORMAT_VERSION,
        "data": {"src_lang": d.src_lang, "tgt_lang": d.tgt_lang, "max_len": d.max_len,
                 "clean_max_words": d.clean_max_words, "clean_ratio": d.clean_ratio, "dedup": d.dedup},
        "tokenizer": {"type": t.type, "vocab_size": t.vocab_size, "joint": t.joint,
                      "character_coverage": t.character_coverage, "sample_size": t.sample_size,
                      "sample_seed": SAMPLE_SEED, "sentencepiece": spm.__version__},
    }


# ---- cleaning ----

@dataclasses.dataclass(frozen=True)
class CleanRule:
    """Moses ``clean-corpus-n``-style filters on whitespace-separated words; 0 turns a filter off."""

    max_words: int = 0
    ratio: float = 0.0

    def reason(self, src: str, tgt: str) -> str | None:
        """Why the pair is dropped ("long" or "ratio"), or None to keep it (empty pairs are left to encoding)."""
        if not self.max_words and not self.ratio:
            return None
        ns, nt = len(src.split()), len(tgt.split())
        if ns == 0 or nt == 0:
            return None
        if self.max_words and (ns > self.max_words or nt > self.max_words):
            return "long"
        if self.ratio and (ns > self.ratio * nt or nt > self.ratio * ns):
            return "ratio"
        return None


def _clean(chunk: Chunk, rule: CleanRule, counts: collections.Counter) -> Chunk:
    if not rule.max_words and not rule.ratio:
        return chunk
    src, tgt = [], []
    for s, t in zip(*chunk):
        why = rule.reason(s, t)
        if why is None:
            src.append(s)
            tgt.append(t)
        else:
            counts[f"dropped_clean_{why}"] += 1
    return src, tgt


def _dedup(chunk: Chunk, seen: set[bytes], counts: collections.Counter) -> Chunk:
    """Drop pairs seen before (8-byte BLAKE2 keys: a few dozen bytes per distinct pair)."""
    src, tgt = [], []
    for s, t in zip(*chunk):
        key = hashlib.blake2b(f"{s}\t{t}".encode("utf-8"), digest_size=8).digest()
        if key in seen:
            counts["dropped_duplicate"] += 1
        else:
            seen.add(key)
            src.append(s)
            tgt.append(t)
    return src, tgt


# ---- encoding in worker processes ----

_worker: dict[str, Any] = {}


def _init_worker(model_paths: tuple[str, str], max_len: int, rule: CleanRule, dtype: str) -> None:
    _worker.update(processors=[spm.SentencePieceProcessor(model_file=p) for p in model_paths],
                   max_len=max_len, rule=rule, dtype=np.dtype(dtype))


def _encode_chunk(chunk: Chunk) -> tuple[list[np.ndarray], list[np.ndarray], collections.Counter]:
    """Clean and encode one chunk; return per side the flat ids and the lengths of the kept pairs."""
    counts: collections.Counter = collections.Counter()
    src, tgt = _clean(chunk, _worker["rule"], counts)
    counts["read"] = len(chunk[0])
    ids = [p.encode(texts, out_type=int) for p, texts in zip(_worker["processors"], (src, tgt))]
    lens = [np.fromiter(map(len, side), dtype=np.int64, count=len(side)) for side in ids]
    empty = (lens[0] == 0) | (lens[1] == 0)
    long_ = ~empty & ((lens[0] > _worker["max_len"]) | (lens[1] > _worker["max_len"]))
    keep = np.flatnonzero(~empty & ~long_)
    counts["dropped_empty"] += int(empty.sum())
    counts["dropped_long"] += int(long_.sum())
    counts["kept"] += len(keep)
    flats, kept_lens = [], []
    for side, side_lens in zip(ids, lens):
        rows = [side[i] for i in keep]
        flats.append(np.fromiter(itertools.chain.from_iterable(rows), dtype=_worker["dtype"],
                                 count=int(side_lens[keep].sum())))
        kept_lens.append(side_lens[keep].astype(np.int32))
    return flats, kept_lens, counts


class _HashedWriter:
    """Appends arrays' bytes to a file and hashes them on the way."""

    def __init__(self, path: Path) -> None:
        self.file, self.sha256, self.bytes = open(path, "wb"), hashlib.sha256(), 0

    def write(self, array: np.ndarray) -> None:
        data = array.tobytes()
        self.file.write(data)
        self.sha256.update(data)
        self.bytes += len(data)

    def close(self) -> dict[str, Any]:
        self.file.close()
        return {"bytes": self.bytes, "sha256": self.sha256.hexdigest()}


def _peak_rss_mib() -> tuple[float, float]:
    """Peak resident memory (MiB) of this process and of its largest finished child (Linux: KiB units)."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)


# ---- the prepare step ----

def stale_reason(cfg: Config, verify_content: bool = True, load_hub: bool = True) -> str | None:
    """Why ``cfg.data.prepared_dir`` cannot be used as it is (missing, other settings or corpus,
    damaged files), or None when it is up to date.

    Args:
        load_hub: compare a hub dataset's own fingerprint with the recorded one (it is loaded for
            that); False compares its name, config and split only (see `corpus_now`).
    """
    folder = Path(cfg.data.prepared_dir)
    if not folder.is_dir():
        return f"{folder} does not exist"
    manifest = read_manifest(folder)
    if manifest is None:
        return f"{folder / MANIFEST} is missing or unreadable"
    difference = settings_difference(manifest.get("settings", {}), settings(cfg))
    if difference:
        return f"{folder} was prepared with other settings: {difference}"
    recorded = manifest.get("inputs", [])
    try:
        current = corpus_now(cfg.data, load_hub)
    except DataError as e:
        # A folder copied to a machine without the corpus: its own checks are all that is left.
        logger.warning("cannot compare %s with its corpus (%s); using it as it is", folder, e)
        current = recorded
    change = corpus_change(recorded, current)
    if change is not None:
        return f"{change} since {folder} was prepared"
    return damaged_file(folder, manifest, verify_content)


def corpus_change(recorded: list[dict[str, Any]], current: list[dict[str, Any]]) -> str | None:
    """What changed in the training corpus, or None when it is the one `recorded` fingerprints.

    Args:
        recorded: a :meth:`Corpus.fingerprint` taken with content.
        current: the corpus's fingerprint now, without content (`corpus_now`): a file whose path,
            size and modification time are unchanged is not read again; a hub dataset named
            without its fingerprint is compared by name, config and split.

    Returns:
        e.g. "/data/train.de changed", or None.
    """
    if len(recorded) != len(current):
        return "the training corpus is read from another source"
    for old, new in zip(recorded, current):
        if "path" in new and (old.get("path"), old.get("bytes"), old.get("mtime_ns")) != \
                (new["path"], new["bytes"], new["mtime_ns"]):
            # A copy or a touch changes the time but not the bytes: only the content decides.
            if old.get("path") != new["path"] or old.get("bytes") != new["bytes"] or \
                    old.get("sha256") != file_sha256(Path(new["path"])):
                return f"{new['path']} changed"
        elif "hub" in new and {key: old.get(key) for key in new} != new:
            return f"hub dataset {new['hub']!r} changed"
    return None


def _train_tokenizers(cfg: Config, corpus: Corpus) -> tuple[str, str]:
    """Sample the corpus, train (or find in the cache) the tokenizers; return their model paths."""
    d = cfg.data
    start = time.perf_counter()
    # Sampled from the pairs as read: cleaning them first would double the cost of this pass for a
    # handful of pairs.
    sample_src, sample_tgt = sample_pairs(corpus.chunks(), cfg.tokenizer.sample_size)
    origin = corpus.paths[0].parent if corpus.paths else d.hub_name
    for lang, texts in ((d.src_lang, sample_src), (d.tgt_lang, sample_tgt)):
        if not any(texts):  # lines are stripped: blank ones are empty
            raise DataError(f"{origin}: every {lang} line sampled from the training split is empty or blank; "
                            "there is nothing to train the tokenizer and the model on")
    logger.info("tokenizer sample: %d pairs (tokenizer.sample_size %d) in %.0f s",
                len(sample_src), cfg.tokenizer.sample_size, time.perf_counter() - start)
    src_tok, tgt_tok = load_or_train_tokenizers(cfg.tokenizer, sample_src, sample_tgt, d.src_lang, d.tgt_lang)
    logger.info("tokenizers ready; peak RSS of the tokenizer process %.0f MiB", _peak_rss_mib()[0])
    return str(src_tok.path), str(tgt_tok.path)


def _encode(corpus: Corpus, d: DataConfig, tmp: Path, worker_args: tuple, n_workers: int,
            counts: collections.Counter) -> tuple[dict[str, Any], dict[str, list[np.ndarray]]]:
    """Clean, deduplicate and encode the corpus chunk by chunk into ``tmp/train.{src,tgt}.bin``, in corpus order.

    Returns:
        Each written file's size and hash by name, and each side's per-chunk arrays of sentence lengths.
    """
    writers = {side: _HashedWriter(tmp / f"train.{side}.bin") for side in SIDES}
    lengths: dict[str, list[np.ndarray]] = {side: [] for side in SIDES}
    seen: set[bytes] = set()

    def write(result: tuple[list[np.ndarray], list[np.ndarray], collections.Counter]) -> None:
        flats, lens, chunk_counts = result
        for side, flat, side_lens in zip(SIDES, flats, lens):
            writers[side].write(flat)
            lengths[side].append(side_lens)
        counts.update(chunk_counts)

    # Forked where that is safe (`child_start_method`): the workers need only SentencePiece and
    # numpy, and start in milliseconds.
    with multiprocessing.get_context(child_start_method()).Pool(
            n_workers, initializer=_init_worker, initargs=worker_args) as pool:
        pending: collections.deque = collections.deque()
        for chunk in corpus.chunks():
            if d.dedup:
                before = len(chunk[0])
                chunk = _dedup(chunk, seen, counts)
                counts["read"] += before - len(chunk[0])  # the worker counts the rest
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            while len(pending) > 2 * n_workers:  # a bounded number of chunks in flight
                write(pending.popleft().get())
        while pending:
            write(pending.popleft().get())
    return {f"train.{side}.bin": writers[side].close() for side in SIDES}, lengths


def _write_index(tmp: Path, lengths: dict[str, list[np.ndarray]], files: dict[str, Any], extra: list[str]) -> None:
    """Write each side's lengths and offsets, and add them and ``extra`` files to ``files`` (size, sha256)."""
    for side in SIDES:
        side_lens = np.concatenate(lengths[side])
        offsets = np.zeros(len(side_lens) + 1, dtype=np.int64)
        np.cumsum(side_lens, out=offsets[1:])
        np.save(tmp / f"train.{side}.len.npy", side_lens)
        np.save(tmp / f"train.{side}.idx.npy", offsets)
    for name in [f"train.{side}.{kind}.npy" for side in SIDES for kind in ("len", "idx")] + extra:
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}


def prepare(cfg: Config, workers: int | None = None) -> Path:
    """Build ``cfg.data.prepared_dir`` from the training split: sample, tokenizer, ids, manifest.

    Args:
        cfg: the run's config (``data``, ``tokenizer``); ``data.prepared_dir`` must be set.
        workers: encoding processes; default ``data.prepare_workers`` (0: one per CPU, at most 4).

    Returns:
        The prepared folder.

    Raises:
        DataError: unreadable or misaligned corpus, or no pair left after filtering.
        WriteError: the folder would hold a training file, or cannot be written (e.g. a full disk).
    """
    d = cfg.data
    if d.prepared_dir is None:
        raise ConfigError("data.prepared_dir is not set: name the folder to prepare the corpus into")
    folder = Path(d.prepared_dir)
    start = time.perf_counter()
    corpus = Corpus(d)
    check_not_an_input("data.prepared_dir", folder, [("a training file", path) for path in corpus.paths],
                       replaces_folder=True)
    remove_stale_staging_folders(folder, STAGING_KINDS)
    rule = CleanRule(d.clean_max_words, d.clean_ratio)
    counts: collections.Counter = collections.Counter()

    # 1. the tokenizer, in a child process: the sample and SentencePiece's training take far more
    # memory than encoding, and the encoding workers are started from this process.
    src_path, tgt_path = run_in_child(_train_tokenizers, cfg, corpus)
    src_tok = Tokenizer.load(src_path)
    tgt_tok = src_tok if tgt_path == src_path else Tokenizer.load(tgt_path)
    vocab = max(src_tok.vocab_size, tgt_tok.vocab_size)
    dtype = "<u2" if vocab <= 1 << 16 else "<i4"

    origin = corpus.paths[0].parent if corpus.paths else d.hub_name
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_folder(folder, "tmp")
        tokenizer_paths = copy_tokenizers({d.src_lang: src_tok, d.tgt_lang: tgt_tok}, tmp)
        model_paths = (str(tmp / tokenizer_paths[d.src_lang]), str(tmp / tokenizer_paths[d.tgt_lang]))

        # 2. clean, deduplicate and encode chunk by chunk; the writes keep corpus order
        encode_start = time.perf_counter()
        n_workers = workers or d.prepare_workers or min(4, os.cpu_count() or 1)
        files, lengths = _encode(corpus, d, tmp, (model_paths, d.max_len, rule, dtype), n_workers, counts)
        n_pairs = counts["kept"]
        if n_pairs == 0:
            raise DataError(f"{origin}: no training pair left after "
                            f"filtering ({dict(counts)})")
        _write_index(tmp, lengths, files, sorted(set(tokenizer_paths.values())))
        seconds = time.perf_counter() - start
        peak_self, peak_child = _peak_rss_mib()
        manifest = {
            "format": FORMAT_VERSION,
            "settings": settings(cfg),
            "inputs": corpus.fingerprint(with_content=True),
            "tokenizers": tokenizer_paths,
            "dtype": dtype,
            "counts": {"pairs": n_pairs, "src_tokens": files["train.src.bin"]["bytes"] // np.dtype(dtype).itemsize,
                       "tgt_tokens": files["train.tgt.bin"]["bytes"] // np.dtype(dtype).itemsize, **counts},
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        _move_into_place(tmp, folder)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # e.g. the disk is full: one line naming the folder, nothing left behind
            if isinstance(e, WriteError) or e.errno in WRITE_ERRNOS:
                raise WriteError(f"{folder}: cannot write the prepared data: {e.strerror or e}") from None
            raise WriteError(f"{folder}: cannot prepare the data: {e.strerror or e}") from None
        raise
    logger.info("prepared %s: read %d pairs; dropped %d by the word-count filter, %d by the ratio filter, "
                "%d duplicates, %d empty, %d longer than %d tokens; kept %d pairs, %d + %d tokens "
                "(vocabulary %d, %s); encoding %.0f s with %d workers, total %.0f s; peak RSS %.0f MiB "
                "(largest child process %.0f MiB)",
                folder, counts["read"], counts["dropped_clean_long"], counts["dropped_clean_ratio"],
                counts["dropped_duplicate"], counts["dropped_empty"], counts["dropped_long"], d.max_len, n_pairs,
                manifest["counts"]["src_tokens"], manifest["counts"]["tgt_tokens"], vocab, dtype,
                time.perf_counter() - encode_start, n_workers, seconds, peak_self, peak_child)
    return folder


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename the finished temporary folder to ``folder``, moving an older version aside first.

    If another process (another node's local rank 0 on a shared file system) renamed an up-to-date
    folder into place in the meantime, that one is kept and ``tmp`` removed.
    """
    if folder.exists():
        old = staging_folder(folder, "old")
        os.replace(folder, old / folder.name)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, folder)
    except OSError:
        if read_manifest(folder) is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def child_start_method() -> str:
    """How this process starts the children that prepare data: "fork" where that is safe, else "spawn".

    A fork is instant and needs nothing pickled. But a process that has initialised CUDA or joined
    a torch.distributed process group (a training process, by the time it prepares) runs threads
    of the CUDA driver, NCCL or gloo, whose locks a forked child can inherit held and then wait on
    for ever; such a process starts its children as fresh interpreters instead.
    """
    import torch
    import torch.distributed as dist

    return "spawn" if torch.cuda.is_initialized() or (dist.is_available() and dist.is_initialized()) else "fork"


def _child_main(results: Any, logs: Any, level: int, function: Callable[..., Any], args: tuple) -> None:
    # The child's log records go to the parent, which handles them as its own: into its log file,
    # or into the run's held log before the run may write its folder.
    root = logging.getLogger()
    for handler in list(root.handlers):  # a forked child's copies of the parent's handlers
        root.removeHandler(handler)
    root.addHandler(logging.handlers.QueueHandler(logs))
    root.setLevel(level)
    try:
        results.put(function(*args))
    except (ConfigError, DataError, OSError) as e:
        results.put(e)
        raise SystemExit(1)


def run_in_child(function: Callable[..., Any], *args: Any) -> Any:
    """Call ``function(*args)`` in a child process (see `child_start_method`), wait for it and return
    its (small) result.

    What the call allocates lives and dies in that process, so the caller keeps its own memory; the
    child's log records are handled by this process's logging, so its lines land in the same log.

    Raises:
        ConfigError, DataError, OSError: what ``function`` raised, re-raised here.
        DataError: the child died without a result (its exit status is named).
    """
    context = multiprocessing.get_context(child_start_method())
    results, logs = context.SimpleQueue(), context.Queue()
    child = context.Process(target=_child_main, name="transformer-prepare",
                            args=(results, logs, logging.getLogger().getEffectiveLevel(), function, args))
    child.start()
    while True:
        try:
            record = logs.get(timeout=0.1)
        except queue.Empty:
            if child.is_alive():
                continue
            break  # the child flushed its records before it exited
        logging.getLogger(record.name).handle(record)
    child.join()
    if results.empty():
        raise DataError(f"{getattr(function, '__name__', function)} failed in its process (exit status {child.exitcode})")
    result = results.get()
    if isinstance(result, Exception):
        raise result
    return result


def prepare_in_child(cfg: Config) -> None:
    """:func:`prepare` in a child process, so that the training process calling it keeps the memory
    of training alone."""
    run_in_child(prepare, cfg)


def ensure_prepared(cfg: Config) -> tuple[PreparedData, dict[str, Tokenizer]]:
    """The prepared training data of ``cfg``, prepared first by one process per machine if needed.

    Under ``torch.distributed``, each machine's local rank 0 checks the folder (settings, corpus, every
    file's size and SHA-256) and (re)builds it if it is missing, stale or damaged, while every other
    rank waits at a barrier whose timeout (:data:`PREPARE_TIMEOUT`) leaves room for a real corpus;
    then every rank maps the files, checking their sizes. A hub corpus is compared by its name,
    config and split (``transformer-prepare`` also compares the dataset's own fingerprint). On a
    shared file system the local ranks 0 of several machines may race: each writes its own temporary
    folder and the first rename wins, the bytes being the same.

    Returns:
        The memory-mapped training pairs and the tokenizers by language code.

    Raises:
        DataError: the corpus cannot be read, or a rank finds the folder damaged after the barrier.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0
    if local_rank == 0:
        # Every file's content is checked here, once per machine; a hub dataset is named, not loaded.
        reason = stale_reason(cfg, load_hub=False)
        if reason is not None:
            logger.info("preparing the training data: %s", reason)
            prepare_in_child(cfg)
        else:
            logger.info("using prepared training data in %s", cfg.data.prepared_dir)
    if distributed:
        group = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
        dist.barrier(group=group)
        dist.destroy_process_group(group)
    # The other ranks of this machine map the files local rank 0 has just checked: sizes only.
    return open_prepared(cfg.data.prepared_dir, verify_content=False)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point of `transformer-prepare`."""
    parser = argparse.ArgumentParser(prog="transformer-prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file (see configs/); data.prepared_dir names the output")
    parser.add_argument("--force", action="store_true", help="rebuild even if the prepared folder is up to date")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.dedup=true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        if cfg.data.prepared_dir is None:
            raise ConfigError(f"{args.config}: data.prepared_dir is not set: name the folder to prepare into")
        check_not_an_input("data.prepared_dir", cfg.data.prepared_dir, [("the --config file", args.config)],
                           replaces_folder=True)
        reason = None if args.force else stale_reason(cfg)
        if args.force or reason is not None:
            logger.info("preparing: %s", "--force" if args.force else reason)
            prepare(cfg)
        else:
            logger.info("%s is up to date", cfg.data.prepared_dir)
    except (ConfigError, DataError, OSError) as e:  # OSError: a WriteError, e.g. a full disk
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
