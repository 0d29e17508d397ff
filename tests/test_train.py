"""The training pipeline at tiny scale: a full run and the tools on its checkpoints, exact resumption
after SIGKILL, clean saves on SIGTERM/SIGINT, non-finite losses, data parallelism, one-line errors,
the learning-rate schedule and the loss.

Every run trains a 1+1-layer, d_model=32 model on a synthetic word-for-word "German -> English"
corpus written into a temporary folder, on one CPU thread. Only the SIGKILL run and `torchrun` are
subprocesses (each pays seconds of torch start-up); the command-line tools run in-process through
their `main`, and SIGTERM/SIGINT are sent by the test process to itself at a chosen step.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    CONFIG,
    MAX_STEPS,
    ROOT,
    SPLITS,
    TIMEOUT,
    assert_same_tensors,
    free_port,
    one_line_error,
    overrides,
    process_state_kept,
    run_module,
    step_of,
)

from transformer import precision
from transformer import train as train_module
from transformer.checkpoint import load_checkpoint, run_checkpoints
from transformer.commands import evaluate, translate
from transformer.config import ConfigError, TrainConfig, load_config
from transformer.data.batches import BatchSampler, make_batches
from transformer.data.tokenizer import PAD_ID
from transformer.model import Transformer
from transformer.train import TrainingError, main, train
from transformer.training.budget import Position, budget_used
from transformer.training.loss import TranslationLoss
from transformer.training.schedule import cooldown_factor, noam_lr

pytestmark = pytest.mark.usefixtures("restore_process_state")


def test_a_run_writes_its_outputs_and_the_tools_use_them(reference, corpus, capsys, monkeypatch):
    assert (reference / "config.yaml").is_file() and (reference / "spm.model").is_file()
    assert (reference / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(reference / "config.yaml").train.max_steps == MAX_STEPS
    checkpoints = reference / "checkpoints"
    assert [step_of(p) for p in run_checkpoints(reference)] == [10, 15, 20, 25, 30]  # keep_last=5, save_every=5
    assert (checkpoints / "best.pt").is_file() and (checkpoints / "final.pt").is_file()
    final = load_checkpoint(checkpoints / "final.pt")
    assert final["averaged_from"] == [str(checkpoints / f"step_{s:08d}.pt") for s in (25, 30)]

    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    training = [r for r in rows if "loss" in r]
    validation = [r for r in rows if "valid_loss" in r]
    assert [r["step"] for r in training] == list(range(5, MAX_STEPS + 1, 5))
    assert [r["step"] for r in validation] == [10, 20, 30]
    for r in training:
        assert math.isfinite(r["loss"]) and r["lr"] > 0 and r["tokens_per_s"] > 0
    for r in validation:
        assert math.isfinite(r["valid_loss"]) and r["valid_ppl"] == pytest.approx(math.exp(r["valid_loss"]))
        assert 0 <= r["valid_bleu"] <= 100
    assert training[-1]["loss"] < training[0]["loss"]  # it learns something
    assert training[1]["lr"] == pytest.approx(noam_lr(10, 32, 10))
    # The last 20% of the 30 steps cool down linearly: step 30 runs at (1 - 29/30) / 0.2 of the schedule.
    assert training[3]["lr"] == pytest.approx(noam_lr(20, 32, 10))
    assert training[-1]["lr"] == pytest.approx(noam_lr(30, 32, 10) * (1 - 29 / 30) / 0.2)

    capsys.readouterr()
    evaluate.main(["--checkpoint", str(checkpoints / "final.pt"), "--json", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["bleu"] <= 100 and 0 <= result["chrf"] <= 100
    assert result["n_sentences"] == SPLITS["test"]
    assert len((checkpoints / "hyp.test.txt").read_text().splitlines()) == SPLITS["test"]

    lines = (corpus / "test.de").read_text().splitlines()[:5] + ["", "hund"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(("\n".join(lines) + "\n").encode())))
    translate.main(["--checkpoint", str(checkpoints / "best.pt"), "--device", "cpu"])
    outputs = capsys.readouterr().out.split("\n")
    assert len(outputs) == len(lines) + 1 and outputs[-1] == ""
    assert outputs[5] == ""  # an empty line translates to an empty line


def test_sigkill_and_resume_end_bit_identical_to_an_uninterrupted_run(reference, corpus, tmp_path):
    ov = overrides(corpus, tmp_path)
    with open(tmp_path.parent / f"{tmp_path.name}.stderr", "w+") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "transformer.train", "--config", str(CONFIG), *ov],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + TIMEOUT
        while not run_checkpoints(tmp_path) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.kill()
        process.wait(timeout=TIMEOUT)
        stderr.seek(0)
        assert process.returncode == -signal.SIGKILL, stderr.read()  # not ended before the kill
    assert not (tmp_path / "checkpoints" / "final.pt").exists()
    killed_at = step_of(run_checkpoints(tmp_path)[-1])
    assert killed_at < MAX_STEPS, "the run finished before it was killed: make it longer"

    main(["--config", str(CONFIG), "--resume", *ov])
    name = f"step_{MAX_STEPS:08d}.pt"
    assert run_checkpoints(tmp_path)[-1].name == name
    assert (tmp_path / "checkpoints" / "final.pt").is_file()
    resumed = load_checkpoint(tmp_path / "checkpoints" / name)
    uninterrupted = load_checkpoint(reference / "checkpoints" / name)
    for key in ("model", "optimizer", "rng", "tokenizers", "step"):
        assert_same_tensors(resumed[key], uninterrupted[key], key)
    assert {k: v for k, v in resumed["position"].items() if k != "elapsed"} == \
        {k: v for k, v in uninterrupted["position"].items() if k != "elapsed"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_the_step_reached_and_resume_finishes(signum, reference, corpus, tmp_path, monkeypatch):
    # The signal reaches this very process in the middle of step 3's forward pass.
    forward, steps = TranslationLoss.forward, []

    def signal_at_step_3(self, *batch):
        if self.training:
            steps.append(1)
            if len(steps) == 3:
                os.kill(os.getpid(), signum)
        return forward(self, *batch)

    monkeypatch.setattr(TranslationLoss, "forward", signal_at_step_3)
    ov = overrides(corpus, tmp_path, train_save_every=1000)  # no periodic checkpoints
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), *ov])
    assert exit.value.code not in (0, None)
    saved = run_checkpoints(tmp_path)
    assert [step_of(p) for p in saved] == [3]  # the step it was in, completed, then saved
    state = load_checkpoint(saved[0])
    assert state["step"] == state["position"]["step"] == 3
    assert not (tmp_path / "checkpoints" / "final.pt").exists()

    monkeypatch.setattr(TranslationLoss, "forward", forward)
    main(["--config", str(CONFIG), "--resume", *ov])
    assert [step_of(p) for p in run_checkpoints(tmp_path)] == [3, MAX_STEPS]
    assert (tmp_path / "checkpoints" / "final.pt").is_file()
    # Checkpoint cadence and validation are not part of the arithmetic: the weights match the reference.
    resumed = load_checkpoint(run_checkpoints(tmp_path)[-1])
    assert_same_tensors(resumed["model"], load_checkpoint(run_checkpoints(reference)[-1])["model"], "model")


def test_a_stop_signal_at_a_validation_step_saves_at_once_and_the_resumed_run_validates_first(
        reference, corpus, tmp_path, monkeypatch):
    # SIGTERM at step 10, where the run validates (train.eval_every=10): a scheduler's grace period
    # may end before a validation would, so the checkpoint comes first and nothing is validated.
    forward, steps, validated = TranslationLoss.forward, [], []

    def signal_at_step_10(self, *batch):
        if self.training:
            steps.append(1)
            if len(steps) == 10:
                os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *batch)

    validate = train_module.validate
    monkeypatch.setattr(train_module, "validate", lambda *args, **kwargs: validated.append(1) or validate(*args, **kwargs))
    monkeypatch.setattr(TranslationLoss, "forward", signal_at_step_10)
    ov = overrides(corpus, tmp_path, train_save_every=1000)
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), *ov])
    assert exit.value.code == 128 + signal.SIGTERM and not validated
    assert [step_of(p) for p in run_checkpoints(tmp_path)] == [10]
    assert load_checkpoint(run_checkpoints(tmp_path)[0])["position"]["validation_due"] is True
    assert not (tmp_path / "checkpoints" / "best.pt").exists()

    # The resumed run validates step 10 before it trains on: its metrics, best.pt and weights are
    # those of the run that was never stopped.
    monkeypatch.setattr(TranslationLoss, "forward", forward)
    main(["--config", str(CONFIG), "--resume", *ov])

    def rows(run: Path) -> list[dict]:
        timing = ("tokens_per_s", "minutes")
        return [{k: v for k, v in json.loads(line).items() if k not in timing}
                for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows(tmp_path) == rows(reference)
    best, reference_best = (load_checkpoint(run / "checkpoints" / "best.pt") for run in (tmp_path, reference))
    assert best["step"] == reference_best["step"]
    assert_same_tensors(best["model"], reference_best["model"], "best")
    final = load_checkpoint(run_checkpoints(tmp_path)[-1])
    assert_same_tensors(final["model"], load_checkpoint(run_checkpoints(reference)[-1])["model"], "model")
    assert final["position"]["validation_due"] is False


def test_non_finite_losses_skip_the_update_and_too_many_stop_the_run(corpus, tmp_path, monkeypatch, caplog):
    forward = TranslationLoss.forward
    calls, snapshot = [], {}

    def nan_after_two_steps(self, *batch):
        loss = forward(self, *batch)
        if not self.training:
            return loss
        calls.append(self)
        if len(calls) == 3:  # weights after the last good step
            snapshot.update({k: v.clone() for k, v in self.model.state_dict().items()})
        return loss * float("nan") if len(calls) > 2 else loss

    monkeypatch.setattr(TranslationLoss, "forward", nan_after_two_steps)
    cfg = load_config(CONFIG, overrides(corpus, tmp_path, train_max_nonfinite=3, train_eval_every=1000,
                                        train_save_every=1000))
    with pytest.raises(TrainingError, match="non-finite") as error:
        train(cfg)
    assert "3 non-finite steps in a row" in str(error.value) and len(calls) == 5
    assert len([r for r in caplog.records if "update skipped" in r.getMessage()]) == 3
    assert_same_tensors(calls[-1].model.state_dict(), snapshot, "model")


def test_isolated_non_finite_losses_are_skipped_and_the_run_goes_on(corpus, tmp_path, monkeypatch, caplog):
    forward = TranslationLoss.forward
    calls = []

    def nan_every_other_step(self, *batch):
        loss = forward(self, *batch)
        if self.training:
            calls.append(1)
            if len(calls) % 2 == 1:  # steps 1, 3, 5
                return loss * float("nan")
        return loss

    monkeypatch.setattr(TranslationLoss, "forward", nan_every_other_step)
    cfg = load_config(CONFIG, overrides(corpus, tmp_path, train_max_steps=6, train_max_nonfinite=2,
                                        train_eval_every=1000, train_save_every=1000, train_log_every=1,
                                        train_eval_bleu_sentences=0, train_average_last=1))
    train(cfg)
    assert [r.getMessage().endswith("(1 in a row)") for r in caplog.records if "update skipped" in r.getMessage()] \
        == [True] * 3
    state = load_checkpoint(run_checkpoints(tmp_path)[-1])
    assert state["step"] == 6 and state["position"]["nonfinite"] == 0
    assert state["optimizer"]["state"][0]["step"].item() == 3  # three updates were made, three skipped
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_max_epochs_counts_whole_passes_over_the_data(corpus, tmp_path):
    cfg = load_config(CONFIG, overrides(corpus, tmp_path, train_max_steps=0, train_max_epochs=1,
                                        train_eval_every=1000, train_save_every=1000, train_eval_bleu_sentences=0,
                                        train_average_last=1))
    *_, data, _, _ = train_module.prepare_data(cfg, tmp_path, None)
    n_batches = len(make_batches(data.src_lens, data.tgt_lens, cfg.train.max_tokens))
    train(cfg)
    assert load_checkpoint(run_checkpoints(tmp_path)[-1])["step"] == n_batches


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_trains_in_bf16_only_where_bf16_measures_faster(native, corpus, tmp_path, monkeypatch):
    timings = {"fp32": 1.0, "bf16": 0.5 if native else 2.0}
    monkeypatch.setattr(precision, "measure_probe", lambda shape, name, repeats: timings[name])
    casts = []
    autocast = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: casts.append(kwargs["dtype"]) or autocast(*args, **kwargs))
    cfg = load_config(CONFIG, overrides(corpus, tmp_path, train_precision="auto", train_max_steps=2,
                                        train_eval_bleu_sentences=0, train_average_last=1))
    train(cfg)
    expected = "bf16" if native else "fp32"
    assert load_config(tmp_path / "config.yaml").train.precision == expected
    assert load_checkpoint(run_checkpoints(tmp_path)[-1])["config"]["train"]["precision"] == expected
    assert (set(casts) == {torch.bfloat16}) if native else not casts


def test_a_resumed_run_keeps_its_recorded_precision_and_never_measures_again(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "measure_probe", lambda shape, name, repeats: {"fp32": 1.0, "bf16": 0.5}[name])
    settings = dict(train_precision="auto", train_eval_bleu_sentences=0, train_average_last=1)
    train(load_config(CONFIG, overrides(corpus, tmp_path, train_max_steps=2, **settings)))

    def measured(*args):
        raise AssertionError("a resumed run measured the precision again")

    monkeypatch.setattr(precision, "measure_probe", measured)
    train(load_config(CONFIG, overrides(corpus, tmp_path, train_max_steps=4, **settings)), resume=True)
    assert load_config(tmp_path / "config.yaml").train.precision == "bf16"
    assert load_checkpoint(run_checkpoints(tmp_path)[-1])["step"] == 4
    assert load_checkpoint(run_checkpoints(tmp_path)[-1])["config"]["train"]["precision"] == "bf16"


def test_short_budget_auto_times_the_first_steps_and_a_resume_keeps_the_outcome(corpus, tmp_path, monkeypatch):
    timed = []
    monkeypatch.setattr(train_module, "seconds_per_step", lambda *args, **kwargs: timed.append(args) or 100.0)
    settings = dict(train_short_budget="auto", train_max_minutes=30, train_short_budget_below=1000,
                    train_short_budget_max_steps=2, train_short_budget_dropout=0.0, train_eval_bleu_sentences=0,
                    train_average_last=1)
    train(load_config(CONFIG, overrides(corpus, tmp_path, train_max_steps=20, **settings)))
    # 30 minutes at 100 s a step fit 18 steps, fewer than 1,000: the short budget's 2 steps.
    assert len(timed) == 1
    saved = load_config(tmp_path / "config.yaml")
    assert (saved.train.short_budget, saved.train.max_steps, saved.model.dropout) == ("on", 2, 0.0)
    assert load_checkpoint(run_checkpoints(tmp_path)[-1])["step"] == 2

    def timed_again(*args, **kwargs):
        raise AssertionError("a resumed run timed its steps again")

    monkeypatch.setattr(train_module, "seconds_per_step", timed_again)
    more = {**settings, "train_short_budget_max_steps": 4}
    train(load_config(CONFIG, overrides(corpus, tmp_path, train_max_steps=20, **more)), resume=True)
    assert load_checkpoint(run_checkpoints(tmp_path)[-1])["step"] == 4
    assert load_config(tmp_path / "config.yaml").train.short_budget == "on"


def test_timing_the_steps_leaves_the_random_state_as_it_was(corpus, tmp_path):
    cfg = load_config(CONFIG, overrides(corpus, tmp_path))
    src_tok, tgt_tok, data, _, _ = train_module.prepare_data(cfg, tmp_path, None)
    batches = make_batches(data.src_lens, data.tgt_lens, cfg.train.max_tokens)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    seconds = train_module.seconds_per_step(cfg, torch.device("cpu"), data, batches, src_tok.vocab_size,
                                            tgt_tok.vocab_size, steps=2)
    assert seconds > 0 and torch.equal(torch.rand(4), expected)


def test_train_gives_back_the_signal_handlers_it_installed(corpus, tmp_path):
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    cfg = load_config(CONFIG, overrides(corpus, tmp_path, train_max_steps=1, train_eval_bleu_sentences=0,
                                        train_average_last=1))
    train(cfg)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_signal_to_one_rank_stops_every_rank_as_a_signalled_run(corpus, tmp_path):
    """Rank 1 alone gets SIGTERM after step 3: both ranks save step 3, neither writes final.pt (the
    run is to be resumed, not finished), and both exit as a signalled process does."""
    run_dir = tmp_path / "run"
    changes = {"train_max_steps": 10, "train_eval_every": 1000, "train_save_every": 1000,
               "train_eval_bleu_sentences": 0, "train_keep_last": 2, "train_average_last": 1}
    done = run_module("torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                      f"--master_port={free_port()}", str(ROOT / "tests" / "ddp_signal_worker.py"),
                      "--config", str(CONFIG), *overrides(corpus, run_dir, **changes))
    assert done.returncode != 0  # torchrun reports the ranks' exit with 128 + SIGTERM
    assert [p.name for p in run_checkpoints(run_dir)] == ["step_00000003.pt"]
    assert not (run_dir / "checkpoints" / "final.pt").exists()
    assert "exitcode  : 143" in done.stderr or "exitcode: 143" in done.stderr, done.stderr[-3000:]


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(corpus, tmp_path):
    # Dropout off: every rank seeds the same generator, so two ranks draw the same masks where one
    # process draws two different ones in sequence; with dropout the runs differ by design.
    steps = 4
    changes = {"model_dropout": 0.0, "train_max_steps": steps, "train_eval_every": 1000, "train_save_every": 1000,
               "train_eval_bleu_sentences": 0, "train_keep_last": 1, "train_average_last": 1}
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    done = run_module("torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                      f"--master_port={free_port()}", "-m", "transformer.train", "--config", str(CONFIG),
                      *overrides(corpus, ddp_dir, **changes))
    assert done.returncode == 0, done.stderr[-5000:]

    cfg = load_config(CONFIG, overrides(corpus, single_dir, train_accumulate=2, **changes))
    train(cfg)
    # The same global batches: rank r takes shuffled batches r, r+2, ...; one process with
    # accumulate=2 takes batches 2k and 2k+1 for step k.
    *_, data, _, _ = train_module.prepare_data(cfg, single_dir, None)
    batches = make_batches(data.src_lens, data.tgt_lens, cfg.train.max_tokens)
    ranks = [BatchSampler(batches, cfg.train.seed, r, 2).epoch_batches(0) for r in (0, 1)]
    single = BatchSampler(batches, cfg.train.seed).epoch_batches(0)
    assert len(single) >= 2 * steps
    assert [b for pair in zip(*ranks) for b in pair][: 2 * steps] == single[: 2 * steps]

    name = f"step_{steps:08d}.pt"
    ddp, one = (load_checkpoint(d / "checkpoints" / name)["model"] for d in (ddp_dir, single_dir))
    assert ddp.keys() == one.keys()
    for key in ddp:
        torch.testing.assert_close(ddp[key], one[key], rtol=0, atol=1e-5,
                                   msg=lambda message, key=key: f"{key}: {message}")
    # The data-parallel run really had two ranks, each with half of the batches.
    assert f"in {len(batches) // 2} batches per epoch per rank" in (ddp_dir / "train.log").read_text()


def test_unknown_config_key_is_one_line_with_a_suggestion(corpus, tmp_path):
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), *overrides(corpus, tmp_path), "train.max_step=5"])
    one_line_error(exit, "did you mean 'train.max_steps'")


def test_a_new_run_refuses_a_folder_with_checkpoints(corpus, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step_00000005.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), *overrides(corpus, tmp_path)])
    one_line_error(exit, str(tmp_path), "--resume")


def test_resume_without_checkpoints_is_one_line(corpus, tmp_path):
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), "--resume", *overrides(corpus, tmp_path)])
    one_line_error(exit, str(tmp_path), "no checkpoints")


def test_missing_data_folder_is_one_line(corpus, tmp_path):
    missing = tmp_path / "no-such-folder"
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), *overrides(corpus, tmp_path / "run"), f"data.local_dir={missing}"])
    one_line_error(exit, str(missing))


def paper_lr(step: int, d_model: int, warmup: int) -> float:
    """Equation 3, written out: d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)."""
    return (1 / math.sqrt(d_model)) * min(1 / math.sqrt(step), step / (warmup * math.sqrt(warmup)))


def test_noam_lr_is_the_papers_formula_and_peaks_after_warmup():
    for step in (1, 2, 100, 3999, 4000, 4001, 10000, 100000):
        assert noam_lr(step, 512, 4000) == pytest.approx(paper_lr(step, 512, 4000), rel=1e-12)
        assert noam_lr(step, 512, 4000, 2.0) == pytest.approx(2 * paper_lr(step, 512, 4000), rel=1e-12)
    assert noam_lr(4000, 512, 4000) == pytest.approx(6.987712429686844e-04, rel=1e-12)  # 1/sqrt(512*4000)
    assert noam_lr(1, 512, 4000) == pytest.approx(1.7469281074217108e-07, rel=1e-12)  # 1/(sqrt(512)*4000^1.5)
    rates = [noam_lr(s, 256, 1000) for s in range(1, 3001)]
    assert max(range(len(rates)), key=rates.__getitem__) + 1 == 1000
    assert all(a < b for a, b in itertools.pairwise(rates[:1000]))  # linear warm-up
    assert all(a > b for a, b in itertools.pairwise(rates[999:]))  # inverse-sqrt decay
    assert noam_lr(0, 512, 4000) == noam_lr(1, 512, 4000)


def test_without_decay_the_rate_holds_the_warmups_peak():
    for step in (1, 2, 100, 3999, 4000):  # the same warm-up
        assert noam_lr(step, 512, 4000, 0.7, "none") == pytest.approx(0.7 * paper_lr(step, 512, 4000), rel=1e-12)
    peak = 0.7 * paper_lr(4000, 512, 4000)
    for step in (4001, 10000, 100000):
        assert noam_lr(step, 512, 4000, 0.7, "none") == pytest.approx(peak, rel=1e-12)
    with pytest.raises(ValueError, match="decay must be"):
        noam_lr(10, 512, 4000, 1.0, "cosine")


def test_a_run_without_decay_holds_the_peak_then_cools_down(corpus, tmp_path):
    run_dir = tmp_path / "wsd"
    with process_state_kept():
        main(["--config", str(CONFIG), *overrides(corpus, run_dir, train_lr_decay="none")])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["lr"] for r in rows if "loss" in r}
    peak = noam_lr(10, 32, 10)
    assert rates[5] == pytest.approx(noam_lr(5, 32, 10)) and rates[10] == rates[20] == pytest.approx(peak)
    assert rates[30] == pytest.approx(peak * (1 - 29 / 30) / 0.2)  # the last 20% of 30 steps cool down


def test_an_unknown_lr_decay_is_named(corpus, tmp_path):
    with pytest.raises(ConfigError, match="train.lr_decay must be 'inverse_sqrt' or 'none'"):
        load_config(CONFIG, overrides(corpus, tmp_path, train_lr_decay="cosine"))


def test_cooldown_takes_the_rate_linearly_to_zero_over_the_end_of_the_budget():
    assert cooldown_factor(0.5, 0.0) == 1.0 and cooldown_factor(1.0, 0.0) == 1.0  # off
    assert [cooldown_factor(p, 0.2) for p in (0.0, 0.8, 0.9, 0.95, 1.0)] == pytest.approx([1, 1, 0.5, 0.25, 0])
    assert cooldown_factor(1.5, 0.2) == 0.0


def test_budget_used_is_the_most_advanced_of_the_limits_set():
    position = Position(step=50, epoch=1, batch=5, elapsed=30.0)
    tc = TrainConfig(max_steps=200, max_epochs=0, max_minutes=0)
    assert budget_used(tc, position, 10) == pytest.approx(0.25)
    tc = TrainConfig(max_steps=200, max_epochs=3, max_minutes=0)
    assert budget_used(tc, position, 10) == pytest.approx(0.5)  # 1.5 of 3 epochs
    tc = TrainConfig(max_steps=0, max_epochs=0, max_minutes=0.75)
    assert budget_used(tc, position, 10) == pytest.approx(30 / 45)
    tc = TrainConfig(max_steps=40, max_epochs=0, max_minutes=0)
    assert budget_used(tc, position, 10) == 1.0


def test_cooldown_needs_a_budget(corpus, tmp_path):
    with pytest.raises(ConfigError, match="train.cooldown needs a budget"):
        load_config(CONFIG, overrides(corpus, tmp_path, train_max_steps=0, train_cooldown=0.1))
    with pytest.raises(ConfigError, match=r"train.cooldown must be in \[0, 1\]"):
        load_config(CONFIG, overrides(corpus, tmp_path, train_cooldown=1.5))


def test_translation_loss_equals_cross_entropy_over_all_positions():
    torch.manual_seed(0)
    model = Transformer(11, 13, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=2,
                        dropout=0.0, share_embeddings=False, tie_output=False, pad_id=PAD_ID).double().eval()
    src = torch.randint(4, 11, (3, 7))
    tgt = torch.randint(4, 13, (3, 6))
    src[0, 5:] = PAD_ID
    tgt[1, 3:] = PAD_ID
    tgt[2, 1:] = PAD_ID
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    loss = TranslationLoss(model, label_smoothing=0.1)(src, tgt_in, tgt_out)  # float32 by design
    expected = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten(), ignore_index=PAD_ID,
                               label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
