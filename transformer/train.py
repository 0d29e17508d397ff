"""Train a translation model: `transformer-train --config configs/NAME.yaml [key=value ...] [--resume]`.

The loop follows the paper (section 5): token-count batches, Adam with the warm-up/inverse-sqrt
schedule, label smoothing, dropout. Around it sit the practical parts: gradient accumulation,
mixed precision, periodic validation (loss, perplexity, BLEU), atomic checkpoints with everything
needed to resume exactly, a clean save on SIGINT/SIGTERM, and data parallelism under `torchrun`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import logging.handlers
import math
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import sacrebleu
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from .atomic import WriteError, atomic_write_bytes, check_not_an_input, remove_stale_temp_files
from .checkpoint import (
    CheckpointError, checkpoint_config, checkpoint_tokenizers, load_checkpoint, load_resume_checkpoint, resume_changes,
    run_checkpoints, save_averaged, save_checkpoint, tokenizer_state,
)
from .config import Config, ConfigError, TrainConfig, config_to_dict, load_config, save_config
from .data import (
    BatchSampler, DataError, ParallelData, bucket_batches, collate, encode_pairs, load_split, local_split_files,
    make_batches,
)
from .loss import TranslationLoss
from .model import Transformer
from .plot import plot_metrics
from .precision import ProbeShape, choose_precision
from .prepare import Corpus, corpus_change, ensure_prepared
from .prepared import PreparedData
from .run_lock import LOCK_NAME, RunLock, RunLockedError
from .runtime import resolve_device, tune_process_for, use_tf32
from .schedule import cooldown_factor, noam_lr
from .short_budget import resolve_short_budget
from .tokenizer import PAD_ID, Tokenizer, copy_tokenizers, load_or_train_tokenizers, sample_pairs
from .translator import translate

# Steps timed (after two untimed ones) where train.short_budget=auto projects a run's steps.
TIMED_STEPS = 8

log = logging.getLogger("transformer.train")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss keeps diverging); the message says why."""


@dataclass
class Position:
    """Where training stands: the step done, and the next batch to read."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # index of the next batch within this rank's batches of `epoch`
    elapsed: float = 0.0  # seconds spent training, over all resumptions
    best_bleu: float = -1.0
    bad_evals: int = 0  # validations in a row without a better BLEU
    nonfinite: int = 0  # non-finite steps in a row
    validation_due: bool = False  # a signal stopped the run where it validates: the resumed run validates first


class StopRequested:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so the run saves before leaving.

    A context manager: the previous handlers are put back on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequested":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context for train.precision ("fp32" runs without one)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision='fp16' needs a CUDA device; use 'bf16' on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def prepare_data(cfg: Config, run_dir: Path, resume_state: dict | None) -> tuple[Tokenizer, Tokenizer, ParallelData | PreparedData, tuple[list[str], list[str]], ParallelData]:
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
            src_tok, tgt_tok = load_or_train_tokenizers(cfg.tokenizer, *sample_pairs([(train_src, train_tgt)], cfg.tokenizer.sample_size),
                                                        cfg.data.src_lang, cfg.data.tgt_lang)
        train = encode_pairs(train_src, train_tgt, src_tok, tgt_tok, cfg.data.max_len)
    valid_src, valid_tgt = load_split(cfg.data, "valid")
    valid = encode_pairs(valid_src, valid_tgt, src_tok, tgt_tok, cfg.data.max_len, drop=False)
    return src_tok, tgt_tok, train, (valid_src, valid_tgt), valid


def training_data_fingerprint(cfg: Config) -> list[dict[str, Any]] | None:
    """What identifies the training split: each file's path, size, modification time and SHA-256, or
    the hub dataset's fingerprint (see `prepare.Corpus`). None, with a warning, where the corpus
    cannot be read (prepared data copied to a machine without it)."""
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
        current = Corpus(cfg.data).fingerprint(with_content=False)
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
    log.warning("%s since the run started; training on it as it is now (--accept-data-change)", change)
    return Corpus(cfg.data).fingerprint(with_content=True)


@torch.no_grad()
def validate(
    cfg: Config, model: Transformer, loss_fn: TranslationLoss, valid: ParallelData,
    valid_text: tuple[list[str], list[str]], src_tok: Tokenizer, tgt_tok: Tokenizer, device: torch.device,
    ranks: Ranks | None = None,
) -> dict[str, float]:
    """Validation loss and perplexity on the whole split, and greedy BLEU on its first sentences.

    Under data parallelism every rank takes its share of the batches and of the BLEU sentences,
    and every rank returns the same result: no rank waits in a collective while another
    validates alone, and the work is spread.
    """
    ranks = ranks or Ranks()
    model.eval()
    total, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
    for indices in make_batches(valid.src_lens, valid.tgt_lens, cfg.train.max_tokens)[ranks.rank::ranks.world_size]:
        batch = collate(indices, valid).to(device)
        with autocast(cfg.train.precision, device):
            total += loss_fn(batch.src, batch.tgt_in, batch.tgt_out, batch.src_index, batch.tgt_index).double()
        tokens += batch.n_tgt_tokens
    total, tokens = ranks.sum_on_device(torch.stack([total, torch.tensor(float(tokens), dtype=torch.float64, device=device)]))
    result = {"valid_loss": total / tokens, "valid_ppl": math.exp(min(total / tokens, 50.0))}
    n = cfg.train.eval_bleu_sentences
    if n > 0:
        sources, references = valid_text[0][:n], valid_text[1][:n]
        with autocast(cfg.train.precision, device):
            mine = translate(
                model, src_tok, tgt_tok, sources[ranks.rank::ranks.world_size], beam_size=1,
                length_penalty=cfg.decode.length_penalty, max_len_a=cfg.decode.max_len_a,
                max_len_b=cfg.decode.max_len_b, batch_tokens=cfg.decode.batch_tokens, device=device,
            )
        hypotheses = [""] * len(sources)
        for rank, shard in enumerate(ranks.gather_objects(mine)):
            hypotheses[rank::ranks.world_size] = shard
        result["valid_bleu"] = sacrebleu.corpus_bleu(hypotheses, [references]).score
    model.train()
    return result


def rng_states(device: torch.device, ranks: Ranks | None = None) -> list[dict[str, Tensor]]:
    """The random number generator states of every rank, in rank order (a collective under DDP).

    The CUDA generator of the run's GPU is included for a CUDA run only: asking for it otherwise
    would open a CUDA context on a GPU the run does not use.
    """
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return (ranks or Ranks()).gather_objects(rng)


def restore_rng(states: list[dict[str, Tensor]], rank: int, world_size: int, seed: int, device: torch.device) -> None:
    """Put back this rank's generator state; reseed if the run had a different number of ranks."""
    if len(states) != world_size:
        log.warning("checkpoint has RNG states of %d ranks, this run has %d: dropout masks are reseeded, "
                    "so the run will not replay bit for bit", len(states), world_size)
        torch.manual_seed(seed + rank)
        return
    torch.set_rng_state(states[rank]["torch"])
    if "cuda" in states[rank] and device.type == "cuda":
        torch.cuda.set_rng_state(states[rank]["cuda"], device)


def checkpoint_state(
    cfg: Config, model: Transformer, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
    position: Position, src_tok: Tokenizer, tgt_tok: Tokenizer, rng: list[dict[str, Tensor]],
    data_fingerprint: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything a checkpoint holds: weights, config, tokenizers, the full training state, and the
    fingerprint of the training data, which a resumed run compares with the data it finds."""
    return {
        "config": config_to_dict(cfg),
        "model": model.state_dict(),
        "tokenizers": tokenizer_state(src_tok, tgt_tok),
        "step": position.step,
        "optimizer": optimizer.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "position": vars(position).copy(),
        "rng": rng,
        "data_fingerprint": data_fingerprint,
    }


def save_step(run_dir: Path, state: dict[str, Any], keep_last: int) -> Path:
    """Write `checkpoints/step_N.pt` and delete step checkpoints beyond the last `keep_last`."""
    path = run_dir / "checkpoints" / f"step_{state['step']:08d}.pt"
    save_checkpoint(state, path)
    for old in run_checkpoints(run_dir)[:-keep_last]:
        old.unlink()
    return path


class MetricsLog:
    """Appends JSON lines to `metrics.jsonl` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **row: float) -> None:
        if self.enabled:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:  # e.g. a full disk: one line, not a traceback
                raise WriteError(f"{self.path}: cannot write: {e.strerror or e}") from None

    def truncate(self, step: int) -> None:
        """Drop the rows after `step`: a resumed run replays those steps and logs them again.

        A row cut short (the disk filled up, or the machine died, in the middle of an append) is
        dropped too.
        """
        if not self.enabled or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        kept = [line for line in lines if (row := _json_row(line)) is not None and row["step"] <= step]
        if len(kept) < len(lines):
            atomic_write_bytes(self.path, "".join(kept).encode("utf-8"))
            log.info("%s: dropped %d rows after step %d, which this run replays", self.path, len(lines) - len(kept), step)


def _json_row(line: str) -> dict | None:
    """A metrics row, or None for a line that is not one."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


class RunLog:
    """The run's `train.log`: records are held in memory until the run may write its folder.

    A run that is refused (the folder is locked, the resume settings differ) must leave the folder
    as it found it, its log included; once the checks pass, `start` writes the held records and
    every later one to the file.
    """

    def __init__(self) -> None:
        self.held = logging.handlers.MemoryHandler(capacity=1_000_000, flushLevel=logging.CRITICAL + 1)
        self.file: logging.FileHandler | None = None
        logging.getLogger().addHandler(self.held)

    def start(self, path: Path) -> None:
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.held.setTarget(self.file)
        self.held.flush()
        logging.getLogger().addHandler(self.file)
        logging.getLogger().removeHandler(self.held)

    def close(self) -> None:
        for handler in (self.held, self.file):
            if handler is not None:
                logging.getLogger().removeHandler(handler)
                handler.close()


def claim_run_folder(run_dir: Path, run_log: RunLog, skipped: list[tuple[Path, str]]) -> None:
    """The checks have passed: start the log and clear what interrupted runs left in the folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run_log.start(run_dir / "train.log")
    for folder in (run_dir, run_dir / "checkpoints"):  # where a run writes
        remove_stale_temp_files(folder)
    for path, reason in skipped:
        path.rename(path.with_name(path.name + ".unreadable"))
        log.warning("renamed %s to %s.unreadable (%s)", path, path.name, reason)


class Ranks:
    """This process's place among the data-parallel ranks, and the collectives the loop needs.

    A single process (`world_size` 1) makes every collective the identity. Numbers the host holds
    (token counts, stop flags, the time budget, pickled objects) go through `host_group`, a gloo
    group on the CPU, so that reducing them never waits for the GPU; numbers computed on the
    device are reduced there, packed into one tensor per step.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, host_group: Any = None) -> None:
        self.rank, self.world_size, self.host_group = rank, world_size, host_group

    def reduce_host(self, values: Sequence[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> list[float]:
        """All-reduce host numbers with `op` (float64, on the CPU)."""
        if self.world_size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=op, group=self.host_group)
        return tensor.tolist()

    def sum_on_device(self, values: Tensor) -> list[float]:
        """Sum a (K,) device tensor over ranks and read it on the host: one collective, one read."""
        if self.world_size > 1:
            dist.all_reduce(values)
        return values.tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order."""
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.host_group)
        return gathered


def init_ranks(device: torch.device, rank: int, world_size: int) -> Ranks:
    """Join the process group of a `torchrun` launch (NCCL for GPUs, gloo for CPUs) on `device`.

    The rank's GPU becomes the current device before NCCL starts, and NCCL is bound to it
    (`device_id`), so that no rank creates its communicator or a context on another rank's GPU.
    """
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return Ranks()
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    host_group = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else None
    return Ranks(rank, world_size, host_group)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """The loss scaler fp16 needs (None for fp32 and bf16, whose range needs none)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


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


def seconds_per_step(
    cfg: Config, device: torch.device, data: ParallelData | PreparedData, batches: list, src_vocab: int, tgt_vocab: int,
    steps: int = TIMED_STEPS,
) -> float:
    """The median seconds of a training step (batch, forward, backward, Adam) of a throwaway model
    of `cfg` on the first of `batches`, after two untimed steps. The random state is restored, so
    the run that follows is the one it would be without this."""
    tc = cfg.train
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = Transformer.from_config(cfg.model, src_vocab, tgt_vocab, PAD_ID).to(device)
        loss_fn = TranslationLoss(model, tc.label_smoothing)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(tc.adam_beta1, tc.adam_beta2),
                                      eps=tc.adam_eps, fused=True)
        for indices in batches[:steps + 2]:
            start = time.perf_counter()
            batch = collate(indices, data).to(device)
            with autocast(tc.precision, device):
                loss = loss_fn(batch.src, batch.tgt_in, batch.tgt_out, batch.src_index, batch.tgt_index)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # waits for a GPU's queue
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:] or times)


def run_device(tc: TrainConfig) -> torch.device:
    """The device of this process: `train.device` for the rank `torchrun` gave it (LOCAL_RANK, WORLD_SIZE).

    Raises:
        ConfigError: a device this machine does not have, or one GPU named for several ranks.
    """
    try:
        return resolve_device(tc.device, int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:
        raise ConfigError(f"train.device: {e}") from None


def _final_of_step(final: Path, step: int) -> bool:
    """Whether `final` is the average a run that stopped at `step` writes (a run resumed with a larger
    budget and killed before its own final.pt still holds the earlier one)."""
    try:
        return load_checkpoint(final).get("step") == step
    except CheckpointError:  # absent or unreadable: write it
        return False


def stop_reason(tc: TrainConfig, position: Position, batches_per_epoch: int) -> str | None:
    """Why training must stop at `position` ("step limit", ...), or None while the budget lasts."""
    if tc.max_steps and position.step >= tc.max_steps:
        return "step limit"
    if tc.max_epochs and position.epoch + (position.batch >= batches_per_epoch) >= tc.max_epochs:
        return "epoch limit"
    if tc.max_minutes and position.elapsed >= tc.max_minutes * 60:
        return "time limit"
    if tc.patience and position.bad_evals >= tc.patience:
        return f"no better validation BLEU in {tc.patience} validations"
    return None


def budget_used(tc: TrainConfig, position: Position, batches_per_epoch: int) -> float:
    """Fraction of the training budget spent so far: the largest over the step, epoch and minute limits set."""
    fractions = [0.0]
    if tc.max_steps:
        fractions.append(position.step / tc.max_steps)
    if tc.max_epochs:
        fractions.append((position.epoch + position.batch / max(batches_per_epoch, 1)) / tc.max_epochs)
    if tc.max_minutes:
        fractions.append(position.elapsed / (tc.max_minutes * 60))
    return min(1.0, max(fractions))


def train(cfg: Config, resume: bool = False, accept_data_change: bool = False) -> Path:
    """Train as `cfg` says, resuming from the run directory's latest checkpoint if `resume`.

    The process that writes the run directory (global rank 0) holds its lock (see `run_lock`) for
    the whole run. Nothing in the directory is written before the checks pass: the lock is free, a
    new run finds no checkpoints, a resumed one finds a checkpoint that loads and settings it may
    change, and training data that did not change since the run started (or `accept_data_change`,
    which logs the change). A resumed run that has already finished says so and changes nothing.

    Returns:
        The run directory.

    A run that fails before it writes anything removes the folders it created for the run directory.

    Raises:
        RunLockedError: another run owns the directory.
        CheckpointError: nothing to resume, or settings a resumed run may not change.
        DataError: the data cannot be read, or changed since the run started (see `accept_data_change`).
        TrainingError: the run cannot go on (e.g. diverged, or its lock was deleted or taken over).
    """
    run_dir = Path(cfg.train.output_dir)
    if resume and not run_dir.is_dir():  # checked before the lock creates the folder
        raise CheckpointError(f"{cfg.train.output_dir}: --resume given but there is no such run folder")
    is_main = int(os.environ.get("RANK", "0")) == 0
    run_log = RunLog() if is_main else None
    created = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]  # deepest first
    try:
        with RunLock(run_dir) if is_main else contextlib.nullcontext() as lock:
            return _train(cfg, resume, run_log, lock, accept_data_change)
    except BaseException:
        # The lock is released by now: a folder that holds nothing else is one this run made and
        # never used. rmdir removes only an empty folder, so nothing another process wrote is lost.
        for folder in created if is_main else []:
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    finally:
        if run_log is not None:
            run_log.close()


def _train(
    cfg: Config, resume: bool, run_log: RunLog | None, lock: RunLock | None, accept_data_change: bool = False
) -> Path:
    """`train` once the run directory is this process's (`lock`: rank 0's hold on it)."""
    tc = cfg.train
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = run_device(tc)
    ranks = init_ranks(device, rank, world_size)
    use_tf32(device, tc.tf32)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    if tc.keep_last < tc.average_last:
        raise ConfigError(f"train.keep_last ({tc.keep_last}) must be >= train.average_last ({tc.average_last})")
    is_main = rank == 0
    run_dir = Path(tc.output_dir)

    resume_state, skipped, data_fingerprint = None, [], None
    if resume:
        resume_path, resume_state, skipped = load_resume_checkpoint(run_dir)
        recorded = checkpoint_config(resume_state, resume_path)
    # "auto" becomes what this device runs fastest; the run's config.yaml and checkpoints record the result.
    cfg = replace(cfg, train=replace(tc, precision=run_precision(cfg, device, ranks, recorded if resume else None)))
    tc = cfg.train
    autocast(tc.precision, device)  # validates precision against the device before any work
    if resume:
        cfg = resolve_short_budget(cfg, recorded, None)
        tc = cfg.train
        changes = resume_changes(recorded, cfg, resume_state["step"])
        log.info("resuming from %s", resume_path)
        for change in changes:
            log.info("resumed with a changed setting: %s", change)
        data_fingerprint = resumed_data_fingerprint(cfg, resume_state, resume_path, accept_data_change)
    elif is_main and run_checkpoints(run_dir):
        raise CheckpointError(f"{run_dir} already holds checkpoints: pass --resume to continue it, or choose another train.output_dir")

    torch.manual_seed(tc.seed)
    src_tok, tgt_tok, train_data, valid_text, valid = prepare_data(cfg, run_dir, resume_state)
    if is_main and data_fingerprint is None:  # a new run, or one whose checkpoint records none
        data_fingerprint = training_data_fingerprint(cfg)
    batches = bucket_batches(train_data.src_lens, train_data.tgt_lens, tc.max_tokens)
    sampler = BatchSampler(batches, tc.seed, rank, world_size)
    if resume_state is None and tc.short_budget != "off":
        timed = None
        if is_main and tc.short_budget == "auto" and tc.max_minutes:
            timed = seconds_per_step(cfg, device, train_data, sampler.epoch_batches(0), src_tok.vocab_size,
                                     tgt_tok.vocab_size)
        cfg = resolve_short_budget(cfg, None, ranks.gather_objects(timed)[0])
        tc = cfg.train
    resumed_at = Position(**resume_state["position"]) if resume_state is not None else None
    if resumed_at is not None and not resumed_at.validation_due and (done := stop_reason(tc, resumed_at, len(sampler))):
        final = run_dir / "checkpoints" / "final.pt"
        if _final_of_step(final, resume_state["step"]):
            log.info("%s finished at step %d (%s); nothing to do. Raise train.max_steps (or the limit reached) "
                     "to train on", run_dir, resume_state["step"], done)
        elif is_main:  # stopped between its last checkpoint and final.pt (absent, or left from a smaller budget)
            claim_run_folder(run_dir, run_log, skipped)
            plot_metrics(run_dir / "metrics.jsonl", run_dir / "curves.png")
            save_averaged(run_checkpoints(run_dir)[-tc.average_last:], final)
            log.info("%s had finished at step %d (%s) without its average: wrote %s", run_dir, resume_state["step"],
                     done, final)
        if world_size > 1:
            dist.destroy_process_group()
        return run_dir
    if is_main:
        claim_run_folder(run_dir, run_log, skipped)
        save_config(cfg, run_dir / "config.yaml")
        copy_tokenizers({cfg.data.src_lang: src_tok, cfg.data.tgt_lang: tgt_tok}, run_dir)

    model = Transformer.from_config(cfg.model, src_tok.vocab_size, tgt_tok.vocab_size, PAD_ID).to(device)
    loss_fn = TranslationLoss(model, tc.label_smoothing)
    trainer: nn.Module = loss_fn
    if world_size > 1:
        # No buffer broadcast at each forward: the only buffer, the sinusoidal table, is a function
        # of its size, and a broadcast would cost time and fail once one rank had grown its table.
        # (`forward_sync_buffers` replaces the deprecated `broadcast_buffers`, which warns on every rank.)
        trainer = nn.parallel.DistributedDataParallel(
            loss_fn, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
        )
    # fused: one kernel over all parameters, several times faster on the CPU than the default
    # (foreach) step.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=0.0, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps, weight_decay=tc.weight_decay,
        fused=True,
    )
    scaler = grad_scaler(tc.precision, device)
    position = Position()
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        position = Position(**resume_state["position"])
        restore_rng(resume_state["rng"], rank, world_size, tc.seed, device)
    else:
        torch.manual_seed(tc.seed + rank)  # same initial weights everywhere, own dropout masks per rank

    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters; %d training pairs in %d batches per epoch per rank; device %s, %d threads, %s",
             n_params / 1e6, len(train_data), len(sampler), device, torch.get_num_threads(), tc.precision)

    metrics = MetricsLog(run_dir / "metrics.jsonl", is_main)
    metrics.truncate(position.step)
    model.train()
    epoch_batches = sampler.epoch_batches(position.epoch)
    bar = tqdm(total=tc.max_steps or None, initial=position.step, disable=not is_main or None, unit="step",
               dynamic_ncols=True)
    window_tokens, window_loss, window_start = 0, 0.0, time.perf_counter()
    segment_start, elapsed_before = time.perf_counter(), position.elapsed
    reason = "step limit"
    budget = replace(tc, patience=0)  # patience is checked after validation, the other limits after every step

    def check_lock() -> None:
        if lock is not None and lock.lost:  # an attribute the refresh thread sets: no I/O here
            raise TrainingError(f"{lock.path} is no longer this run's (deleted, or taken over by another run); "
                                f"stopped at step {position.step} without writing more to {run_dir}")

    def save(path_kind: str = "step") -> None:
        check_lock()
        rng = rng_states(device, ranks)  # every rank takes part in gathering the states
        if is_main:
            state = checkpoint_state(cfg, model, optimizer, scaler, position, src_tok, tgt_tok, rng, data_fingerprint)
            path = save_step(run_dir, state, tc.keep_last)
            log.info("saved %s (%s)", path, path_kind)

    def validate_and_keep_best() -> None:
        """Validate, log the result, and keep the best model so far in best.pt.

        Every rank validates its share and gets the same result, so all take the same decisions.
        """
        nonlocal segment_start, elapsed_before
        result = validate(cfg, model, loss_fn, valid, valid_text, src_tok, tgt_tok, device, ranks)
        check_lock()  # validation takes a while: the lock may have gone meanwhile
        metrics.write(step=position.step, minutes=position.elapsed / 60, **result)
        if is_main:
            log.info("step %d validation: %s", position.step, ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
        bleu = result.get("valid_bleu", -result["valid_loss"])
        if bleu > position.best_bleu:
            position.best_bleu, position.bad_evals = bleu, 0
            if is_main:
                save_checkpoint(checkpoint_state(cfg, model, optimizer, scaler, position, src_tok, tgt_tok,
                                                 rng_states(device), data_fingerprint),
                                run_dir / "checkpoints" / "best.pt")
        else:
            position.bad_evals += 1
        segment_start, elapsed_before = time.perf_counter(), position.elapsed  # validation time is not training time

    with StopRequested() as stop:
        stopped = False
        if position.validation_due:  # the validation a signal put off, as the run would have done it
            position.validation_due = False
            validate_and_keep_best()
            limit = stop_reason(tc, position, len(epoch_batches))
            stopped, reason = limit is not None or stop.signal is not None, limit or reason
            if stopped:
                save()
        while not stopped:
            # ---- one optimizer step over `accumulate` batches ----
            micro: list = []
            while len(micro) < tc.accumulate:
                if position.batch >= len(epoch_batches):
                    position.epoch += 1
                    position.batch = 0
                    epoch_batches = sampler.epoch_batches(position.epoch)
                micro.append(collate(epoch_batches[position.batch], train_data).to(device))
                position.batch += 1
            # Host numbers only: token counts come from the host's batches, never from the device.
            step_tokens, all_tokens = ranks.reduce_host(
                [sum(b.n_tgt_tokens for b in micro), sum(b.n_src_tokens + b.n_tgt_tokens for b in micro)])
            lr = noam_lr(position.step + 1, cfg.model.d_model, tc.warmup_steps, tc.lr_scale, tc.lr_decay)
            if tc.cooldown:
                # Ranks may disagree on elapsed time; they must agree on the learning rate.
                used = ranks.reduce_host([budget_used(tc, position, len(epoch_batches))], dist.ReduceOp.MAX)[0]
                lr *= cooldown_factor(used, tc.cooldown)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # stays on the device
            for i, batch in enumerate(micro):
                sync = contextlib.nullcontext() if world_size == 1 or i == len(micro) - 1 else trainer.no_sync()
                with sync:
                    with autocast(tc.precision, device):
                        loss = trainer(batch.src, batch.tgt_in, batch.tgt_out, batch.src_index, batch.tgt_index)
                    # DDP averages gradients over ranks; scaling by world_size makes the result the
                    # gradient of the global loss sum divided by the global token count.
                    scaled = loss * (world_size / step_tokens)
                    (scaled if scaler is None else scaler.scale(scaled)).backward()
                loss_sum += loss.detach().double()
            finite, step_loss = optimizer_step(model, optimizer, scaler, tc.clip_norm, loss_sum, ranks)
            if finite:
                position.nonfinite = 0
            else:
                position.nonfinite += 1
                log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", position.step + 1, position.nonfinite)
                if position.nonfinite >= tc.max_nonfinite:
                    raise TrainingError(f"{position.nonfinite} non-finite steps in a row at step {position.step + 1}: "
                                        "lower train.lr_scale, enable train.clip_norm or use train.precision=fp32")
            optimizer.zero_grad(set_to_none=True)
            position.step += 1
            position.elapsed = elapsed_before + time.perf_counter() - segment_start
            bar.update(1)

            # ---- logging ----
            window_tokens += all_tokens
            window_loss += step_loss / step_tokens if finite else 0.0
            if position.step % tc.log_every == 0:
                seconds = time.perf_counter() - window_start
                row = {"step": position.step, "epoch": position.epoch, "loss": window_loss / tc.log_every, "lr": lr,
                       "tokens_per_s": window_tokens / seconds, "minutes": position.elapsed / 60}
                metrics.write(**row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                if bar.disable and is_main:
                    log.info("step %d epoch %d loss %.4f lr %.3e %.0f tokens/s %.1f min", position.step, position.epoch,
                             row["loss"], lr, row["tokens_per_s"], row["minutes"])
                window_tokens, window_loss, window_start = 0, 0.0, time.perf_counter()

            # ---- validation, checkpoints, stopping ----
            check_lock()
            limit = stop_reason(budget, position, len(epoch_batches))
            should_stop, reason = limit is not None, limit or reason
            # A signal on any rank stops them all.
            should_stop, signalled = (bool(flag) for flag in ranks.reduce_host(
                [float(should_stop), float(stop.signal is not None)], dist.ReduceOp.MAX))
            validation_due = position.step % tc.eval_every == 0 or should_stop

            if signalled:
                # A scheduler's grace period before its SIGKILL may be short: the checkpoint is
                # written at once, and the validation due here is left to the resumed run.
                should_stop, position.validation_due = True, validation_due
                reason = f"signal {signal.Signals(stop.signal).name}" if stop.signal is not None else "signal to another rank"
            elif validation_due:
                validate_and_keep_best()
                if tc.patience and position.bad_evals >= tc.patience:
                    should_stop, reason = True, f"no better validation BLEU in {tc.patience} validations"
            if position.step % tc.save_every == 0 or should_stop:
                save()
            if should_stop:
                break

    bar.close()
    log.info("stopped after step %d (%s), %.1f minutes of training", position.step, reason, position.elapsed / 60)
    if is_main:
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "curves.png")
        if stop.signal is None:
            save_averaged(run_checkpoints(run_dir)[-tc.average_last:], run_dir / "checkpoints" / "final.pt")
            log.info("wrote %s (average of the last %d checkpoints)", run_dir / "checkpoints" / "final.pt", tc.average_last)
    if world_size > 1:
        dist.destroy_process_group()
    if stop.signal is not None:
        sys.exit(128 + stop.signal)
    return run_dir


# What a run writes in train.output_dir, besides its step checkpoints and its tokenizer model(s).
RUN_FILES = ("config.yaml", "train.log", "metrics.jsonl", "curves.png", LOCK_NAME, "checkpoints/best.pt",
             "checkpoints/final.pt")


def check_run_paths(cfg: Config, config_path: str | Path | None = None, resume: bool = False) -> None:
    """Refuse a run whose outputs would destroy its inputs (the config file, the training and
    validation files), through any name: a file the run writes that is one of them, or a
    data.prepared_dir, which is replaced as a whole when it is prepared again, that holds one of them
    or the run folder.

    A resumed run may be given the config.yaml it wrote: rewriting it records the same run.

    Raises:
        WriteError: one line naming the setting, the path and the input.
    """
    d, run_dir = cfg.data, Path(cfg.train.output_dir)
    inputs: list[tuple[str, str | Path]] = [("a data file", path) for path in local_split_files(d, ["train", "valid"])]
    if config_path is not None:
        inputs.append(("the --config file", config_path))
    check_not_an_input("train.output_dir", run_dir, inputs)
    for name in (*RUN_FILES, "spm.model", f"spm.{d.src_lang}.model", f"spm.{d.tgt_lang}.model"):
        read = [(what, path) for what, path in inputs if not (resume and name == "config.yaml" and path == config_path)]
        check_not_an_input("train.output_dir", run_dir / name, read)
    if d.prepared_dir is not None:
        prepared = Path(d.prepared_dir)
        check_not_an_input("data.prepared_dir", prepared, inputs, replaces_folder=True)
        if run_dir.resolve().is_relative_to(prepared.resolve()):
            raise WriteError(f"data.prepared_dir {prepared} holds the run folder {run_dir} (train.output_dir); it is "
                             "replaced as a whole when prepared again, which would delete the run: choose another "
                             "data.prepared_dir")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="transformer-train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue the run in train.output_dir from its latest checkpoint")
    parser.add_argument("--accept-data-change", action="store_true",
                        help="with --resume: train on the training data as it is now although it changed since the "
                             "run started (the change is logged); without it, such a resume is refused before any work")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.max_steps=200")
    args = parser.parse_args(argv)
    if args.accept_data_change and not args.resume:
        parser.error("--accept-data-change goes with --resume")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
        check_run_paths(cfg, args.config, args.resume)
        # Before the first bf16 matmul, which is when oneDNN reads its cache settings.
        tune_process_for(run_device(cfg.train))
        train(cfg, resume=args.resume, accept_data_change=args.accept_data_change)
    # OSError: a WriteError, or a run folder that cannot be created (a file in its way, no permission).
    except (ConfigError, DataError, CheckpointError, TrainingError, RunLockedError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
