"""A training run's folder (train.output_dir): holding it, and the files and logs the run keeps there.

    RUN/config.yaml             the resolved config the run trains with
    RUN/train.log               the log (held in memory until the run may write its folder)
    RUN/metrics.jsonl           one JSON row per logged step and per validation
    RUN/curves.png              the curves of metrics.jsonl
    RUN/run.lock                the owner's lock (see `run_lock`)
    RUN/spm*.model              the tokenizer model(s)
    RUN/checkpoints/step_N.pt   the last train.keep_last step checkpoints
    RUN/checkpoints/best.pt     the best validation so far
    RUN/checkpoints/final.pt    the average of the last train.average_last step checkpoints

Only global rank 0 writes here. A run writes nothing before its checks pass (`claim_run_folder`),
and one that fails before that removes the folders it created (`held_run_folder`). Checkpoints
record a fingerprint of the training data (see `training_data`).

This module imports nothing from the training loop (`transformer.train`), which builds on it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm import tqdm

from transformer.atomic import WriteError, atomic_write_bytes, check_not_an_input, remove_stale_temp_files
from transformer.checkpoint import (
    CheckpointError,
    load_checkpoint,
    run_checkpoints,
    save_averaged,
    save_checkpoint,
    tokenizer_state,
)
from transformer.config import Config, config_to_dict
from transformer.data.batches import local_split_files
from transformer.data.tokenizer import Tokenizer
from transformer.training.budget import Position
from transformer.training.run_lock import LOCK_NAME, RunLock

log = logging.getLogger(__name__)

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


@contextlib.contextmanager
def held_run_folder(run_dir: Path, is_main: bool) -> Iterator[tuple[RunLock | None, RunLog | None]]:
    """Hold `run_dir` for a run: on rank 0, its lock (see `run_lock`) and its held log; (None, None)
    on the other ranks.

    A run that fails before it writes anything leaves no trace: the folders it created for
    `run_dir` are removed once the lock is released, while they are empty.
    """
    run_log = RunLog() if is_main else None
    created = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]  # deepest first
    try:
        with RunLock(run_dir) if is_main else contextlib.nullcontext() as lock:
            yield lock, run_log
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


def claim_run_folder(run_dir: Path, run_log: RunLog, skipped: list[tuple[Path, str]]) -> None:
    """The checks have passed: start the log and clear what interrupted runs left in the folder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    run_log.start(run_dir / "train.log")
    for folder in (run_dir, run_dir / "checkpoints"):  # where a run writes
        remove_stale_temp_files(folder)
    for path, reason in skipped:
        path.rename(path.with_name(path.name + ".unreadable"))
        log.warning("renamed %s to %s.unreadable (%s)", path, path.name, reason)


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


class ProgressLog:
    """How training goes: a progress bar (rank 0, on a terminal), and every `log_every` steps a row
    of metrics.jsonl with the mean loss and the throughput since the last one (and a log line
    where there is no bar)."""

    def __init__(self, metrics: MetricsLog, log_every: int, max_steps: int, step: int, is_main: bool) -> None:
        self.metrics, self.log_every, self.is_main = metrics, log_every, is_main
        self.bar = tqdm(total=max_steps or None, initial=step, disable=not is_main or None, unit="step",
                        dynamic_ncols=True)
        self.tokens, self.loss, self.start = 0, 0.0, time.perf_counter()

    def step(self, position: Position, lr: float, tokens: float, loss: float) -> None:
        """Count the step just done: its source and target tokens over all ranks, and its loss per
        target token (0 for a skipped step)."""
        self.bar.update(1)
        self.tokens += tokens
        self.loss += loss
        if position.step % self.log_every != 0:
            return
        seconds = time.perf_counter() - self.start
        row = {"step": position.step, "epoch": position.epoch, "loss": self.loss / self.log_every, "lr": lr,
               "tokens_per_s": self.tokens / seconds, "minutes": position.elapsed / 60}
        self.metrics.write(**row)
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        if self.bar.disable and self.is_main:
            log.info("step %d epoch %d loss %.4f lr %.3e %.0f tokens/s %.1f min", position.step, position.epoch,
                     row["loss"], lr, row["tokens_per_s"], row["minutes"])
        self.tokens, self.loss, self.start = 0, 0.0, time.perf_counter()

    def close(self) -> None:
        self.bar.close()


def checkpoint_state(
    cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
    position: Position, src_tok: Tokenizer, tgt_tok: Tokenizer, rng: list[dict[str, torch.Tensor]],
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


def final_of_step(final: Path, step: int) -> bool:
    """Whether `final` is the average a run that stopped at `step` writes (a run resumed with a larger
    budget and killed before its own final.pt still holds the earlier one)."""
    try:
        return load_checkpoint(final).get("step") == step
    except CheckpointError:  # absent or unreadable: write it
        return False


def write_final(run_dir: Path, average_last: int) -> Path:
    """Write `checkpoints/final.pt`, the average of the last `average_last` step checkpoints."""
    final = run_dir / "checkpoints" / "final.pt"
    save_averaged(run_checkpoints(run_dir)[-average_last:], final)
    return final
