"""A run folder can never be damaged: one run at a time (the lock), resume checks that refuse other
settings before anything is written, a finished run left as it is, resume past an unreadable
checkpoint, no duplicated metrics, no temporary files left behind, a full disk and bad data as
one-line errors.

The runs are the tiny ones of test_train.py, with its helpers; the finished run resumed here is a
copy of its uninterrupted reference run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    CONFIG,
    MAX_STEPS,
    assert_same_tensors,
    one_line_error,
    overrides,
    step_of,
    steps_logged,
    write_corpus,
)

from transformer.checkpoint import load_checkpoint, run_checkpoints, save_checkpoint
from transformer.config import load_config
from transformer.train import main
from transformer.training.plot import read_metrics

pytestmark = pytest.mark.usefixtures("restore_process_state")

LOCK = "run.lock"


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: its content hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def copy_run(reference: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    return run_dir


# ---- the lock ----

def write_lock(run_dir: Path, **owner) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "refreshed": time.time(),
              "token": "someone-else", **owner}
    (run_dir / LOCK).write_text(json.dumps(record))


def test_a_second_run_into_a_live_runs_folder_is_refused_and_writes_nothing(corpus, tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])  # a live process of this host owns the folder
    try:
        write_lock(tmp_path, pid=sleeper.pid)
        before = snapshot(tmp_path)
        with pytest.raises(SystemExit) as exit:
            main(["--config", str(CONFIG), *overrides(corpus, tmp_path, train_max_steps=2)])
        one_line_error(exit, str(tmp_path), "in use by another run", f"pid {sleeper.pid}",
                       f"host {socket.gethostname()!r}", "started ")
        assert snapshot(tmp_path) == before  # its lock untouched, no log, config or checkpoint
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_live_lock_of_another_host_is_refused_and_a_stale_one_taken_over(tmp_path):
    from transformer.training import run_lock
    from transformer.training.run_lock import RunLock, RunLockedError

    write_lock(tmp_path, host="elsewhere", pid=1)  # refreshed just now: alive, though its pid is not ours to check
    with pytest.raises(RunLockedError, match="pid 1 on host 'elsewhere'"):
        RunLock(tmp_path).acquire()
    write_lock(tmp_path, host="elsewhere", refreshed=time.time() - run_lock.STALE_SECONDS - 1)
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["token"] == lock.token
    assert not lock.path.exists()  # released


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(corpus, tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_lock(tmp_path, pid=dead.pid)
    with caplog.at_level(logging.WARNING):
        main(["--config", str(CONFIG), *overrides(corpus, tmp_path, train_max_steps=2, train_average_last=1,
                                                 train_eval_bleu_sentences=0)])
    assert any("took over the stale lock" in r.getMessage() and f"pid {dead.pid}" in r.getMessage()
               for r in caplog.records)
    assert (tmp_path / "checkpoints" / "final.pt").is_file() and not (tmp_path / LOCK).exists()


def test_the_lock_is_refreshed_while_held_and_given_up_when_taken(tmp_path, monkeypatch):
    from transformer.training import run_lock

    monkeypatch.setattr(run_lock, "REFRESH_SECONDS", 0.02)
    lock = run_lock.RunLock(tmp_path)
    lock.acquire()
    first = json.loads(lock.path.read_text())
    deadline = time.monotonic() + 10
    while json.loads(lock.path.read_text())["refreshed"] == first["refreshed"] and time.monotonic() < deadline:
        time.sleep(0.01)
    now = json.loads(lock.path.read_text())
    assert now["refreshed"] > first["refreshed"] and now["started"] == first["started"]
    assert (now["pid"], now["host"]) == (os.getpid(), socket.gethostname())
    write_lock(tmp_path)  # someone took it over: the refresh must not overwrite their lock
    time.sleep(0.1)
    lock.release()
    assert json.loads(lock.path.read_text())["token"] == "someone-else"


def test_a_lock_file_not_yet_written_is_not_taken_for_a_stale_one(tmp_path):
    from transformer.training.run_lock import RunLock, RunLockedError

    first, second = RunLock(tmp_path), RunLock(tmp_path)
    record, seen = first._record, []

    def second_run_looks_then_record():  # the lock file exists and is still empty
        try:
            second.acquire()
            seen.append("second took the lock")
        except RunLockedError as e:
            seen.append(str(e))
        return record()

    first._record = second_run_looks_then_record
    first.acquire()
    try:
        assert len(seen) == 1 and "in use by another run (its lock file holds no owner record" in seen[0], seen
        assert json.loads(first.path.read_text())["token"] == first.token
    finally:
        first.release()
        second.release()


def test_on_this_host_a_live_owner_keeps_its_lock_however_old_and_a_reused_pid_loses_it(tmp_path):
    from transformer.training import run_lock
    from transformer.training.run_lock import RunLock, RunLockedError

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        identity = run_lock._process_identity(sleeper.pid)
        assert identity is not None and identity != run_lock._process_identity(os.getpid())
        # Stopped with Ctrl-Z for ten minutes, or unable to refresh on a full disk: alive, still the owner.
        write_lock(tmp_path, pid=sleeper.pid, process=identity, refreshed=time.time() - 2 * run_lock.STALE_SECONDS)
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid} on host"):
            RunLock(tmp_path).acquire()
        # The lock's pid now names a process that started later than the lock's owner did.
        write_lock(tmp_path, pid=sleeper.pid, process=identity.rsplit(" ", 1)[0] + " 1")
        with RunLock(tmp_path) as lock:
            held = json.loads(lock.path.read_text())
            assert held["token"] == lock.token and held["process"] == run_lock._process_identity(os.getpid())
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_run_folder_that_cannot_be_created_is_one_line(corpus, tmp_path):
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), *overrides(corpus, in_the_way / "run")])
    one_line_error(exit, str(in_the_way / "run"), "Not a directory")


def test_a_run_whose_lock_is_taken_stops_without_writing_more(corpus, tmp_path, monkeypatch):
    from transformer import train
    from transformer.training import run_lock

    monkeypatch.setattr(run_lock, "REFRESH_SECONDS", 0.01)
    validate = train.validate

    def validate_while_another_run_takes_the_folder(*args, **kwargs):
        result = validate(*args, **kwargs)
        # The lock deleted by hand and another run started, say. That run keeps writing its lock, as
        # a live one refreshes it, so a refresh of ours that read the file just before is undone.
        # Wait for the refresh thread to notice; generous, since a loaded machine can starve it.
        deadline = time.monotonic() + 120
        while not any("no longer held" in r.getMessage() for r in caught) and time.monotonic() < deadline:
            write_lock(tmp_path)
            time.sleep(0.01)
        return result

    caught: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = caught.append
    logging.getLogger("transformer.training.run_lock").addHandler(handler)
    monkeypatch.setattr(train, "validate", validate_while_another_run_takes_the_folder)
    try:
        with pytest.raises(SystemExit) as exit:
            main(["--config", str(CONFIG), *overrides(corpus, tmp_path, train_eval_bleu_sentences=0)])
    finally:
        logging.getLogger("transformer.training.run_lock").removeHandler(handler)
    one_line_error(exit, f"{tmp_path / LOCK} is no longer this run's", "stopped at step 10")
    assert [step_of(p) for p in run_checkpoints(tmp_path)] == [5]  # nothing written after step 10's validation
    assert not (tmp_path / "checkpoints" / "best.pt").exists()
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "someone-else"  # the other run's lock kept


# ---- resuming ----

@pytest.mark.parametrize("change, shown", [
    ({"model_d_model": 64}, "model.d_model 32 -> 64"),
    ({"tokenizer_vocab_size": 800}, "tokenizer.vocab_size 120 -> 800"),
    ({"train_max_tokens": 400, "model_dropout": 0.2}, "model.dropout 0.1 -> 0.2; train.max_tokens 300 -> 400"),
    ({"train_max_steps": 20}, "train.max_steps 30 -> 20 (it may only grow)"),
], ids=["model", "tokenizer", "two-keys", "fewer-steps"])
def test_resume_with_other_settings_is_refused_before_anything_is_written(change, shown, reference, corpus, tmp_path):
    run_dir = copy_run(reference, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), "--resume", *overrides(corpus, run_dir, **change)])
    one_line_error(exit, f"cannot resume the run at step {MAX_STEPS} with other settings: {shown}", "config.yaml")
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("prepared", [False, True], ids=["in-memory", "prepared"])
def test_resume_on_changed_training_data_is_refused_before_any_work_unless_accepted(
        prepared, corpus, tmp_path, monkeypatch, caplog):
    from transformer import train

    data = tmp_path / "data"
    data.mkdir()
    write_corpus(data)
    run_dir, folder = tmp_path / "run", tmp_path / "prepared"

    def args(steps: int, *flags: str) -> list[str]:
        extra = [f"data.prepared_dir={folder}"] if prepared else []
        return ["--config", str(CONFIG), *flags, *overrides(
            corpus, run_dir, data_local_dir=data, train_max_steps=steps, train_save_every=2, train_eval_every=1000,
            train_eval_bleu_sentences=0, train_average_last=1), *extra]

    main(args(2))
    # A copy or a touch changes the modification time, not the data: the run resumes.
    os.utime(data / "train.de", ns=(time.time_ns(), time.time_ns()))
    main(args(4, "--resume"))
    assert step_of(run_checkpoints(run_dir)[-1]) == 4

    # The corpus at the same path shrinks from 300 to 150 pairs.
    for lang in ("de", "en"):
        path = data / f"train.{lang}"
        path.write_text("".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[:150]), encoding="utf-8")
    before = {"run": snapshot(run_dir), "prepared": snapshot(folder)}
    loads = []
    prepare_data = train.prepare_data
    monkeypatch.setattr(train, "prepare_data", lambda *a, **k: loads.append(1) or prepare_data(*a, **k))
    with pytest.raises(SystemExit) as exit:
        main(args(6, "--resume"))
    one_line_error(exit, f"{data / 'train.de'} changed since the run started", "--accept-data-change")
    assert not loads  # no data loaded or prepared, no tokenizer trained
    assert {"run": snapshot(run_dir), "prepared": snapshot(folder)} == before
    if prepared:
        # A folder prepared again would train another tokenizer, which a resumed run cannot take:
        # accepting the change is refused before any work as well.
        with pytest.raises(SystemExit) as exit:
            main(args(6, "--resume", "--accept-data-change"))
        one_line_error(exit, "changed since the run started", "new tokenizer", "start a new run")
        assert not loads and {"run": snapshot(run_dir), "prepared": snapshot(folder)} == before
        return

    with caplog.at_level(logging.WARNING):
        main(args(6, "--resume", "--accept-data-change"))
    assert any("changed since the run started; training on it as it is now (--accept-data-change)"
               in r.getMessage() for r in caplog.records)
    state = load_checkpoint(run_checkpoints(run_dir)[-1])
    assert state["step"] == 6
    assert [f["bytes"] for f in state["data_fingerprint"]] == [(data / f"train.{lang}").stat().st_size
                                                                 for lang in ("de", "en")]
    main(args(8, "--resume"))  # the data it now records is the data it finds
    assert step_of(run_checkpoints(run_dir)[-1]) == 8


def test_accept_data_change_goes_with_resume(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--config", str(CONFIG), "--accept-data-change", *overrides(corpus, tmp_path)])
    assert "--accept-data-change goes with --resume" in capsys.readouterr().err


def test_resume_of_a_folder_that_does_not_exist_creates_nothing(corpus, tmp_path):
    missing = tmp_path / "no-such-run"
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), "--resume", *overrides(corpus, missing)])
    one_line_error(exit, str(missing), "--resume given but there is no such run folder")
    assert not missing.exists()


def test_a_run_that_fails_before_its_first_step_removes_only_the_folders_it_created(tmp_path):
    (tmp_path / "data").mkdir()
    data = write_corpus(tmp_path / "data")
    (data / "train.en").write_text("\n   \n\n" * 100, encoding="utf-8")  # refused once the lock is held
    new = tmp_path / "runs" / "new"
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), *overrides(data, new)])
    one_line_error(exit, "empty or blank")
    assert not (tmp_path / "runs").exists()
    existing = tmp_path / "existing"  # there before the run: kept
    existing.mkdir()
    with pytest.raises(SystemExit):
        main(["--config", str(CONFIG), *overrides(data, existing)])
    assert existing.is_dir() and not any(existing.iterdir())


def test_resume_accepts_another_test_split_which_training_never_reads():
    from transformer.checkpoint import resume_changes

    requested = load_config(None, ["data.test_split=test_2017_flickr", "data.hub_test_split=test2017"])
    assert resume_changes(load_config(None), requested, step=5) == [
        "data.test_split 'test_2016_flickr' -> 'test_2017_flickr'", "data.hub_test_split 'test' -> 'test2017'"]


def test_a_finished_run_resumed_with_the_same_budget_changes_nothing(reference, corpus, tmp_path, caplog):
    run_dir = copy_run(reference, tmp_path)
    before = snapshot(run_dir)
    with caplog.at_level(logging.INFO):
        main(["--config", str(CONFIG), "--resume", *overrides(corpus, run_dir)])
    assert snapshot(run_dir) == before  # no step 31, final.pt, metrics and log untouched
    assert any(f"finished at step {MAX_STEPS} (step limit); nothing to do" in r.getMessage() for r in caplog.records)


def test_a_finished_run_whose_final_pt_is_of_an_earlier_budget_gets_its_own(reference, corpus, tmp_path, caplog):
    # Finished at step 25, resumed with max_steps=30 and killed after step 30's checkpoint, before
    # its final.pt: the final.pt there is step 25's.
    from transformer.checkpoint import save_averaged

    run_dir = copy_run(reference, tmp_path)
    final = run_dir / "checkpoints" / "final.pt"
    final.unlink()
    save_averaged(run_checkpoints(run_dir)[:-1], final)
    assert load_checkpoint(final)["step"] < MAX_STEPS
    with caplog.at_level(logging.INFO):
        main(["--config", str(CONFIG), "--resume", *overrides(corpus, run_dir)])
    assert any("without its average: wrote" in r.getMessage() for r in caplog.records)
    written, uninterrupted = load_checkpoint(final), load_checkpoint(reference / "checkpoints" / "final.pt")
    assert written["step"] == MAX_STEPS
    assert_same_tensors(written["model"], uninterrupted["model"], "model")


def test_a_larger_budget_is_accepted_logged_and_trained(reference, corpus, tmp_path, caplog):
    run_dir = copy_run(reference, tmp_path)
    with caplog.at_level(logging.INFO):
        main(["--config", str(CONFIG), "--resume", *overrides(corpus, run_dir, train_max_steps=MAX_STEPS + 5,
                                                              train_eval_every=5, train_log_every=1)])
    messages = [r.getMessage() for r in caplog.records]
    assert "resumed with a changed setting: train.max_steps 30 -> 35" in messages
    assert "resumed with a changed setting: train.eval_every 10 -> 5" in messages
    assert step_of(run_checkpoints(run_dir)[-1]) == MAX_STEPS + 5
    assert load_checkpoint(run_dir / "checkpoints" / "final.pt")["step"] == MAX_STEPS + 5
    assert load_config(run_dir / "config.yaml").train.max_steps == MAX_STEPS + 5


def test_resume_skips_an_unreadable_newest_checkpoint_and_replays_without_duplicate_metrics(
        reference, corpus, tmp_path, caplog):
    run_dir = copy_run(reference, tmp_path)
    newest = run_dir / "checkpoints" / f"step_{MAX_STEPS:08d}.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut off by a crash of the storage, say
    (run_dir / "checkpoints" / "final.pt").unlink()
    leftovers = [run_dir / "checkpoints" / ".step_00000030.pt.tmp4242", run_dir / "checkpoints" / ".best.pt.tmp77"]
    for path in leftovers:
        path.write_bytes(b"partial")
    with caplog.at_level(logging.INFO):
        main(["--config", str(CONFIG), "--resume", *overrides(corpus, run_dir)])
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"skipping {newest}: {newest}: not a readable checkpoint") for m in messages), messages
    assert f"resuming from {run_dir / 'checkpoints' / 'step_00000025.pt'}" in messages
    assert all(any(m.startswith(f"removed {path}") for m in messages) for path in leftovers)
    assert not temp_files(run_dir)
    assert (run_dir / "checkpoints" / f"{newest.name}.unreadable").is_file()
    # Steps 26 to 30 were replayed into the same checkpoint and the same log rows as the uninterrupted run.
    for key in ("model", "optimizer", "rng"):
        assert_same_tensors(load_checkpoint(newest)[key], load_checkpoint(reference / "checkpoints" / newest.name)[key], key)
    assert steps_logged(run_dir) == steps_logged(reference)


def test_resume_drops_a_metrics_row_cut_short_with_the_replayed_ones(tmp_path):
    from transformer.training.run_folder import MetricsLog

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')  # a full disk mid-append
    MetricsLog(path, enabled=True).truncate(3)
    assert read_metrics(path) == rows[:3]


def test_the_curves_count_a_step_logged_twice_once(tmp_path):
    rows = [{"step": 5, "loss": 3.0}, {"step": 10, "loss": 2.0}, {"step": 10, "valid_loss": 2.5, "minutes": 1},
            {"step": 10, "loss": 2.1}, {"step": 10, "valid_loss": 2.4, "minutes": 1.2}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(path) == [rows[0], rows[3], rows[4]]


def test_a_new_run_removes_temporary_files_of_killed_writes(corpus, tmp_path, caplog):
    (tmp_path / "checkpoints").mkdir(parents=True)
    leftover = tmp_path / "checkpoints" / ".best.pt.tmp31337"
    leftover.write_bytes(b"x" * 1000)
    unrelated = tmp_path / "notes.tmp"  # not of our naming pattern: kept
    unrelated.write_text("mine")
    # Another run's folder inside this one, in the middle of a write: not this run's to clean.
    nested = tmp_path / "other-run" / "checkpoints" / ".step_00000100.pt.tmp4242"
    nested.parent.mkdir(parents=True)
    nested.write_bytes(b"being written")
    with caplog.at_level(logging.INFO):
        main(["--config", str(CONFIG), *overrides(corpus, tmp_path, train_max_steps=2, train_average_last=1,
                                                 train_eval_bleu_sentences=0)])
    assert not leftover.exists() and unrelated.read_text() == "mine"
    assert nested.read_bytes() == b"being written"
    assert any(r.getMessage().startswith(f"removed {leftover}") for r in caplog.records)


# ---- a full disk ----

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a real file system that fills up. CI runs as root, which mounting needs."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a 2 MiB tmpfs for the disk-full tests (they need root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)  # lazy: a file still open must not fail the test


def test_a_checkpoint_that_does_not_fit_is_one_error_and_leaves_no_temporary_file(small_disk):
    from transformer.atomic import WriteError

    path = small_disk / "checkpoints" / "step_1.pt"
    save_checkpoint({"model": {"w": torch.zeros(10)}}, path)
    before = path.read_bytes()
    with pytest.raises(WriteError) as error:
        save_checkpoint({"model": {"w": torch.zeros(1_000_000)}}, path)  # 4 MB
    assert str(error.value) == f"{path}: cannot write: No space left on device"
    assert path.read_bytes() == before and not temp_files(small_disk)


def test_training_onto_a_full_disk_stops_with_one_line(corpus, small_disk):
    run_dir = small_disk / "run"
    # About 2.4 MB of weights and 7 MB with Adam's moments: config, tokenizer and log fit, the checkpoint does not.
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), *overrides(corpus, run_dir, model_d_ff=4096, train_max_steps=2,
                                                 train_save_every=1, train_eval_every=100)])
    one_line_error(exit, str(run_dir / "checkpoints"), "No space left on device")
    assert not temp_files(small_disk) and not (run_dir / LOCK).exists()


# ---- bad data ----

def test_an_all_blank_training_corpus_is_one_line_before_any_tokenizer_training(tmp_path):
    (tmp_path / "data").mkdir()
    data = write_corpus(tmp_path / "data")
    (data / "train.en").write_text("\n   \n\n" * 100, encoding="utf-8")
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), *overrides(data, run_dir)])
    one_line_error(exit, str(data), "every en line of the training split is empty or blank")
    assert not (data / "tokenizers").exists() and not any(run_dir.rglob("*"))


def test_a_missing_local_folder_says_it_tries_the_hub_and_names_both_when_that_fails(corpus, tmp_path, monkeypatch,
                                                                                     caplog):
    import datasets

    def offline(*args, **kwargs):
        for retry in range(5):
            logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry %d/5].", retry + 1)
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    missing = tmp_path / "no-such-folder"
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), *overrides(corpus, tmp_path / "run"), f"data.local_dir={missing}",
              "data.hub_name=someone/corpus"])
    one_line_error(exit, f"data.local_dir '{missing}' is not a folder", "someone/corpus", "Couldn't reach")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [f"data.local_dir '{missing}' is not a folder; trying hub dataset 'someone/corpus' instead"]
