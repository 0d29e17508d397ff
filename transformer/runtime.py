"""Process-wide settings that make CPU training and decoding fast."""

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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """Turn a device name into a usable device.

    "auto" picks CUDA when available (GPU `local_rank`, the rank's GPU under torchrun), else the
    CPU; "cuda" means GPU `local_rank`.

    Raises:
        ValueError: for a malformed name or a CUDA device on a machine without one.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


# The dtype each resolved precision computes in (fp16 is only used through autocast, on CUDA).
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bfloat16 matrices in hardware, so that bf16 is a speed-up there.

    True for a CUDA GPU that supports bf16 and for a CPU with AVX512-BF16 or AMX; on other CPUs
    PyTorch emulates bf16 matrix products, many times slower than float32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn a precision setting into the one to use: "auto" is "bf16" where `has_native_bf16`, else "fp32".

    "fp32", "bf16" and "fp16" are returned as given; bf16 on a device without native bf16 is
    allowed (it is correct, only slow) but logged as a warning.
    """
    if precision == "auto":
        return "bf16" if has_native_bf16(device) else "fp32"
    if precision == "bf16" and not has_native_bf16(device):
        log.warning("bf16 requested on %s, which has no native bf16 matrix instructions: expect it to be much slower "
                    "than fp32", device)
    return precision
