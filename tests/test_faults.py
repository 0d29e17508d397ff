"""Fault injection: a tiny run is killed with SIGKILL at a checkpoint write, during validation, at
the epoch boundary and while writing final.pt; resumed, it must end with the same final.pt and
step checkpoints as a run that was never interrupted (weights, optimizer state, RNG states, data
position; not the wall-clock fields) and metrics log, no temporary file and no lock left behind.

The killed run is a subprocess whose own code sends the SIGKILL at the chosen point (DRIVER below),
so the kill lands at the same place every time; the resume runs in-process.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import CONFIG, MAX_STEPS, ROOT, TIMEOUT, assert_same_tensors, overrides, steps_logged

from transformer.checkpoint import load_checkpoint, run_checkpoints
from transformer.train import main

pytestmark = pytest.mark.usefixtures("restore_process_state")

# argv: POINT, then transformer-train's arguments. Kills this process (SIGKILL: no handler, no
# cleanup) at POINT of the run.
DRIVER = """
import os, signal, sys
import transformer.train as train
from transformer.data.batches import BatchSampler

point = sys.argv[1]

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

if point in ("checkpoint", "final"):
    # After the temporary file is written, before the rename that publishes it.
    target = {"checkpoint": ".step_00000015.pt.tmp", "final": ".final.pt.tmp"}[point]
    fsync = os.fsync
    def fsync_then_kill(fd):
        fsync(fd)
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(target):
            kill()
    os.fsync = fsync_then_kill
elif point == "validation":
    validate, calls = train.validate, []
    def validate_then_kill(*args, **kwargs):
        calls.append(1)
        result = validate(*args, **kwargs)
        if len(calls) == 2:  # step 20: the last checkpoint is step 15's
            kill()
        return result
    train.validate = validate_then_kill
elif point == "epoch":
    epoch_batches = BatchSampler.epoch_batches
    def epoch_batches_or_kill(self, epoch):
        if epoch == 1:
            kill()
        return epoch_batches(self, epoch)
    BatchSampler.epoch_batches = epoch_batches_or_kill
train.main(sys.argv[2:])
"""

# The last checkpoint before each kill: the resume starts there. Epoch 1 begins at step 26, whose
# batches are built a step ahead, while step 25 runs and before it is saved.
RESUMES_FROM = {"checkpoint": 10, "validation": 15, "epoch": 20, "final": MAX_STEPS}


def without(state: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in keys}


def assert_same_checkpoint(resumed: Path, uninterrupted: Path) -> None:
    a, b = load_checkpoint(resumed), load_checkpoint(uninterrupted)
    assert a.keys() == b.keys(), resumed
    for key in a:
        if key == "position":  # all but the seconds of training, which no two runs share
            assert without(a[key], "elapsed") == without(b[key], "elapsed"), resumed
        elif key == "config":  # the same but for the folder it was written to
            assert a[key]["train"].pop("output_dir") != b[key]["train"].pop("output_dir")
            assert a[key] == b[key], resumed
        elif key == "averaged_from":
            assert [Path(p).name for p in a[key]] == [Path(p).name for p in b[key]], resumed
        else:
            assert_same_tensors(a[key], b[key], f"{resumed.name}/{key}")


@pytest.mark.parametrize("point", list(RESUMES_FROM))
def test_a_run_killed_anywhere_resumes_to_the_uninterrupted_result(point, reference, corpus, tmp_path):
    ov = overrides(corpus, tmp_path)
    killed = subprocess.run([sys.executable, "-c", DRIVER, point, "--config", str(CONFIG), *ov], cwd=ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    assert max(int(p.stem.split("_")[1]) for p in run_checkpoints(tmp_path)) == RESUMES_FROM[point]
    assert not (checkpoints / "final.pt").exists()
    if point in ("checkpoint", "final"):
        assert list(checkpoints.glob(".*.tmp*")), "the kill did not land in the middle of the write"
    assert (tmp_path / "run.lock").is_file()  # left behind by the killed run, taken over by the resume

    main(["--config", str(CONFIG), "--resume", *ov])
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == sorted(p.name for p in (reference / "checkpoints").iterdir())
    for name in names:
        if name.startswith(("step_", "final")):
            assert_same_checkpoint(checkpoints / name, reference / "checkpoints" / name)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name] and not (tmp_path / "run.lock").exists()
    # The replayed steps are logged once, as in the uninterrupted run.
    assert steps_logged(tmp_path) == steps_logged(reference)
