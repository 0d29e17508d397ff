"""Devices and process-wide settings: device and precision choice, CPU allocator and kernel caches, TF32."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it to the OS at every free.

    By default glibc serves every allocation above 128 KiB-32 MiB with a fresh `mmap` and unmaps
    it on free, so each activation tensor of each training step is page-faulted in anew, and that
    first-touch cost dominates a CPU training step (docs/benchmarks.md). The heap then stays at
    its peak size, which is what a training loop needs anyway.

    Returns:
        True if the allocator was reconfigured (glibc found), False otherwise (no change).
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl, macOS): nothing to tune
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    log.debug("glibc malloc keeps freed memory: %s", ok)
    return ok


# Distinct matmul shapes in one training step of a translation model, forward and backward, fit in
# this many entries with room to spare; see `bound_onednn_caches` and docs/benchmarks.md.
ONEDNN_CACHE_CAPACITY = 64


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> None:
    """Cap oneDNN's primitive cache and ideep's operator cache, unless the user has set them.

    PyTorch runs bfloat16 matmuls on the CPU through oneDNN, which compiles and keeps a kernel per
    distinct shape, up to 1,024 of each cache by default. Token-bucketed batches give every batch
    new shapes, so at their default size those caches keep growing without reuse and a bf16 run's
    memory climbs step after step; capped, it stays flat and the steps are no slower
    (docs/benchmarks.md). With more distinct shapes than entries in a cycle, an LRU cache misses
    anyway; a small one still serves the shapes one step repeats.

    Both libraries read these variables when they first build a kernel, so this must run before the
    process's first bf16 matmul on the CPU (the commands call it first thing).
    """
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(capacity))


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1, local_world_size: int | None = None) -> torch.device:
    """Turn a device name into a usable device.

    "auto" picks CUDA when available, else the CPU; "auto" and "cuda" take GPU `local_rank`, the
    rank's GPU under torchrun. A process that sees exactly one GPU takes that one whatever its
    `local_rank`: launchers that give each task its own GPU (SLURM's `srun --gpus-per-task=1`) show
    every process only `cuda:0`. An explicit "cuda:N" names one GPU, so it is refused for a run of
    several ranks, which would all land on it.

    Args:
        local_world_size: the ranks on this machine, where the launcher says (torchrun's
            LOCAL_WORLD_SIZE); more of them than visible GPUs is refused rather than sharing a GPU.

    Raises:
        ValueError: for a malformed name, a CUDA device on a machine without one, a GPU index past
            the machine's GPUs, fewer GPUs than ranks on the machine, or "cuda:N" with `world_size` > 1.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    explicit = name.startswith("cuda:")
    if name == "cuda" and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_world_size is not None and local_world_size > count:
            raise ValueError(f"{local_world_size} ranks on this machine (LOCAL_WORLD_SIZE) but {count} GPU(s) visible: "
                             "start one rank per GPU")
        name = f"cuda:{local_rank if count > 1 else 0}"
    elif name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if explicit and world_size > 1:
        raise ValueError(f"{name!r} would put all {world_size} ranks on one GPU; use 'cuda' or 'auto', "
                         "which give each rank the GPU of its LOCAL_RANK")
    count = torch.cuda.device_count()
    if device.index >= count:
        who = f"{name!r}" if explicit else f"LOCAL_RANK {local_rank} (device {name!r})"
        raise ValueError(f"{who} asks for GPU {device.index}, but this machine has {count} (cuda:0 .. cuda:{count - 1})")
    return device


def tune_process_for(device: torch.device) -> bool:
    """Apply the CPU-only process settings (`keep_freed_memory`, `bound_onednn_caches`) for a CPU run.

    A GPU run keeps the allocator's and oneDNN's defaults: its activations live in the CUDA
    caching allocator, and a heap kept at its peak would only hold host memory for nothing.

    Returns:
        True if the settings were applied (`device` is the CPU).
    """
    if device.type != "cpu":
        return False
    keep_freed_memory()
    bound_onednn_caches()
    return True


def use_tf32(device: torch.device, enabled: bool) -> bool:
    """Let float32 matrix products and convolutions on a CUDA device use TensorFloat-32 tensor cores.

    TF32 keeps float32's range with a 10-bit mantissa in the products (sums stay float32); on
    Ampere and newer GPUs it runs fp32 training several times faster, and it is what the CUDA
    libraries' own recipes train with. Process-wide, so it is set only for CUDA runs: the CPU's
    float32 products stay full precision.

    Returns:
        Whether TF32 is now on for CUDA (False for a non-CUDA device, where nothing is changed).
    """
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return enabled


# The dtype each resolved precision computes in (fp16 is only used through autocast, on CUDA).
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware, so that bf16 is a speed-up there.

    True for a CUDA GPU of compute capability 8.0 or higher (Ampere and newer: bf16 tensor cores
    and fused attention kernels) and for a CPU with AVX512-BF16 or AMX. Older GPUs (T4, V100) run
    bf16 emulated, and `torch.cuda.is_bf16_supported()` counts that emulation as support, so the
    capability of the GPU asked for is checked instead. On other CPUs PyTorch emulates bf16 matrix
    products, many times slower than float32.
    """
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)
