"""Benchmark this Transformer against the implementations people would otherwise use.

    python scripts/benchmark.py                        # everything (long: run it on a quiet machine)
    python scripts/benchmark.py --quick                # smoke run, well under a minute
    python scripts/benchmark.py --only train --batches 10 --json runs/benchmark.json

Four sections, each selectable with --only:

* train:  training-step throughput (forward + backward + fused Adam step, source + target non-pad
          tokens per second) of `TranslationLoss` on our `Transformer` against the same model written with
          `torch.nn.Transformer` (full (B, T, V) logits, `F.cross_entropy(ignore_index=pad)`), on real
          token-bucketed Multi30k batches, in float32 and under bfloat16 autocast (on the same
          batches where the CPU has native bf16 instructions; on a few small ones where PyTorch
          has to emulate bf16, which is many times slower).
* flops:  achieved matmul FLOP/s of our training step (FLOPs counted analytically, cross-checked
          with `torch.utils.flop_counter.FlopCounterMode`) as a fraction of a large matmul's, timed
          between the training steps, in float32 and, where bf16 is native, in bfloat16.
* decode: beam-4 decoding of test_2016_flickr: ours with and without the key/value cache against
          Hugging Face's `MarianMTModel.generate` (same dimensions, random weights), on the same
          token-bucketed batches, in float32 and (where bf16 is native) with both models' weights in
          bfloat16; EOS is made impossible on both sides so that every sentence of a batch runs
          exactly S decoder steps (S = the batch's padded source length).
* memory: peak RSS of training and decoding, each measured in a fresh subprocess.

Both sides of every comparison run in this one process, with the same model dimensions, the same
batches, the same thread count and the same malloc setting (`keep_freed_memory`), interleaved
(A, B, A, B, ...) so that background load hits both alike; the tables report medians and ratios.
All models have random weights: speed does not depend on what they learned.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from transformer.config import Config, load_config
from transformer.data import Batch, collate, encode_pairs, load_split, make_batches
from transformer.model import Transformer, sinusoidal_table
from transformer.runtime import (
    PRECISION_DTYPES, bound_onednn_caches, has_native_bf16, keep_freed_memory, resolve_precision,
)
from transformer.search import beam_search
from transformer.tokenizer import BOS_ID, EOS_ID, PAD_ID, load_or_train_tokenizers
from transformer.loss import TranslationLoss
from transformer.translator import source_ids

SECTIONS = ("train", "flops", "decode", "memory")
PEAK = "matmul peak"  # the run timing the peak matmul among the training steps
MEMORY_JOBS = ("train-ours", "train-peer", "decode-ours", "decode-hf")
_START = time.perf_counter()


def progress(message: str) -> None:
    """A progress line on stderr, with the seconds since the start (stdout is kept for the tables)."""
    print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The peer: what a user would write with torch.nn.Transformer
# --------------------------------------------------------------------------------------------

class TorchTransformerLoss(nn.Module):
    """Our model's architecture and loss written the usual way around `torch.nn.Transformer`.

    One embedding shared by source, target and the output projection, scaled by sqrt(D) and summed
    with the paper's sinusoidal positions, then dropout; logits at every target position, padding
    included, and `F.cross_entropy` with `ignore_index` and label smoothing. (`nn.Transformer`
    adds a final LayerNorm to each stack even when post-LN: 4·D extra parameters, no matmul.)

    Args:
        vocab_size: shared vocabulary V.
        d_model, n_heads, d_ff, n_encoder_layers, n_decoder_layers, dropout: as for `Transformer`.
        label_smoothing: epsilon_ls.
        max_len: positions in the sinusoidal table.
    """

    def __init__(
        self, vocab_size: int, d_model: int, n_heads: int, d_ff: int, n_encoder_layers: int, n_decoder_layers: int,
        dropout: float = 0.1, label_smoothing: float = 0.1, max_len: int = 1024,
    ) -> None:
        super().__init__()
        self.d_model, self.label_smoothing = d_model, label_smoothing
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=PAD_ID)
        nn.init.normal_(self.embedding.weight, std=d_model**-0.5)
        self.register_buffer("positions", sinusoidal_table(max_len, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.transformer = nn.Transformer(
            d_model, n_heads, n_encoder_layers, n_decoder_layers, d_ff, dropout, batch_first=True,
        )

    def _embed(self, tokens: Tensor) -> Tensor:
        """(B, L) -> (B, L, D)."""
        x = self.embedding(tokens) * math.sqrt(self.d_model) + self.positions[: tokens.size(1)]
        return self.dropout(x)

    def forward(self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> Tensor:
        """src (B, S), tgt_in (B, T), tgt_out (B, T) -> summed loss (scalar)."""
        T = tgt_in.size(1)
        src_pad, tgt_pad = src.eq(PAD_ID), tgt_in.eq(PAD_ID)
        future = torch.ones(T, T, dtype=torch.bool, device=src.device).triu(1)  # True = may not attend
        hidden = self.transformer(
            self._embed(src), self._embed(tgt_in), tgt_mask=future, src_key_padding_mask=src_pad,
            tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad, tgt_is_causal=True,
        )  # (B, T, D)
        logits = F.linear(hidden, self.embedding.weight)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=PAD_ID,
                               label_smoothing=self.label_smoothing, reduction="sum")


def build_trainers(cfg: Config, vocab_size: int, seed: int) -> dict[str, nn.Module]:
    """Our `TranslationLoss` and the `nn.Transformer` peer with the config's dimensions."""
    m = cfg.model
    torch.manual_seed(seed)
    ours = TranslationLoss(Transformer.from_config(m, vocab_size, vocab_size, PAD_ID), cfg.train.label_smoothing)
    peer = TorchTransformerLoss(vocab_size, m.d_model, m.n_heads, m.d_ff, m.n_encoder_layers, m.n_decoder_layers,
                                m.dropout, cfg.train.label_smoothing)
    return {"ours": ours.train(), "nn.Transformer": peer.train()}


# --------------------------------------------------------------------------------------------
# FLOP counting
# --------------------------------------------------------------------------------------------

def training_flops(
    batch_size: int, src_len: int, tgt_len: int, encoder_rows: int, logit_rows: int, d_model: int, d_ff: int,
    n_encoder_layers: int, n_decoder_layers: int, vocab_size: int,
) -> int:
    """Matrix-multiplication FLOPs of one training step (forward + backward) of the Transformer.

    A (M, K) x (K, N) product costs 2·M·K·N forward and twice that backward (gradients of both
    operands), so a training step costs 3x the forward count. Per layer, with `rows` rows of width
    D: attention projections 2·rows·D·D each (Q, K, V, output; cross-attention's K and V over the
    B·S source rows), Q K^T and A V 2·B·T·S·D each (summed over heads, d_k·H = D; masked entries
    included, as dense kernels compute them), feed-forward 2·rows·D·d_ff twice. The encoder's
    rows are `encoder_rows`, the decoder's B·T. The output projection costs 2·logit_rows·D·V.
    Embedding lookups, softmax and LayerNorm are not counted.

    Args:
        batch_size: B.
        src_len, tgt_len: padded lengths S and T.
        encoder_rows: source positions the encoder's projections and feed-forward run on: B·S
            for a padded encoder, the non-pad count for ours (`Encoder` packs the real tokens).
        logit_rows: target positions that get logits: B·T for full logits, the non-pad count for
            `TranslationLoss`.
        d_model, d_ff, n_encoder_layers, n_decoder_layers, vocab_size: model dimensions.

    Returns:
        FLOPs of forward + backward.
    """
    B, S, T, D = batch_size, src_len, tgt_len, d_model
    src_rows, tgt_rows = B * S, B * T
    encoder_layer = (
        2 * encoder_rows * D * 3 * D + 2 * encoder_rows * D * D  # Q, K, V and output projections
        + 2 * (2 * B * S * S * D)  # Q K^T and A V
        + 2 * (2 * encoder_rows * D * d_ff)  # feed-forward
    )
    decoder_layer = (
        2 * tgt_rows * D * 3 * D + 2 * tgt_rows * D * D + 2 * (2 * B * T * T * D)  # causal self-attention
        + 2 * tgt_rows * D * D + 2 * src_rows * D * 2 * D + 2 * tgt_rows * D * D  # cross-attention projections
        + 2 * (2 * B * T * S * D)  # cross-attention Q K^T and A V
        + 2 * (2 * tgt_rows * D * d_ff)
    )
    forward = n_encoder_layers * encoder_layer + n_decoder_layers * decoder_layer + 2 * logit_rows * D * vocab_size
    return 3 * forward


def batch_flops(cfg: Config, vocab_size: int, batch: Batch, ours: bool) -> int:
    """`training_flops` of one batch for the config's model: ours runs the encoder on the real
    source tokens and the output projection on the real target tokens, the peer on every position."""
    B, S = batch.src.shape
    T = batch.tgt_in.size(1)
    m = cfg.model
    encoder_rows, logit_rows = (batch.n_src_tokens, batch.n_tgt_tokens) if ours else (B * S, B * T)
    return training_flops(B, S, T, encoder_rows, logit_rows, m.d_model, m.d_ff, m.n_encoder_layers,
                          m.n_decoder_layers, vocab_size)


def counted_flops(trainer: nn.Module, batch: Batch) -> int:
    """FLOPs of one forward + backward as `FlopCounterMode` counts them.

    FlopCounterMode has no formula for the CPU flash-attention kernel, so attention runs through
    the math backend here, whose matmuls it counts.
    """
    trainer.zero_grad(set_to_none=True)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        trainer(batch.src, batch.tgt_in, batch.tgt_out).backward()
    trainer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_run(n: int, dtype: torch.dtype) -> Callable[[int], float]:
    """A run for `interleaved`: one (n, n) x (n, n) `torch.matmul` in `dtype`, returning its seconds."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)

    def run(_: int) -> float:
        start = time.perf_counter()
        torch.matmul(a, b)
        return time.perf_counter() - start

    return run


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

@dataclass
class Setup:
    """The vocabulary and the batches every section uses."""

    vocab_size: int
    train_batches: list[Batch]  # spread over the length range, shortest first
    test_sources: list[list[int]]  # source ids (with EOS) of the test sentences decoded


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
    return Setup(tokenizer.vocab_size, [collate(b, data) for b in spread(batches, n_batches)], sources)


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


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def precision_context(precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on the CPU, or nothing for float32."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def adam(trainer: nn.Module) -> torch.optim.Optimizer:
    """The optimizer both sides get: Adam in its fused form, the step `transformer-train` takes
    (AdamW with its default weight decay of 0 is Adam)."""
    return torch.optim.Adam(trainer.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=True)


def train_step(trainer: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, precision: str) -> float:
    """One forward + backward + Adam step; returns its wall-clock seconds."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with precision_context(precision):
        loss = trainer(batch.src, batch.tgt_in, batch.tgt_out)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


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


def time_training(
    trainers: dict[str, nn.Module], batches: list[Batch], precisions: Sequence[str], repeats: int, warmup: int,
    peak_size: int = 2048,
) -> tuple[dict[str, dict[str, dict]], dict[str, float]]:
    """Interleaved training-step timings of every model in every precision, and the matmul peak
    in each precision timed among them; warm-up steps (spread over the batches) not counted.

    Each (precision, model) pair trains its own copy of the model with its own optimizer, and all
    pairs take turns batch by batch, so that a ratio across precisions is as side by side as one
    within a precision. After each batch's steps, a (peak_size, peak_size) matmul is timed in each
    precision (none if peak_size is 0), so that the peak that achieved FLOP/s are divided by is
    measured at the same moments as the steps (a shared machine's speed drifts by tens of percent
    within minutes).

    Returns:
        precision -> name -> {"tokens_per_s", "seconds_per_pass", "tokens_per_pass", "batch_seconds":
        per batch median, "passes_tokens_per_s": one figure per repeat}; and precision -> median
        FLOP/s of the matmul ({} if peak_size is 0).
    """
    pairs = {(precision, name): trainer if i == 0 else copy.deepcopy(trainer)
             for i, precision in enumerate(precisions) for name, trainer in trainers.items()}
    optimizers = {pair: adam(trainer) for pair, trainer in pairs.items()}
    matmuls = {(precision, PEAK): matmul_run(peak_size, PRECISION_DTYPES[precision])
               for precision in precisions if peak_size > 0}
    for batch in spread(batches, warmup):
        for pair, trainer in pairs.items():
            train_step(trainer, optimizers[pair], batch, pair[0])
    for run in matmuls.values():
        run(0)
    runs: dict[Hashable, Callable[[int], float]] = {
        pair: (lambda i, t=trainer, o=optimizers[pair], p=pair[0]: train_step(t, o, batches[i], p))
        for pair, trainer in pairs.items()}
    times = interleaved({**runs, **matmuls}, len(batches), repeats)
    tokens = sum(n_tokens(b) for b in batches)
    results: dict[str, dict[str, dict]] = {precision: {} for precision in precisions}
    for (precision, name), t in times.items():
        if name == PEAK:
            continue
        seconds = pass_seconds(t)
        results[precision][name] = {
            "tokens_per_s": tokens / seconds, "seconds_per_pass": seconds, "tokens_per_pass": tokens,
            "batch_seconds": [statistics.median(c) for c in zip(*t)],
            "passes_tokens_per_s": [tokens / sum(p) for p in t],
        }
    peaks = {precision: 2 * peak_size**3 / statistics.median(x for p in times[(precision, PEAK)] for x in p)
             for precision, _ in matmuls}
    return results, peaks


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

def hf_marian(cfg: Config, vocab_size: int) -> nn.Module:
    """A randomly initialised `MarianMTModel` with our model's dimensions (never pretrained weights)."""
    # Imported here: it is slow, and only the decoding sections need it.
    from transformers import MarianConfig, MarianMTModel

    m = cfg.model
    config = MarianConfig(
        vocab_size=vocab_size, d_model=m.d_model, encoder_layers=m.n_encoder_layers, decoder_layers=m.n_decoder_layers,
        encoder_attention_heads=m.n_heads, decoder_attention_heads=m.n_heads, encoder_ffn_dim=m.d_ff,
        decoder_ffn_dim=m.d_ff, max_position_embeddings=m.max_len, activation_function="relu", scale_embedding=True,
        dropout=m.dropout, attention_dropout=m.attention_dropout, activation_dropout=0.0,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=BOS_ID, decoder_start_token_id=BOS_ID,
        # MarianConfig would otherwise force token 0 at the last step; lengths are fixed here anyway.
        forced_eos_token_id=None, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
    )
    return MarianMTModel(config).eval()


def decode_batches(sources: list[list[int]], batch_tokens: int) -> list[Tensor]:
    """Padded (B, S) source tensors, token-bucketed as `translator.translate_ids` batches them."""
    lengths = [len(s) for s in sources]
    batches = []
    for batch in make_batches(lengths, lengths, batch_tokens):
        rows = [sources[i] for i in batch]
        src = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)
        for r, ids in enumerate(rows):
            src[r, : len(ids)] = torch.tensor(ids)
        batches.append(src)
    return batches


def steps_for(src: Tensor) -> int:
    """Decoder steps every sentence of a batch gets: its padded source length (the a=1, b=0 limit)."""
    return src.size(1)


def decode_ours(model: Transformer, src: Tensor, beam_size: int, use_cache: bool) -> float:
    """Beam search for exactly `steps_for(src)` decoder steps per sentence; returns seconds.

    Random weights would end sentences at arbitrary times, so EOS is made impossible: passing
    `eos_id=PAD_ID` makes the end token one the search never generates (padding is always masked),
    so every hypothesis runs to the maximum length L = max_len_b, where the forced "EOS" step is
    the (L+1)-th decoder call. The search then returns no hypotheses, which the timing ignores.
    """
    start = time.perf_counter()
    beam_search(model, src, beam_size, 0.6, max_len_a=0.0, max_len_b=steps_for(src) - 1, bos_id=BOS_ID,
                eos_id=PAD_ID, use_cache=use_cache)
    return time.perf_counter() - start


def decode_hf(model: nn.Module, src: Tensor, beam_size: int) -> float:
    """`generate` with beam search for exactly `steps_for(src)` new tokens; returns seconds."""
    steps = steps_for(src)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=src, attention_mask=src.ne(PAD_ID), num_beams=beam_size, do_sample=False,
                       length_penalty=0.6, min_new_tokens=steps, max_new_tokens=steps, use_cache=True)
    return time.perf_counter() - start


# (faster, slower, what the ratio says) for every pair of decoders the report compares.
DECODE_RATIOS = (
    ("ours (cache)", "HF Marian", "ours / HF Marian, both float32"),
    ("ours (cache, bf16)", "HF Marian (bf16)", "ours / HF Marian, both bfloat16"),
    ("ours (cache)", "ours (no cache)", "ours with the cache / without it, float32"),
)


def decoders(cfg: Config, vocab_size: int, beam_size: int, variants: Sequence[str]) -> dict[str, Callable[[Tensor], float]]:
    """name -> function decoding one source batch and returning its seconds.

    Names: "ours (cache)", "ours (no cache)", "HF Marian", "ours (cache, bf16)", "HF Marian (bf16)";
    the "bf16" variants hold their weights (and so compute) in bfloat16, the others in float32.
    Every variant of one model gets the same random weights (seed 0).
    """
    runs: dict[str, Callable[[Tensor], float]] = {}
    for name in variants:
        dtype = torch.bfloat16 if "bf16" in name else torch.float32
        torch.manual_seed(0)
        if name.startswith("ours"):
            ours = Transformer.from_config(cfg.model, vocab_size, vocab_size, PAD_ID).eval().to(dtype)
            runs[name] = lambda src, m=ours, c="no cache" not in name: decode_ours(m, src, beam_size, use_cache=c)
        else:
            marian = hf_marian(cfg, vocab_size).to(dtype)
            runs[name] = lambda src, m=marian: decode_hf(m, src, beam_size)
    return runs


def time_decoding(
    cfg: Config, setup: Setup, sources: list[list[int]], beam_size: int, repeats: int, variants: Sequence[str],
) -> dict[str, dict]:
    """Interleaved decoding timings over `sources`; one short warm-up batch per variant."""
    batches = decode_batches(sources, cfg.decode.batch_tokens)
    runs = decoders(cfg, setup.vocab_size, beam_size, variants)
    for run in runs.values():
        run(batches[0][:4])
    times = interleaved({name: (lambda i, f=f: f(batches[i])) for name, f in runs.items()}, len(batches), repeats)
    sentences = sum(b.size(0) for b in batches)
    tokens = sum(b.size(0) * steps_for(b) for b in batches)
    results = {}
    for name, t in times.items():
        seconds = pass_seconds(t)
        results[name] = {"sentences_per_s": sentences / seconds, "tokens_per_s": tokens / seconds,
                         "seconds_per_pass": seconds, "passes_tokens_per_s": [tokens / sum(p) for p in t],
                         "sentences": sentences, "tokens": tokens, "batches": len(batches)}
    return results


# --------------------------------------------------------------------------------------------
# Memory (each job in a fresh process)
# --------------------------------------------------------------------------------------------

def rss_mib(field: str = "VmRSS") -> float:
    """This process's current ("VmRSS") or peak ("VmHWM") resident set size, MiB.

    The peak is read from /proc rather than `getrusage(RUSAGE_SELF).ru_maxrss` because Linux carries
    ru_maxrss across fork + exec: a child would report at least its parent's size at the fork.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (VmHWM) from the current RSS; False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def memory_job(job: str, cfg: Config, args: argparse.Namespace) -> dict:
    """Run one job in this (fresh) process and report its RSS in MiB.

    The peak is counted from the moment the data and the model are loaded (`baseline_mib`), so that
    it measures the job and not the loading of the training corpus before it.
    """
    setup = load_setup(cfg, args.memory_steps, args.decode_sentences)
    if job.startswith("train"):
        trainer = build_trainers(cfg, setup.vocab_size, args.seed)["ours" if job == "train-ours" else "nn.Transformer"]
        optimizer = adam(trainer)
        precision = resolve_precision(cfg.train.precision, torch.device("cpu"))  # as the config trains here
        peak_reset, baseline = reset_peak_rss(), rss_mib()
        for batch in setup.train_batches:
            train_step(trainer, optimizer, batch, precision)
        work = f"training steps: {len(setup.train_batches)}, batches of <= {cfg.train.max_tokens} tokens, {precision}"
    else:
        variant = "ours (cache)" if job == "decode-ours" else "HF Marian"
        run = decoders(cfg, setup.vocab_size, args.beam_size, [variant])[variant]
        batches = decode_batches(setup.test_sources, cfg.decode.batch_tokens)
        peak_reset, baseline = reset_peak_rss(), rss_mib()
        for src in batches:
            run(src)
        work = f"beam {args.beam_size} over {len(setup.test_sources)} sentences"
    return {"job": job, "baseline_mib": baseline, "peak_mib": rss_mib("VmHWM"), "peak_from_baseline": peak_reset,
            "work": work}


def measure_memory(args: argparse.Namespace) -> dict[str, dict]:
    """Run every memory job in a fresh subprocess of this script, one after the other."""
    script = str(Path(__file__).resolve())
    results = {}
    for job in MEMORY_JOBS:
        progress(f"memory: {job} in a subprocess")
        command = [sys.executable, script, "--config", args.config, "--threads", str(args.threads),
                   "--max-tokens", str(args.max_tokens), "--memory-steps", str(args.memory_steps),
                   "--decode-sentences", str(args.decode_sentences), "--beam-size", str(args.beam_size),
                   "--seed", str(args.seed), "--memory-job", job]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory job {job} failed:\n{done.stderr[-2000:]}")
        results[job] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def machine() -> dict:
    """CPU model, cores, library versions and threads."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": has_native_bf16(torch.device("cpu"))}
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


def report(results: dict) -> str:
    """The markdown tables of whatever sections ran."""
    m = results["machine"]
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['capability']}, "
           + ("native bf16" if m["native_bf16"] else "no native bf16") + f"; torch {m['torch']}"
           + (f", transformers {m['transformers']}" if "transformers" in m else "") + f"; torch threads: {m['threads']}."]
    if "train" in results:
        train = results["train"]
        rows = []
        for key, label in (("fp32", "float32"), ("bf16", "bfloat16 autocast"), ("fp32_small", "float32, bf16's batches")):
            if key not in train:
                continue
            r = train[key]
            ours, peer = r["models"]["ours"], r["models"]["nn.Transformer"]
            rows.append([label, f"{r['batches']} ({r['tokens']:,} tokens)", f"{ours['tokens_per_s']:,.0f}",
                         f"{peer['tokens_per_s']:,.0f}", f"{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x",
                         pass_ratios(ours, peer)])
        if "fp32_small" not in train and "bf16" in train:  # bf16 ran on the float32 batches
            ours, peer = train["bf16"]["models"]["ours"], train["fp32"]["models"]["nn.Transformer"]
            rows.append(["**ours in bfloat16 / nn.Transformer in float32**", "the same", f"{ours['tokens_per_s']:,.0f}",
                         f"{peer['tokens_per_s']:,.0f}", f"**{ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x**",
                         pass_ratios(ours, peer)])
        out += ["", "Training step, forward + backward + fused Adam, both precisions interleaved (source + target "
                "tokens/s, medians; the last column is the ratio of each timed pass over all the batches):", "",
                table(["precision", "batches", "ours", "nn.Transformer", "ours / nn.Transformer", "per pass"], rows)]
    if "flops" in results:
        f = results["flops"]
        rows = [[name, precision, f"{r['flops_per_pass'] / 1e9:,.1f}", f"{r['seconds_per_pass']:.2f}",
                 f"{r['flop_per_s'] / 1e9:.1f}", f"{f['peak_flop_per_s'][precision] / 1e9:.1f}",
                 f"{r['fraction_of_peak']:.0%}"]
                for precision, models in f["models"].items() for name, r in models.items()]
        check = f["check"]
        out += ["", "Achieved matmul FLOP/s of the training step (FLOPs counted analytically), against the peak of "
                f"a {f['peak_size']}² matmul in the same precision (median, timed between the training steps):", "",
                table(["model", "precision", "GFLOP per pass", "s per pass", "GFLOP/s", "peak GFLOP/s", "fraction"], rows),
                "", f"FLOP count check on one batch {check['shape']}: "
                + ", ".join(f"{name} {c['analytic'] / 1e9:.3f} GFLOP analytic vs {c['counted'] / 1e9:.3f} FlopCounterMode"
                            f" ({c['analytic'] / c['counted'] - 1:+.2%})" for name, c in check["models"].items())]
    if "decode" in results:
        d = results["decode"]
        for runs in d["comparisons"]:
            base = runs["ours (cache)"]
            rows = [[name, f"{r['sentences_per_s']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['seconds_per_pass']:.1f}", ""]
                    for name, r in runs.items()]
            rows += [[f"**{label}**", f"**{runs[fast]['sentences_per_s'] / runs[slow]['sentences_per_s']:.2f}x**", "", "",
                      pass_ratios(runs[fast], runs[slow])]
                     for fast, slow, label in DECODE_RATIOS if fast in runs and slow in runs]
            caption = (f"Beam-{d['beam_size']} decoding, {base['sentences']} test sentences in {base['batches']} "
                       f"batches, each sentence decoded for its batch's padded source length "
                       f"({base['tokens']:,} target tokens); ratios of sentences/s (medians per batch; the last "
                       "column is the ratio of each timed pass over all the batches):")
            out += ["", caption, "", table(["decoder", "sentences/s", "target tokens/s", "s per pass", "per pass"], rows)]
    if "memory" in results:
        rows = [[job, r["work"], f"{r['peak_mib']:,.0f}", f"{r['peak_mib'] - r['baseline_mib']:,.0f}"]
                for job, r in results["memory"].items()]
        caption = ("Peak resident memory, each job in a fresh process (MiB; baseline = RSS after loading data and "
                   "model; peak = highest RSS from then on):")
        out += ["", caption, "", table(["job", "work", "peak RSS", "peak - baseline"], rows)]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

def run_train(cfg: Config, setup: Setup, args: argparse.Namespace) -> dict:
    """Training throughput in float32 and under bfloat16 autocast.

    Where bf16 is native, both precisions run interleaved on the same batches. Elsewhere (emulated
    bf16 is many times slower than float32) float32 runs on the full batches, then bf16 and float32
    on a few small ones.
    """
    trainers = build_trainers(cfg, setup.vocab_size, args.seed)
    if has_native_bf16(torch.device("cpu")):
        plan = [(("fp32", "bf16"), setup.train_batches, args.repeats, args.warmup)]
    else:
        small = [shrink(b, args.bf16_max_tokens) for b in spread(setup.train_batches, args.bf16_batches)]
        plan = [(("fp32",), setup.train_batches, args.repeats, args.warmup),
                (("bf16", "fp32_small"), small, args.bf16_repeats, 1)]
    results = {}
    for keys, batches, repeats, warmup in plan:
        if not batches or repeats < 1:
            continue
        progress(f"train {' + '.join(keys)}: {len(batches)} batches x {repeats} repeats")
        precisions = ["fp32" if key == "fp32_small" else key for key in keys]
        # The FLOP section divides by the peak only for timings on the full batches.
        peak_size = 0 if "fp32_small" in keys else args.peak_size
        timed, peaks = time_training(trainers, batches, precisions, repeats, warmup, peak_size)
        for key, precision in zip(keys, precisions):
            results[key] = {
                "models": timed[precision], "peak_flop_per_s": peaks.get(precision), "batches": len(batches),
                "tokens": sum(n_tokens(b) for b in batches),
                "shapes_b_s_t": [[b.src.size(0), b.src.size(1), b.tgt_in.size(1)] for b in batches],
            }
    return results


def run_flops(cfg: Config, setup: Setup, args: argparse.Namespace, train: dict | None) -> dict:
    """Analytic FLOPs over the training timings of each precision that ran on the full batches.

    Float32 is timed here if the train section did not run; bfloat16 is counted only from the
    train section's timings, when they are on the same batches (native bf16).
    """
    trainers = build_trainers(cfg, setup.vocab_size, args.seed)
    batches = setup.train_batches
    timings: dict[str, dict] = {}
    peaks: dict[str, float] = {}
    if train is None or "fp32" not in train:
        progress(f"flops: timing ours, {len(batches)} batches x {args.repeats} repeats")
        ours_only, peaks = time_training({"ours": trainers["ours"]}, batches, ["fp32"], args.repeats, args.warmup,
                                         args.peak_size)
        timings["fp32"] = ours_only["fp32"]
    else:
        for precision in ["fp32"] + (["bf16"] if "bf16" in train and "fp32_small" not in train else []):
            timings[precision], peaks[precision] = train[precision]["models"], train[precision]["peak_flop_per_s"]
    progress("flops: FlopCounterMode check")
    models: dict[str, dict] = {}
    for precision, timed in timings.items():
        models[precision] = {}
        for name, r in timed.items():
            flops = sum(batch_flops(cfg, setup.vocab_size, b, ours=name == "ours") for b in batches)
            rate = flops / r["seconds_per_pass"]
            models[precision][name] = {"flops_per_pass": flops, "seconds_per_pass": r["seconds_per_pass"],
                                       "flop_per_s": rate, "fraction_of_peak": rate / peaks[precision]}
    batch = batches[len(batches) // 2]
    check = {name: {"analytic": batch_flops(cfg, setup.vocab_size, batch, ours=name == "ours"),
                    "counted": counted_flops(trainer, batch)} for name, trainer in trainers.items()}
    shape = f"B={batch.src.size(0)}, S={batch.src.size(1)}, T={batch.tgt_in.size(1)}"
    return {"models": models, "peak_flop_per_s": peaks, "peak_size": args.peak_size,
            "check": {"shape": shape, "models": check}}


def run_decode(cfg: Config, setup: Setup, args: argparse.Namespace) -> dict:
    """Beam decoding: ours with and without the cache, and Hugging Face Marian."""
    against_marian = ["ours (cache)", "HF Marian"]
    if has_native_bf16(torch.device("cpu")):
        against_marian += ["ours (cache, bf16)", "HF Marian (bf16)"]
    comparisons = [(setup.test_sources, against_marian)]
    if not args.skip_uncached:
        # Recomputing every prefix is slow: compared with the cache on the first sentences only.
        comparisons.append((setup.test_sources[: args.uncached_sentences], ["ours (cache)", "ours (no cache)"]))
    results = []
    for sources, variants in comparisons:
        progress(f"decode: {len(sources)} sentences x {args.decode_repeats} repeats: {', '.join(variants)}")
        results.append(time_decoding(cfg, setup, sources, args.beam_size, args.decode_repeats, variants))
    return {"beam_size": args.beam_size, "comparisons": results}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/multi30k_de_en.yaml", help="model dimensions, data, batch size")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    parser.add_argument("--json", default="runs/benchmark.json", help="where to write all results")
    parser.add_argument("--threads", type=int, help="torch intra-op threads; None: 2, or 1 with --quick")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=0, help="training batch budget (0: the config's)")
    parser.add_argument("--batches", type=int, default=20, help="training batches, spread over the length range")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the batches")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per model")
    parser.add_argument("--bf16-batches", type=int, default=2,
                        help="batches for the bfloat16 runs on a CPU without native bf16 (where it is slow)")
    parser.add_argument("--bf16-max-tokens", type=int, default=600,
                        help="on a CPU without native bf16, bfloat16 batches are cut to this many tokens per side")
    parser.add_argument("--bf16-repeats", type=int, default=2, help="bfloat16 repeats on a CPU without native bf16")
    parser.add_argument("--peak-size", type=int, default=2048, help="n of the n x n matmul measuring the peak")
    parser.add_argument("--decode-sentences", type=int, default=1000, help="test sentences to decode")
    parser.add_argument("--decode-repeats", type=int, default=2)
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--skip-uncached", action="store_true", help="leave out ours without the cache (slowest)")
    parser.add_argument("--uncached-sentences", type=int, default=200,
                        help="test sentences for the cache vs no-cache comparison")
    parser.add_argument("--memory-steps", type=int, default=10, help="training steps per memory job")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 minute)")
    parser.add_argument("--memory-job", choices=MEMORY_JOBS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None:
        # A smoke run must be quick on a busy shared machine too, where two spinning OpenMP threads
        # competing with other work are many times slower than one.
        args.threads = 1 if args.quick else 2
    if args.quick:
        args.max_tokens, args.batches, args.repeats, args.warmup = 200, 2, 1, 1
        args.bf16_batches, args.bf16_max_tokens, args.bf16_repeats = 1, 24, 1
        args.peak_size = 1024
        args.decode_sentences, args.decode_repeats = 6, 1
        args.memory_steps = 1
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # one process, so both sides of every comparison get the same allocator
    bound_onednn_caches()  # and the same oneDNN kernel caches
    cfg = load_config(args.config, [f"train.max_tokens={args.max_tokens}"] if args.max_tokens else [])
    if args.memory_job is not None:
        print(json.dumps(memory_job(args.memory_job, cfg, args)))
        return
    sections = args.only or list(SECTIONS)
    results: dict = {"machine": machine(), "args": vars(args)}
    if {"train", "flops", "decode"} & set(sections):
        progress("loading data and tokenizer")
        setup = load_setup(cfg, args.batches, args.decode_sentences)
        if "train" in sections:
            results["train"] = run_train(cfg, setup, args)
        if "flops" in sections:
            results["flops"] = run_flops(cfg, setup, args, results.get("train"))
        if "decode" in sections:
            results["decode"] = run_decode(cfg, setup, args)
    if "memory" in sections:
        results["memory"] = measure_memory(args)
    print(report(results))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
