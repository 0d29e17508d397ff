"""Training-step throughput against `torch.nn.Transformer`, and the achieved matmul FLOP/s (sections train, flops)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time
from typing import Callable, Hashable, Sequence

import torch
import torch.nn.functional as F
from bench_common import Setup, interleaved, n_tokens, pass_ratios, pass_seconds, progress, shrink, spread, table
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from transformer.config import Config
from transformer.data.batches import Batch
from transformer.data.tokenizer import PAD_ID
from transformer.model import Transformer, sinusoidal_table
from transformer.runtime import PRECISION_DTYPES, has_native_bf16
from transformer.training.loss import TranslationLoss

PEAK = "matmul peak"  # the run timing the peak matmul among the training steps



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
        if isinstance(trainer, TranslationLoss):  # as the training loop calls it, with the batch's token positions
            loss = trainer(batch.src, batch.tgt_in, batch.tgt_out, batch.src_index, batch.tgt_index)
        else:
            loss = trainer(batch.src, batch.tgt_in, batch.tgt_out)
    loss.backward()
    optimizer.step()
    return time.perf_counter() - start


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


def report_train(results: dict) -> list[str]:
    """Markdown lines of the train section."""
    out: list[str] = []
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
    return out


def report_flops(results: dict) -> list[str]:
    """Markdown lines of the flops section."""
    out: list[str] = []
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
    return out
