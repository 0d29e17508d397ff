"""One rank of a `torchrun` training in which rank 1 alone meets a non-finite step.

Run by `tests/test_gpu_paths.py` under `torch.distributed.run` with the usual training arguments.
The run trains through a real `GradScaler` (the fp16 code path, on the CPU), and on rank 1 only,
training step 2 has a NaN loss and step 4 an infinite gradient with a finite loss (an fp16
overflow). Each rank writes, to `$FAULT_RECORD_DIR/rank<R>.json`, what every optimizer step
decided and a checksum of the parameters after it, so that the test can check that the ranks
took the same branches and stayed identical.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from transformer import train as train_module
from transformer.training.loss import TranslationLoss

RANK = int(os.environ["RANK"])
NAN_LOSS_STEP, INF_GRAD_STEP = 2, 4


class _InfiniteGradient(torch.autograd.Function):
    """The identity forward; an infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def main() -> None:
    record: list[dict] = []
    calls = []
    forward, optimizer_step = TranslationLoss.forward, train_module.optimizer_step

    def faulty_forward(self, *batch):
        loss = forward(self, *batch)
        if not self.training:
            return loss
        calls.append(1)
        if RANK == 1 and len(calls) == NAN_LOSS_STEP:
            return loss * float("nan")
        if RANK == 1 and len(calls) == INF_GRAD_STEP:
            return _InfiniteGradient.apply(loss)
        return loss

    def recorded_step(model, optimizer, scaler, clip_norm, loss_sum, ranks):
        finite, total = optimizer_step(model, optimizer, scaler, clip_norm, loss_sum, ranks)
        record.append({"finite": finite, "scale": scaler.get_scale(),
                       "checksum": sum(p.detach().double().sum().item() for p in model.parameters())})
        return finite, total

    TranslationLoss.forward = faulty_forward
    train_module.optimizer_step = recorded_step
    train_module.grad_scaler = lambda precision, device: torch.amp.GradScaler("cpu", init_scale=2.0**10)
    try:
        train_module.main(sys.argv[1:])
    finally:
        out = Path(os.environ["FAULT_RECORD_DIR"]) / f"rank{RANK}.json"
        out.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
