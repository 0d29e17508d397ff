"""Data parallelism under `torchrun`: this process's rank and device, and the collectives training needs.

A process started without `torchrun` is rank 0 of 1, and every collective is then the identity,
so the training loop has one code path for one process and for many. What one rank reads (a
checkpoint to resume from, a tokenizer it trained) it sends to the others, which need neither a
shared file system nor the same copy of the run folder. The random number generators are per
rank (each rank draws its own dropout masks), so their states are gathered and restored here too.

This module imports only :mod:`transformer.config` and :mod:`transformer.runtime` from the rest
of the package.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from transformer.config import ConfigError, TrainConfig
from transformer.runtime import resolve_device

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class _SentTensor:
    """Where a tensor stood in an object that rank 0 sends: its place in the order the tensors follow."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


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

    def agree(self, sums: Sequence[float], maxima: Sequence[float]) -> tuple[list[float], list[float]]:
        """The sums over ranks of `sums` and the maxima over ranks of `maxima`, in one collective.

        Host numbers only (float64, on the CPU): every rank's values are gathered and reduced on
        each rank in rank order, so all ranks get the same result.
        """
        if self.world_size == 1:
            return list(sums), list(maxima)
        mine = torch.tensor([*sums, *maxima], dtype=torch.float64)
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(everyone, mine, group=self.host_group)
        table = torch.stack(everyone)  # (world_size, len(sums) + len(maxima))
        return table[:, :len(sums)].sum(0).tolist(), table[:, len(sums):].amax(0).tolist()

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

    def share_from_main(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (what the others pass is ignored).

        Tensors inside dicts, lists and tuples travel as tensors (their bytes, one broadcast each,
        arriving on the CPU), the rest of the structure pickled, so that a whole checkpoint is sent
        without pickling its weights.
        """
        if self.world_size == 1:
            return obj
        tensors: list[Tensor] = []
        skeleton = [_strip_tensors(obj, tensors) if self.rank == 0 else None]
        dist.broadcast_object_list(skeleton, src=0, group=self.host_group)
        received: list[Tensor] = []
        for spec in _tensor_specs(skeleton[0]):
            if self.rank == 0:
                data = tensors[spec.index].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            else:
                data = torch.empty(_nbytes(spec), dtype=torch.uint8)
            if data.numel():
                dist.broadcast(data, src=0, group=self.host_group)
            received.append(data.view(spec.dtype).reshape(spec.shape))
        return obj if self.rank == 0 else _put_tensors(skeleton[0], received)

    def from_main(self, compute: Callable[[], T]) -> T:
        """`compute()` run on rank 0 alone, its result given to every rank (see `share_from_main`).

        An exception it raises is raised on every rank, so that no rank waits in a later
        collective for a rank that has stopped.
        """
        if self.world_size == 1:
            return compute()
        outcome: tuple[Any, Exception | None] = (None, None)
        error: Exception | None = None
        if self.rank == 0:
            try:
                outcome = (compute(), None)
            except Exception as e:
                error = e
                outcome = (None, e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}"))
        result, shared_error = self.share_from_main(outcome)
        if shared_error is not None:
            raise error or shared_error
        return result

    def close(self) -> None:
        """Leave the process group (a no-op for a single process), once every rank has come here:
        a rank that tore the group down while rank 0 still wrote final.pt could abort at exit."""
        if self.world_size > 1:
            dist.barrier(group=self.host_group)
            dist.destroy_process_group()


def _strip_tensors(obj: Any, tensors: list[Tensor]) -> Any:
    """`obj` with each tensor replaced by a `_SentTensor` and appended to `tensors`."""
    if isinstance(obj, Tensor):
        tensors.append(obj)
        return _SentTensor(len(tensors) - 1, tuple(obj.shape), obj.dtype)
    if isinstance(obj, dict):
        stripped = type(obj)((key, _strip_tensors(value, tensors)) for key, value in obj.items())
        if hasattr(obj, "_metadata"):  # a state_dict's version information
            stripped._metadata = obj._metadata
        return stripped
    if type(obj) in (list, tuple):
        return type(obj)(_strip_tensors(value, tensors) for value in obj)
    return obj


def _tensor_specs(skeleton: Any) -> list[_SentTensor]:
    """The `_SentTensor`s of a stripped object, in the order their tensors were taken out."""
    found: list[_SentTensor] = []

    def visit(obj: Any) -> None:
        if isinstance(obj, _SentTensor):
            found.append(obj)
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif type(obj) in (list, tuple):
            for value in obj:
                visit(value)

    visit(skeleton)
    return sorted(found, key=lambda spec: spec.index)


def _put_tensors(skeleton: Any, tensors: list[Tensor]) -> Any:
    """The inverse of `_strip_tensors`: each `_SentTensor` replaced by its tensor."""
    if isinstance(skeleton, _SentTensor):
        return tensors[skeleton.index]
    if isinstance(skeleton, dict):
        filled = type(skeleton)((key, _put_tensors(value, tensors)) for key, value in skeleton.items())
        if hasattr(skeleton, "_metadata"):
            filled._metadata = skeleton._metadata
        return filled
    if type(skeleton) in (list, tuple):
        return type(skeleton)(_put_tensors(value, tensors) for value in skeleton)
    return skeleton


def _nbytes(spec: _SentTensor) -> int:
    return math.prod(spec.shape) * torch.empty((), dtype=spec.dtype).element_size()


def _picklable(error: Exception) -> bool:
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return False
    return True


def launch_rank() -> tuple[int, int]:
    """This process's global rank and the number of ranks, as `torchrun` sets them (0 and 1 without it)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def run_device(tc: TrainConfig) -> torch.device:
    """The device of this process: `train.device` for the rank `torchrun` gave it (LOCAL_RANK,
    WORLD_SIZE, LOCAL_WORLD_SIZE; see `runtime.resolve_device`).

    Raises:
        ConfigError: a device this machine does not have, or one GPU named for several ranks.
    """
    local_world_size = os.environ.get("LOCAL_WORLD_SIZE")
    try:
        return resolve_device(tc.device, int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                              None if local_world_size is None else int(local_world_size))
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


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` wrapped by DistributedDataParallel on `device`, without buffer broadcasts.

    No buffer is broadcast at each forward: the only buffer, the sinusoidal table, is a function
    of its size, and a broadcast would cost time and fail once one rank had grown its table.
    PyTorch 2.13 names that `forward_sync_buffers` and deprecates `broadcast_buffers`, which
    warns on every rank; older versions know only `broadcast_buffers`.
    """
    ddp = nn.parallel.DistributedDataParallel
    no_broadcast = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                    else {"broadcast_buffers": False})
    return ddp(module, device_ids=[device.index] if device.type == "cuda" else None, **no_broadcast)


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
