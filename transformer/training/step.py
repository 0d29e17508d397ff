"""The parts of one training step: its batches (built and sent to the device while the step before
runs), its precision (autocast, the loss scaler fp16 needs, the run's choice of precision), its
learning rate, the forward and backward passes over the step's batches, the update (clip, agree
across ranks, step), what the ranks agree on between two steps, and the timing of steps that
train.short_budget projects the budget with.

This module imports nothing from the training loop (`transformer.train`), which builds on it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor, nn

from transformer.config import Config, ConfigError, TrainConfig
from transformer.data.batches import Batch, BatchSampler, ParallelData, collate
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


@dataclass
class StepBatches:
    """The train.accumulate batches of one optimizer step, on their way to the device, and where this
    rank's batch order stands after them."""

    batches: list[Batch]
    epoch: int
    batch: int  # index of the next batch within this rank's batches of `epoch`

    @property
    def tgt_tokens(self) -> int:
        """This rank's target tokens in the step (the labels its loss is summed over)."""
        return sum(b.n_tgt_tokens for b in self.batches)

    @property
    def all_tokens(self) -> int:
        """This rank's source and target tokens in the step."""
        return sum(b.n_src_tokens + b.n_tgt_tokens for b in self.batches)


class BatchStream:
    """This rank's batches, one step's worth at a time, in its order, going on into the next epoch's.

    `prefetch` builds the next step's batches on the host and starts their copies to the device
    (pinned memory, non-blocking), so that a step can do it while the device still runs its
    backward pass, before the step's one wait for the device; `take` hands them over.
    """

    def __init__(self, sampler: BatchSampler, data: ParallelData | PreparedData, device: torch.device,
                 accumulate: int, epoch: int, batch: int) -> None:
        self.sampler, self.data, self.device, self.accumulate = sampler, data, device, accumulate
        self.epoch, self.batch = epoch, batch
        self.epoch_batches = sampler.epoch_batches(epoch)
        self.next: StepBatches | None = None

    def prefetch(self) -> StepBatches:
        """The next step's batches, built now if they are not yet."""
        if self.next is None:
            batches = []
            while len(batches) < self.accumulate:
                if self.batch >= len(self.epoch_batches):
                    self.epoch, self.batch = self.epoch + 1, 0
                    self.epoch_batches = self.sampler.epoch_batches(self.epoch)
                batches.append(collate(self.epoch_batches[self.batch], self.data).to(self.device))
                self.batch += 1
            self.next = StepBatches(batches, self.epoch, self.batch)
        return self.next

    def take(self) -> StepBatches:
        """The next step's batches, which the next `prefetch` will no longer return."""
        step = self.prefetch()
        self.next = None
        return step


@dataclass
class Agreed:
    """What the ranks agree on between two steps, in one host collective (`agree`)."""

    tgt_tokens: float  # the next step's target tokens over all ranks: its loss is divided by them
    all_tokens: float  # the next step's source and target tokens over all ranks
    used: float  # the training budget spent, the most of any rank's: the next step's cool-down
    stop: bool  # a limit is reached on some rank
    signalled: bool  # some rank received SIGINT or SIGTERM


def agree(ranks: Ranks, tc: TrainConfig, position: Position, next_step: StepBatches, batches_per_epoch: int,
          stop: bool = False, signalled: bool = False) -> Agreed:
    """Agree across ranks, in one collective of host numbers, on the next step's token counts and
    budget and on whether to stop (`stop`, `signalled`: this rank's view). The budget is counted
    with the next step's batches taken, as its learning rate is."""
    used = budget_used(tc, replace(position, epoch=next_step.epoch, batch=next_step.batch), batches_per_epoch)
    (tgt, total), (used, stop_flag, signal_flag) = ranks.agree(
        [next_step.tgt_tokens, next_step.all_tokens], [used if tc.cooldown else 0.0, float(stop), float(signalled)])
    return Agreed(tgt, total, used, bool(stop_flag), bool(signal_flag))


def learning_rate(cfg: Config, step: int, used: float) -> float:
    """The rate of the step after `step`: warm-up, then the inverse square root of the step (the
    paper's section 5.3, eq. 3), times the linear cool-down where train.cooldown is set.

    Args:
        used: the fraction of the training budget spent (`budget.budget_used`), which ranks agree on.
    """
    tc = cfg.train
    lr = noam_lr(step + 1, cfg.model.d_model, tc.warmup_steps, tc.lr_scale, tc.lr_decay)
    if tc.cooldown:
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
