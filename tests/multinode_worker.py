"""One rank of a `torchrun` training that records what the rank read, trained and waited for.

Run by `tests/test_multinode.py` under `torch.distributed.run` with the usual training arguments.
The rank trains as `transformer-train` does and writes `$RECORD_DIR/rank<R>.json`:

* `tokenizer_trainings`: calls that trained a tokenizer or took one from the cache (rank 0 alone
  should, on the in-memory path);
* `checkpoint_reads`: calls that read the run folder's checkpoints to resume (rank 0 alone should);
* `steps`: per optimizer step (`train_step` and `after_step`), its step number, the operations that
  would make the host wait for a GPU (`HostReads`, with the loss on its device path, and building
  batches and the collective of host numbers, host work, left out), the collectives the step
  ran, by name, how many batches had been built when the step waited for the device, and when the
  step ended (`time.perf_counter`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from host_reads import HostReads, uncounted

from transformer import train as train_module
from transformer.training import distributed, run_data, run_state
from transformer.training import loss as loss_module
from transformer.training import step as step_module

RANK = int(os.environ["RANK"])
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier")


def main() -> None:
    record: dict = {"tokenizer_trainings": 0, "checkpoint_reads": 0, "steps": []}
    now: dict = {"reads": None, "collectives": Counter(), "built": 0, "built_at_read": None}

    collate = step_module.collate

    def counted_collate(*args, **kwargs):
        now["built"] += 1
        return collate(*args, **kwargs)

    prefetch = step_module.BatchStream.prefetch

    def uncounted_prefetch(self):  # building batches (and an epoch's order) is host work on host tensors
        with uncounted():
            return prefetch(self)

    agree = distributed.Ranks.agree

    def uncounted_agree(self, *args, **kwargs):  # host numbers in a host tensor: nothing for the GPU to wait for
        with uncounted():
            return agree(self, *args, **kwargs)

    def counted_collective(name):
        function = getattr(dist, name)

        def call(*args, **kwargs):
            now["collectives"][name] += 1
            return function(*args, **kwargs)
        return call

    sum_on_device = distributed.Ranks.sum_on_device

    def read_noted(self, values):
        now["built_at_read"] = now["built"]
        return sum_on_device(self, values)

    def counted_step(function, starts_step=False):
        def call(run, *args):
            if starts_step:
                now["collectives"] = Counter()
            with HostReads() as reads:
                result = function(run, *args)
            now["reads"] = (now["reads"] or Counter()) + reads.counts
            return result
        return call

    train_step, after_step = counted_step(train_module.train_step, True), counted_step(train_module.after_step)

    def recorded_after_step(run, stop):
        reason = after_step(run, stop)
        record["steps"].append({"step": run.position.step, "reads": dict(now["reads"]), "time": time.perf_counter(),
                                "collectives": dict(now["collectives"]), "built_at_read": now["built_at_read"]})
        now["reads"] = None
        return reason

    load_or_train, load_resume = run_data.load_or_train_tokenizers, run_state.load_resume_checkpoint

    def noted(key, function):
        def call(*args, **kwargs):
            record[key] += 1
            return function(*args, **kwargs)
        return call

    step_module.collate = counted_collate
    step_module.BatchStream.prefetch = uncounted_prefetch
    distributed.Ranks.agree = uncounted_agree
    distributed.Ranks.sum_on_device = read_noted
    for name in COLLECTIVES:
        setattr(dist, name, counted_collective(name))
    loss_module.rows_found_on_host = lambda device: False  # the loss's GPU path
    train_module.train_step, train_module.after_step = train_step, recorded_after_step
    run_data.load_or_train_tokenizers = noted("tokenizer_trainings", load_or_train)
    run_state.load_resume_checkpoint = noted("checkpoint_reads", load_resume)
    torch.set_num_threads(1)
    try:
        train_module.main(sys.argv[1:])
    finally:
        (Path(os.environ["RECORD_DIR"]) / f"rank{RANK}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
