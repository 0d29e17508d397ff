"""The parts of one training step: its precision (autocast, the loss scaler fp16 needs, the run's
choice of precision), its learning rate, the forward and backward passes over the step's batches,
the update (clip, agree across ranks, step), and the timing of steps that train.short_budget
projects the budget with.

This module imports nothing from the training loop (`transformer.train`), which builds on it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from transformer.config import Config, ConfigError
from transformer.data.batches import Batch, ParallelData, collate
from transformer.data.prepared import PreparedData
from transformer.data.tokenizer import PAD_ID
from transformer.model import Transformer
from transformer.precision import ProbeShape, choose_precision
from transformer.training.budget import Position, budget_used
from transformer.training.distributed import Ranks
from transformer.training.loss import TranslationLoss
from transformer.training.schedule import cooldown_factor, noam_lr

# Steps timed (after two untimed ones) where train.short_budget=auto projects a run's steps.
TIMED_STEPS = 8

log = logging.getLogger(__name__)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for train.precision ("fp32" runs without one)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision='fp16' needs a CUDA device; use 'bf16' on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler fp16 needs (None for fp32 and bf16, whose range needs none)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def run_precision(cfg: Config, device: torch.device, ranks: Ranks, recorded: Config | None) -> str:
    """train.precision resolved for this run (see `precision.choose_precision`).

    A resumed run whose setting is "auto" keeps the precision its checkpoint recorded, so that it
    replays bit for bit, and is never decided again. Otherwise global rank 0 decides, logs the
    probe's figure, and every rank follows it.
    """
    tc = cfg.train
    if recorded is not None and tc.precision == "auto" and recorded.train.precision != "auto":
        log.info("precision: %s, as the run recorded it", recorded.train.precision)
        return recorded.train.precision
    choice = None
    if ranks.rank == 0:
        shape = ProbeShape.of(cfg.model.d_model, cfg.model.d_ff, cfg.tokenizer.vocab_size, tc.max_tokens, training=True)
        choice = choose_precision(tc.precision, device, shape)
        if tc.precision == "auto":
            log.info("precision: %s", choice.describe())
    return ranks.gather_objects(None if choice is None else choice.precision)[0]


def learning_rate(cfg: Config, position: Position, batches_per_epoch: int, ranks: Ranks) -> float:
    """The rate of the step after `position`: warm-up, then the inverse square root of the step
    (the paper's section 5.3, eq. 3), times the linear cool-down where train.cooldown is set."""
    tc = cfg.train
    lr = noam_lr(position.step + 1, cfg.model.d_model, tc.warmup_steps, tc.lr_scale, tc.lr_decay)
    if tc.cooldown:
        # Ranks may disagree on elapsed time; they must agree on the learning rate.
        used = ranks.reduce_host([budget_used(tc, position, batches_per_epoch)], dist.ReduceOp.MAX)[0]
        lr *= cooldown_factor(used, tc.cooldown)
    return lr


def backward(
    trainer: nn.Module, batches: Sequence[Batch], tgt_tokens: float, scaler: torch.amp.GradScaler | None,
    precision: str, device: torch.device, world_size: int,
) -> Tensor:
    """Forward and backward over one step's batches (gradient accumulation): the gradients of the
    step's summed loss divided by `tgt_tokens`, its target tokens over all ranks.

    Args:
        trainer: the loss module (`TranslationLoss`), wrapped by DDP where `world_size` > 1.

    Returns:
        () float64, this rank's summed loss, left on the device.
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        # Gradients are averaged over ranks once per step, at its last batch.
        sync = contextlib.nullcontext() if world_size == 1 or i == len(batches) - 1 else trainer.no_sync()
        with sync:
            with autocast(precision, device):
                loss = trainer(batch.src, batch.tgt_in, batch.tgt_out, batch.src_index, batch.tgt_index)
            # DDP averages gradients over ranks; scaling by world_size makes the result the
            # gradient of the global loss sum divided by the global token count.
            scaled = loss * (world_size / tgt_tokens)
            (scaled if scaler is None else scaler.scale(scaled)).backward()
        loss_sum += loss.detach().double()
    return loss_sum


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, clip_norm: float,
    loss_sum: Tensor, ranks: Ranks,
) -> tuple[bool, float]:
    """Clip the gradients, agree across ranks whether the step is finite, and update if it is.

    The summed loss and the gradient norm are packed into one tensor, summed over ranks and read
    on the host: the step's one collective and its one wait for the device. A non-finite value on
    any rank makes the sums non-finite on every rank, so all ranks take the same branch. With a
    `scaler`, gradients that overflowed are the scaler's business (it skips the update itself and
    lowers the scale); a non-finite loss skips `scaler.step`, and `scaler.update()` runs after
    every `unscale_()`, so the next step's `unscale_()` is allowed.

    Args:
        loss_sum: () float64 on the device, this rank's summed loss over the step's batches.

    Returns:
        Whether the step was finite (updated, or left to the scaler), and the loss summed over ranks.
    """
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm if clip_norm > 0 else float("inf"))
    loss_total, norm_total = ranks.sum_on_device(torch.stack([loss_sum, grad_norm.to(torch.float64)]))
    finite = math.isfinite(loss_total) and (scaler is not None or math.isfinite(norm_total))
    if scaler is not None:
        if finite:
            scaler.step(optimizer)
        scaler.update()
    elif finite:
        optimizer.step()
    return finite, loss_total


def seconds_per_step(
    cfg: Config, device: torch.device, data: ParallelData | PreparedData, batches: list, src_vocab: int, tgt_vocab: int,
    steps: int = TIMED_STEPS,
) -> float:
    """The median seconds of a training step (`train.accumulate` batches, forward, backward, Adam)
    of a throwaway model of `cfg` on the first of `batches`, after two untimed steps. The random
    state is restored, so the run that follows is the one it would be without this. One process
    times itself: under torchrun the gradient all-reduce is left out, so the figure is a lower bound."""
    tc = cfg.train
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = Transformer.from_config(cfg.model, src_vocab, tgt_vocab, PAD_ID).to(device)
        loss_fn = TranslationLoss(model, tc.label_smoothing)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(tc.adam_beta1, tc.adam_beta2),
                                      eps=tc.adam_eps, fused=True)
        for first in range(0, min(len(batches), (steps + 2) * tc.accumulate), tc.accumulate):
            start = time.perf_counter()
            step_batches = [collate(indices, data).to(device) for indices in batches[first:first + tc.accumulate]]
            loss = backward(loss_fn, step_batches, sum(b.n_tgt_tokens for b in step_batches), None, tc.precision,
                            device, 1)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # waits for a GPU's queue
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:] or times)
