"""What every benchmark comparison shares: the data, interleaved timing, and the report's tables."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Sequence

import torch

from transformer.config import Config
from transformer.data.batches import Batch, collate, encode_pairs, load_split, make_batches
from transformer.data.tokenizer import PAD_ID, Tokenizer, load_or_train_tokenizers
from transformer.decoding.translator import source_ids
from transformer.precision import BF16_MIN_SPEEDUP, ProbeShape, bf16_speedup
from transformer.runtime import has_native_bf16

_START = time.perf_counter()


def progress(message: str) -> None:
    """A progress line on stderr, with the seconds since the start (stdout is kept for the tables)."""
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass
class Setup:
    """The vocabulary and the batches every section uses."""

    vocab_size: int
    train_batches: list[Batch]  # spread over the length range, shortest first
    test_sources: list[list[int]]  # source ids (with EOS) of the test sentences decoded
    tokenizer: Tokenizer  # the joint SentencePiece model


def spread(items: Sequence, k: int) -> list:
    """k items evenly spaced over `items` (first and last included), in order."""
    if k >= len(items):
        return list(items)
    if k == 1:
        return [items[len(items) // 2]]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def load_setup(cfg: Config, n_batches: int, n_sentences: int) -> Setup:
    """Tokenize Multi30k as training does and pick the benchmark's batches and test sentences."""
    train_src, train_tgt = load_split(cfg.data, "train")
    tokenizer, tgt_tokenizer = load_or_train_tokenizers(cfg.tokenizer, train_src, train_tgt,
                                                        cfg.data.src_lang, cfg.data.tgt_lang)
    if tokenizer is not tgt_tokenizer:
        raise SystemExit("the benchmark needs a joint vocabulary (tokenizer.joint: true): both models share embeddings")
    data = encode_pairs(train_src, train_tgt, tokenizer, tokenizer, cfg.data.max_len)
    batches = make_batches(data.src_lens, data.tgt_lens, cfg.train.max_tokens)
    test_src, _ = load_split(cfg.data, "test")
    sources = [ids for ids in source_ids(tokenizer, test_src[:n_sentences]) if ids]
    return Setup(tokenizer.vocab_size, [collate(b, data) for b in spread(batches, n_batches)], sources, tokenizer)


def shrink(batch: Batch, max_tokens: int) -> Batch:
    """The first rows of `batch` that fit `max_tokens` padded tokens per side (at least one row)."""
    width = max(batch.src.size(1), batch.tgt_in.size(1))
    n = max(1, min(batch.src.size(0), max_tokens // width))
    src, tgt_in, tgt_out = batch.src[:n], batch.tgt_in[:n], batch.tgt_out[:n]
    # Trim columns that are padding in every kept row.
    src = src[:, : int(src.ne(PAD_ID).sum(1).max())]
    t = int(tgt_out.ne(PAD_ID).sum(1).max())
    return Batch(src, tgt_in[:, :t], tgt_out[:, :t], int(src.ne(PAD_ID).sum()), int(tgt_out.ne(PAD_ID).sum()))


def n_tokens(batch: Batch) -> int:
    """Source + target non-pad tokens."""
    return batch.n_src_tokens + batch.n_tgt_tokens


def interleaved(
    runs: dict[Hashable, Callable[[int], float]], n_items: int, repeats: int,
) -> dict[Hashable, list[list[float]]]:
    """Time several variants item by item, interleaved: item i of A, of B, ..., then item i + 1.

    The starting variant rotates every repeat, so neither side is always the one run first.

    Args:
        runs: name -> function running item i and returning its seconds.
        n_items: items per pass.
        repeats: passes.

    Returns:
        name -> times[repeat][item].
    """
    names = list(runs)
    times: dict[Hashable, list[list[float]]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in names:
            times[name].append([])
        for i in range(n_items):
            for name in order:
                times[name][r].append(runs[name](i))
    return times


def pass_seconds(times: list[list[float]]) -> float:
    """Seconds of one pass: the sum over items of each item's median over repeats."""
    return sum(statistics.median(column) for column in zip(*times))


def machine(cfg: Config) -> dict:
    """CPU model, cores, library versions, threads, and bf16's speed against float32 on the CPU as
    `precision: auto` measures it for `cfg`'s training shapes."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": has_native_bf16(torch.device("cpu"))}
    shape = ProbeShape.of(cfg.model.d_model, cfg.model.d_ff, cfg.tokenizer.vocab_size, cfg.train.max_tokens, training=True)
    speedup, _, _ = bf16_speedup(shape)
    info["bf16_speedup"], info["bf16_choice"] = speedup, "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    with contextlib.suppress(ImportError):
        import transformers
        info["transformers"] = transformers.__version__
    return info


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pass_ratios(faster: dict, slower: dict) -> str:
    """Each timed pass's throughput ratio, e.g. "1.28, 1.31, 1.30" (passes are interleaved)."""
    return ", ".join(f"{a / b:.2f}" for a, b in zip(faster["passes_tokens_per_s"], slower["passes_tokens_per_s"]))
