"""Train a translation model: `transformer-train --config configs/NAME.yaml [key=value ...] [--resume]`.

The loop follows the paper (section 5): token-count batches, Adam with the warm-up/inverse-sqrt
schedule, label smoothing, dropout. Around it sit the practical parts: gradient accumulation,
mixed precision, periodic validation (loss, perplexity, BLEU), atomic checkpoints with everything
needed to resume exactly, a clean save on SIGINT/SIGTERM, and data parallelism under `torchrun`.

Read from the bottom: `train` holds the run folder; `_train` starts the run, loads its data and
builds its model (`load_data`, `build_run`); `train_loop` repeats `train_step` and `after_step`
until the run stops. In `transformer.training`: the ranks in `distributed`, the position and the
limits in `budget`, the step's precision and update in `step`, the data in `run_data`, the run's
state, start and end in `run_state`, its folder and logs in `run_folder`.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import sacrebleu
import torch
import torch.distributed as dist

from transformer.checkpoint import CheckpointError, save_checkpoint
from transformer.config import Config, ConfigError, load_config, save_config
from transformer.data.batches import BatchSampler, DataError, ParallelData, bucket_batches, collate, make_batches
from transformer.data.tokenizer import PAD_ID, Tokenizer, copy_tokenizers
from transformer.decoding.translator import translate
from transformer.model import Transformer
from transformer.runtime import tune_process_for
from transformer.training.budget import Clock, Position, StopRequested, stop_reason
from transformer.training.distributed import Ranks, data_parallel, launch_rank, restore_rng, rng_states, run_device
from transformer.training.loss import TranslationLoss
from transformer.training.run_data import prepare_data, training_data_fingerprint
from transformer.training.run_folder import (
    MetricsLog,
    ProgressLog,
    RunLog,
    check_run_paths,
    claim_run_folder,
    held_run_folder,
)
from transformer.training.run_lock import RunLock, RunLockedError
from transformer.training.run_state import Run, TrainingError, close_finished, finish, finished_before, start_run
from transformer.training.short_budget import resolve_short_budget
from transformer.training.step import (
    BatchStream,
    agree,
    autocast,
    backward,
    grad_scaler,
    learning_rate,
    optimizer_step,
    seconds_per_step,
)

log = logging.getLogger("transformer.train")


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


def validate_and_keep_best(run: Run) -> None:
    """Validate, log the result, and keep the best model so far in best.pt.

    Every rank validates its share and gets the same result, so all take the same decisions.
    """
    position = run.position
    result = validate(run.cfg, run.model, run.loss_fn, run.valid, run.valid_text, run.src_tok, run.tgt_tok,
                      run.device, run.ranks)
    run.check_lock()  # validation takes a while: the lock may have gone meanwhile
    run.progress.metrics.write(step=position.step, minutes=position.elapsed / 60, **result)
    if run.is_main:
        log.info("step %d validation: %s", position.step, ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
    bleu = result.get("valid_bleu", -result["valid_loss"])
    if bleu > position.best_bleu:
        position.best_bleu, position.bad_evals = bleu, 0
        if run.is_main:
            save_checkpoint(run.checkpoint(rng_states(run.device)), run.run_dir / "checkpoints" / "best.pt")
    else:
        position.bad_evals += 1
    run.clock.restart(position.elapsed)


def load_data(run: Run) -> None:
    """Seed, then load the tokenizers, the encoded splits and this rank's batch order. A new run whose
    time cap would cut its step budget takes the shorter recipe here (see `short_budget`)."""
    cfg = run.cfg
    torch.manual_seed(cfg.train.seed)
    run.src_tok, run.tgt_tok, run.train_data, run.valid_text, run.valid = prepare_data(cfg, run.run_dir,
                                                                                        run.resume_state, run.ranks)
    if run.is_main and run.data_fingerprint is None:  # a new run, or one whose checkpoint records none
        run.data_fingerprint = training_data_fingerprint(cfg, run.train_data)
    batches = bucket_batches(run.train_data.src_lens, run.train_data.tgt_lens, cfg.train.max_tokens)
    run.sampler = BatchSampler(batches, cfg.train.seed, run.rank, run.ranks.world_size)
    if run.resume_state is None and cfg.train.short_budget != "off":
        timed = None
        if run.is_main and cfg.train.short_budget == "auto" and cfg.train.max_minutes:
            timed = seconds_per_step(cfg, run.device, run.train_data, run.sampler.epoch_batches(0),
                                     run.src_tok.vocab_size, run.tgt_tok.vocab_size)
        run.cfg = resolve_short_budget(cfg, None, run.ranks.gather_objects(timed)[0])


def build_run(run: Run, run_log: RunLog | None) -> None:
    """Claim the run folder; build the model and its optimizer, new or as the resumed checkpoint left
    them, with the random state to match; and start the clock and the logs."""
    cfg, tc, device = run.cfg, run.tc, run.device
    if run.is_main:
        claim_run_folder(run.run_dir, run_log, run.skipped)
        save_config(cfg, run.run_dir / "config.yaml")
        copy_tokenizers({cfg.data.src_lang: run.src_tok, cfg.data.tgt_lang: run.tgt_tok}, run.run_dir)
    run.model = Transformer.from_config(cfg.model, run.src_tok.vocab_size, run.tgt_tok.vocab_size, PAD_ID).to(device)
    run.loss_fn = run.trainer = TranslationLoss(run.model, tc.label_smoothing)
    if run.ranks.world_size > 1:
        run.trainer = data_parallel(run.loss_fn, device)
    # fused: one kernel over all parameters, several times faster on the CPU than the default (foreach) step.
    run.optimizer = torch.optim.AdamW(run.model.parameters(), lr=0.0, betas=(tc.adam_beta1, tc.adam_beta2),
                                      eps=tc.adam_eps, weight_decay=tc.weight_decay, fused=True)
    run.scaler = grad_scaler(tc.precision, device)
    run.position = Position()
    if (state := run.resume_state) is not None:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        run.position = Position(**state["position"])
        restore_rng(state["rng"], run.rank, run.ranks.world_size, tc.seed, device)
    else:
        torch.manual_seed(tc.seed + run.rank)  # same initial weights everywhere, own dropout masks per rank
    log.info("model: %.2fM parameters; %d training pairs in %d batches per epoch per rank; device %s, %d threads, %s",
             sum(p.numel() for p in run.model.parameters()) / 1e6, len(run.train_data), len(run.sampler), device,
             torch.get_num_threads(), tc.precision)
    metrics = MetricsLog(run.run_dir / "metrics.jsonl", run.is_main)
    metrics.truncate(run.position.step)
    run.model.train()
    run.stream = BatchStream(run.sampler, run.train_data, device, tc.accumulate, run.position.epoch, run.position.batch)
    run.progress = ProgressLog(metrics, tc.log_every, tc.max_steps, run.position.step, run.is_main)
    run.clock = Clock(run.position.elapsed)


def train_step(run: Run) -> tuple[float, float, float]:
    """One optimizer step (section 5): the step's batches, the scheduled rate, forward and backward,
    then Adam's update of the clipped gradient, skipped where it is not finite. The next step's
    batches are built and sent to the device before the update waits for it.

    Returns:
        The learning rate, the step's source and target tokens over all ranks, and its loss per
        target token (0 for a skipped step).
    """
    tc, position, agreed = run.tc, run.position, run.agreed
    step = run.stream.take()
    position.epoch, position.batch = step.epoch, step.batch
    lr = learning_rate(run.cfg, position.step, agreed.used)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    # Token counts are host numbers, agreed on by the ranks after the step before (`agree`).
    loss_sum = backward(run.trainer, step.batches, agreed.tgt_tokens, run.scaler, tc.precision, run.device,
                        run.ranks.world_size)
    run.stream.prefetch()
    finite, loss = optimizer_step(run.model, run.optimizer, run.scaler, tc.clip_norm, loss_sum, run.ranks)
    if finite:
        position.nonfinite = 0
    else:
        position.nonfinite += 1
        log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", position.step + 1, position.nonfinite)
        if position.nonfinite >= tc.max_nonfinite:
            raise TrainingError(f"{position.nonfinite} non-finite steps in a row at step {position.step + 1}: "
                                "lower train.lr_scale, enable train.clip_norm or use train.precision=fp32")
    run.optimizer.zero_grad(set_to_none=True)
    position.step += 1
    position.elapsed = run.clock.elapsed()
    return lr, agreed.all_tokens, loss / agreed.tgt_tokens if finite else 0.0


def after_step(run: Run, stop: StopRequested) -> str | None:
    """Validate and save on their cadences, and decide with the other ranks whether to stop: why,
    or None to go on."""
    tc, position = run.tc, run.position
    run.check_lock()
    # Patience is checked after validation, the other limits after every step.
    limit = stop_reason(replace(tc, patience=0), position, len(run.sampler))
    # The step's one collective of host numbers: whether to stop (a signal on any rank stops them
    # all), and the next step's token counts and budget.
    run.agreed = agree(run.ranks, tc, position, run.stream.prefetch(), len(run.sampler), limit is not None,
                       stop.signal is not None)
    should_stop, signalled = run.agreed.stop, run.agreed.signalled
    reason = limit or "step limit"
    validation_due = position.step % tc.eval_every == 0 or should_stop
    if signalled:
        # A scheduler's grace period before its SIGKILL may be short: the checkpoint is
        # written at once, and the validation due here is left to the resumed run.
        stop.elsewhere = stop.signal is None
        should_stop, position.validation_due, reason = True, validation_due, stop.reason
    elif validation_due:
        validate_and_keep_best(run)
        if tc.patience and position.bad_evals >= tc.patience:
            should_stop, reason = True, f"no better validation BLEU in {tc.patience} validations"
    if position.step % tc.save_every == 0 or should_stop:
        run.save()
    return reason if should_stop else None


def validate_put_off(run: Run, stop: StopRequested) -> str | None:
    """The validation a signal put off, as the run would have done it: why the run stops after it, or None."""
    run.position.validation_due = False
    validate_and_keep_best(run)
    limit = stop_reason(run.tc, run.position, len(run.sampler))
    # Decided with the other ranks, since saving is collective.
    should_stop, signalled = (bool(flag) for flag in run.ranks.reduce_host(
        [float(limit is not None), float(stop.signal is not None)], dist.ReduceOp.MAX))
    if not (should_stop or signalled):
        return None
    stop.elsewhere = signalled and stop.signal is None
    run.save()
    return stop.reason if signalled else limit or "step limit"


def train_loop(run: Run, stop: StopRequested) -> str:
    """Train until a limit, patience or a signal stops the run, and return why.

    Each step is the paper's (section 5): batches of sentence pairs of similar length, about
    train.max_tokens tokens per side each; dropout and label smoothing in the loss; Adam at the
    warm-up / inverse-square-root rate. After it the run logs, validates and saves on their
    cadences, and all ranks agree whether to stop.
    """
    if run.position.validation_due and (reason := validate_put_off(run, stop)):
        return reason
    run.agreed = agree(run.ranks, run.tc, run.position, run.stream.prefetch(), len(run.sampler))
    while True:
        lr, tokens, loss = train_step(run)
        run.progress.step(run.position, lr, tokens, loss)
        if reason := after_step(run, stop):
            return reason


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
    run_dir, is_main = Path(cfg.train.output_dir), launch_rank()[0] == 0
    # Checked before the lock creates the folder; on rank 0 alone, which reads and writes it.
    if resume and is_main and not run_dir.is_dir():
        raise CheckpointError(f"{cfg.train.output_dir}: --resume given but there is no such run folder")
    with held_run_folder(run_dir, is_main) as (lock, run_log):
        return _train(cfg, resume, run_log, lock, accept_data_change)


def _train(
    cfg: Config, resume: bool, run_log: RunLog | None, lock: RunLock | None, accept_data_change: bool = False
) -> Path:
    """`train` once the run directory is this process's (`lock`: rank 0's hold on it)."""
    run = start_run(cfg, resume, accept_data_change, lock)
    load_data(run)
    if (done := finished_before(run)) is not None:
        return close_finished(run, run_log, done)
    build_run(run, run_log)
    with StopRequested() as stop:
        reason = train_loop(run, stop)
    return finish(run, reason, stop.exit_signal)


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
