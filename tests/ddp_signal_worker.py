"""One rank of a `torchrun` training in which rank 1 alone receives SIGTERM after step 3.

Run by `tests/test_train.py` under `torch.distributed.run` with the usual training arguments.
Both ranks must stop at that step, save it, write no final.pt and exit as a signalled run does.
Rank 1 finishes a few seconds after rank 0, so that rank 0's own decision is what the test sees,
not torchrun ending it when rank 1 exits.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from transformer import train as train_module

RANK = int(os.environ["RANK"])
SIGNAL_STEP = 3
_train_step = train_module.train_step
_finish = train_module.finish


def train_step(run):
    result = _train_step(run)
    if RANK == 1 and run.position.step == SIGNAL_STEP:
        os.kill(os.getpid(), signal.SIGTERM)
    return result


def finish(run, reason, signal_number):
    if RANK == 1:
        time.sleep(5)
    return _finish(run, reason, signal_number)


train_module.train_step = train_step
train_module.finish = finish
train_module.main(sys.argv[1:])
