"""A training run's state, and its life around the loop: `start_run` places this process (device,
ranks), resolves the run's precision and checks the checkpoint a resumed run starts from, all
before any work; `Run` holds what the loop reads and updates, and saves it; `finish` writes the
average of the last checkpoints (and `close_finished` does for a resumed run that had finished).

The loop itself, and the data and model it builds into a `Run`, are in `transformer.train`, which
builds on this module; nothing here imports it.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transformer.checkpoint import (
    CheckpointError,
    checkpoint_config,
    load_resume_checkpoint,
    resume_changes,
    run_checkpoints,
)
from transformer.config import Config, ConfigError, TrainConfig
from transformer.data.batches import BatchSampler, ParallelData
from transformer.data.prepared import PreparedData
from transformer.data.tokenizer import Tokenizer
from transformer.model import Transformer
from transformer.runtime import use_tf32
from transformer.training.budget import Clock, Position, stop_reason
from transformer.training.distributed import Ranks, init_ranks, launch_rank, rng_states, run_device
from transformer.training.loss import TranslationLoss
from transformer.training.plot import plot_metrics
from transformer.training.run_data import resumed_data_fingerprint
from transformer.training.run_folder import (
    ProgressLog,
    RunLog,
    checkpoint_state,
    claim_run_folder,
    final_of_step,
    save_step,
    write_final,
)
from transformer.training.run_lock import RunLock
from transformer.training.short_budget import resolve_short_budget
from transformer.training.step import Agreed, BatchStream, autocast, run_precision

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss keeps diverging); the message says why."""


@dataclass(eq=False, repr=False)  # its fields are set in stages, which a generated repr cannot print
class Run:
    """A run's state: set up by `start_run`, then as its data is loaded and its model built, then
    read and updated by the steps of the training loop."""

    cfg: Config
    device: torch.device
    ranks: Ranks
    rank: int  # the global rank `torchrun` gave this process (0 without it); rank 0 writes the run folder
    lock: RunLock | None  # rank 0's hold on the run folder
    resume_state: dict[str, Any] | None = None  # the checkpoint a resumed run starts from
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # unreadable checkpoints, renamed once claimed
    data_fingerprint: list[dict[str, Any]] | None = None
    # The tokenizers, the encoded splits and this rank's batch order, once loaded.
    src_tok: Tokenizer = field(init=False)
    tgt_tok: Tokenizer = field(init=False)
    train_data: ParallelData | PreparedData = field(init=False)
    valid_text: tuple[list[str], list[str]] = field(init=False)
    valid: ParallelData = field(init=False)
    sampler: BatchSampler = field(init=False)
    # The model and its training, where it stands, and its logs, once built.
    model: Transformer = field(init=False)
    loss_fn: TranslationLoss = field(init=False)
    trainer: nn.Module = field(init=False)  # `loss_fn`, wrapped by DDP under data parallelism
    optimizer: torch.optim.Optimizer = field(init=False)
    scaler: torch.amp.GradScaler | None = field(init=False)
    position: Position = field(init=False)
    stream: BatchStream = field(init=False)  # this rank's batches, a step ahead
    agreed: Agreed = field(init=False)  # what the ranks agreed on for the next step
    clock: Clock = field(init=False)
    progress: ProgressLog = field(init=False)

    @property
    def tc(self) -> TrainConfig:
        return self.cfg.train

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)

    def check_lock(self) -> None:
        """Stop if the run folder is no longer this run's: nothing more may be written to it."""
        if self.lock is not None and self.lock.lost:  # an attribute the refresh thread sets: no I/O here
            raise TrainingError(f"{self.lock.path} is no longer this run's (deleted, or taken over by another run); "
                                f"stopped at step {self.position.step} without writing more to {self.run_dir}")

    def checkpoint(self, rng: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """What a checkpoint of the run holds now (see `run_folder.checkpoint_state`)."""
        return checkpoint_state(self.cfg, self.model, self.optimizer, self.scaler, self.position, self.src_tok,
                                self.tgt_tok, rng, self.data_fingerprint)

    def save(self) -> None:
        """Write the step's checkpoint, and drop the step checkpoints beyond train.keep_last."""
        self.check_lock()
        rng = rng_states(self.device, self.ranks)  # every rank takes part in gathering the states
        if self.is_main:
            log.info("saved %s (step)", save_step(self.run_dir, self.checkpoint(rng), self.tc.keep_last))


def start_run(cfg: Config, resume: bool, accept_data_change: bool, lock: RunLock | None) -> Run:
    """This process's device and ranks, the run's precision, and the checkpoint a resumed run starts
    from, checked against the settings and the data before any work.

    Global rank 0 reads the checkpoint and checks it; the other ranks receive it, or the error that
    stops the run, from rank 0, so that their machines need no copy of the run folder (and a stale
    copy there is never read).
    """
    tc = cfg.train
    rank, world_size = launch_rank()
    device = run_device(tc)
    ranks = init_ranks(device, rank, world_size)
    use_tf32(device, tc.tf32)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    if tc.keep_last < tc.average_last:
        raise ConfigError(f"train.keep_last ({tc.keep_last}) must be >= train.average_last ({tc.average_last})")
    run, recorded = Run(cfg, device, ranks, rank, lock), None
    if resume:
        resume_path, run.resume_state, run.skipped = ranks.from_main(lambda: load_resume_checkpoint(run.run_dir))
        recorded = checkpoint_config(run.resume_state, resume_path)
    # "auto" becomes what this device runs fastest; the run's config.yaml and checkpoints record the result.
    cfg = replace(cfg, train=replace(tc, precision=run_precision(cfg, device, ranks, recorded)))
    autocast(cfg.train.precision, device)  # validates precision against the device before any work
    if resume:
        cfg = resolve_short_budget(cfg, recorded, None)
        run.data_fingerprint = ranks.from_main(
            lambda: _check_resume(cfg, recorded, run, resume_path, accept_data_change))
    elif run.is_main and run_checkpoints(run.run_dir):
        raise CheckpointError(f"{run.run_dir} already holds checkpoints: pass --resume to continue it, or choose "
                              "another train.output_dir")
    run.cfg = cfg
    return run


def _check_resume(
    cfg: Config, recorded: Config, run: Run, path: Path, accept_data_change: bool
) -> list[dict[str, Any]] | None:
    """Rank 0's checks of a resume: the settings changed and the training data (see
    `run_data.resumed_data_fingerprint`, whose fingerprint it returns)."""
    changes = resume_changes(recorded, cfg, run.resume_state["step"])
    log.info("resuming from %s", path)
    for change in changes:
        log.info("resumed with a changed setting: %s", change)
    return resumed_data_fingerprint(cfg, run.resume_state, path, accept_data_change)


def finished_before(run: Run) -> str | None:
    """Why a resumed run had already stopped where its checkpoint left it, or None if it goes on."""
    if run.resume_state is None:
        return None
    resumed_at = Position(**run.resume_state["position"])
    return None if resumed_at.validation_due else stop_reason(run.tc, resumed_at, len(run.sampler))


def close_finished(run: Run, run_log: RunLog | None, done: str) -> Path:
    """A resumed run that had finished: write the average it lacks, or say that there is nothing to do."""
    step, run_dir = run.resume_state["step"], run.run_dir
    # Rank 0 alone reads and writes the run folder.
    if run.is_main and final_of_step(run_dir / "checkpoints" / "final.pt", step):
        steps = "train.short_budget_max_steps" if run.tc.short_budget == "on" else "train.max_steps"
        log.info("%s finished at step %d (%s); nothing to do. Raise %s (or the limit reached) to train on", run_dir,
                 step, done, steps)
    elif run.is_main:  # stopped between its last checkpoint and final.pt (absent, or left from a smaller budget)
        claim_run_folder(run_dir, run_log, run.skipped)
        plot_curves(run_dir)
        final = write_final(run_dir, run.tc.average_last)
        log.info("%s had finished at step %d (%s) without its average: wrote %s", run_dir, step, done, final)
    run.ranks.close()
    return run_dir


def plot_curves(run_dir: Path) -> None:
    """curves.png from metrics.jsonl, which a run stopped before its first log line has not written."""
    if (run_dir / "metrics.jsonl").exists():
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "curves.png")


def finish(run: Run, reason: str, signal: int | None) -> Path:
    """Plot the curves and write final.pt, the average of the last step checkpoints; after a signal,
    which leaves the run to be resumed, exit with 128 + its number instead of averaging."""
    run.progress.close()
    log.info("stopped after step %d (%s), %.1f minutes of training", run.position.step, reason, run.position.elapsed / 60)
    if run.is_main:
        plot_curves(run.run_dir)
        if signal is None:
            final = write_final(run.run_dir, run.tc.average_last)
            log.info("wrote %s (average of the last %d checkpoints)", final, run.tc.average_last)
    run.ranks.close()
    if signal is not None:
        sys.exit(128 + signal)
    return run.run_dir
