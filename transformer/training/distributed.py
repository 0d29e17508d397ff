"""Data parallelism under `torchrun`: this process's rank and device, and the collectives training needs.

A process started without `torchrun` is rank 0 of 1, and every collective is then the identity,
so the training loop has one code path for one process and for many. The random number
generators are per rank (each rank draws its own dropout masks), so their states are gathered
and restored here too.

This module imports only :mod:`transformer.config` and :mod:`transformer.runtime` from the rest
of the package.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from transformer.config import ConfigError, TrainConfig
from transformer.runtime import resolve_device

log = logging.getLogger(__name__)


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

    def close(self) -> None:
        """Leave the process group (a no-op for a single process)."""
        if self.world_size > 1:
            dist.destroy_process_group()


def launch_rank() -> tuple[int, int]:
    """This process's global rank and the number of ranks, as `torchrun` sets them (0 and 1 without it)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_device(tc: TrainConfig) -> torch.device:
    """The device of this process: `train.device` for the rank `torchrun` gave it (LOCAL_RANK, WORLD_SIZE).

    Raises:
        ConfigError: a device this machine does not have, or one GPU named for several ranks.
    """
    try:
        return resolve_device(tc.device, int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as e:
        raise ConfigError(f"train.device: {e}") from None


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
