"""The precision a run computes in: `auto` measures float32 against bfloat16 on the run's own shapes.

A CPU's flags do not say whether bfloat16 is faster there. With AVX512-BF16, AMD Zen 4 and Zen 5
multiply bf16 matrices several times faster than float32, while an Intel CPU without AMX runs the
same instruction no faster than its float32 FMAs and pays for the conversions on top, so bf16
trains at about 0.6x float32 there. `choose_precision` therefore times both on the CPU, on the
layer shapes, device and thread count of the run (a probe of well under a second), and picks
bfloat16 only where it is clearly faster. The answer is cached per CPU, torch version, thread
count and shape (`cache_path`) when it is clear-cut. GPUs keep the compute-capability rule of `has_native_bf16`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from transformer.atomic import atomic_write_bytes
from transformer.runtime import has_native_bf16

log = logging.getLogger(__name__)

# bf16 is chosen only when the probe measures it at least this much faster than float32: below
# that, the smaller shapes of a real step (attention, short batches) and the casts around the
# matrix products eat the gain, and a borderline answer would flip with the probe's noise.
BF16_MIN_SPEEDUP = 1.15
# The probe's products keep the run's inner dimensions but at most this many rows and vocabulary
# columns, so that it costs a fraction of a second even where bf16 is emulated.
PROBE_MAX_ROWS = 512
PROBE_MAX_VOCAB = 4096
PROBE_REPEATS = 2
GLANCE_ROWS = 32
GLANCE_CLEARLY_SLOWER = 0.5  # bf16 under half float32's speed on the glance is not measured further
CACHE_ENV = "TRANSFORMER_PRECISION_CACHE"  # a file path, or "off" to measure every time
# Only a clear answer is kept: one within this factor of BF16_MIN_SPEEDUP could have come out the
# other way under a burst of load, so it is measured again at the next start.
CACHE_MARGIN = 1.3


# Variables that change which kernels PyTorch and oneDNN dispatch to (e.g. to emulate an older
# CPU), and so the answer.
DISPATCH_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_DEFAULT_FPMATH_MODE")


@dataclass(frozen=True)
class ProbeShape:
    """The products a probe times: one encoder layer's projections and feed-forward network and
    the output projection, on `rows` token rows; forward and backward under autocast when
    `training`, else inference with the weights cast (as decoding runs)."""

    d_model: int
    d_ff: int
    vocab_size: int
    rows: int
    training: bool

    @classmethod
    def of(cls, d_model: int, d_ff: int, vocab_size: int, rows: int, training: bool) -> "ProbeShape":
        """The probe's shape for a model of these sizes, capped at `PROBE_MAX_ROWS` and `PROBE_MAX_VOCAB`."""
        return cls(d_model, d_ff, min(vocab_size, PROBE_MAX_VOCAB), max(1, min(rows, PROBE_MAX_ROWS)), training)


@dataclass(frozen=True)
class Choice:
    """What `choose_precision` decided and why."""

    precision: str  # "fp32" | "bf16" | "fp16" | "int8", the one to compute in
    speedup: float | None = None  # float32 time / bfloat16 time on the probe; None when nothing was measured
    seconds: float = 0.0  # what the probe cost (0 when the answer came from the cache)
    cached: bool = False

    def describe(self) -> str:
        """One line for the log, e.g. "bf16 (bf16 at 3.66x float32's speed, measured in 0.40 s, 2 threads;
        bf16 needs 1.15x)"."""
        if self.speedup is None:
            return self.precision
        source = "cached measurement" if self.cached else f"measured in {self.seconds:.2f} s"
        return (f"{self.precision} (bf16 at {self.speedup:.2f}x float32's speed, {source}, "
                f"{torch.get_num_threads()} threads; bf16 needs {BF16_MIN_SPEEDUP:.2f}x)")


Measure = Callable[[ProbeShape, str, int], float]  # (shape, "fp32" | "bf16", repeats) -> seconds for one pass


def _probe_layers(shape: ProbeShape) -> nn.Module:
    d, f = shape.d_model, shape.d_ff
    return nn.Sequential(nn.Linear(d, 3 * d), nn.Linear(3 * d, d), nn.Linear(d, f), nn.ReLU(), nn.Linear(f, d),
                         nn.Linear(d, shape.vocab_size))


def measure_probe(shape: ProbeShape, precision: str, repeats: int = PROBE_REPEATS) -> float:
    """The fastest of `repeats` seconds of one pass of the probe's products on the CPU in `precision`, after one
    warm-up pass (which builds oneDNN's kernels for the shapes)."""
    generator = torch.Generator().manual_seed(0)
    layers = _probe_layers(shape)
    x = torch.randn(shape.rows, shape.d_model, generator=generator)
    if shape.training:
        dtype = torch.bfloat16 if precision == "bf16" else None

        def one_pass() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                out = layers(x)
            out.float().sum().backward()
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        layers, x = layers.to(dtype), x.to(dtype)

        def one_pass() -> None:
            with torch.inference_mode():
                layers(x)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def cpu_identity() -> str:
    """The CPU this process runs on, precisely enough that two kinds never share a cached answer:
    vendor, family, model, stepping, model name and the flags that decide bf16 speed."""
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = sorted(set(fields.get("flags", "").split()) & {"avx2", "avx512f", "avx512_bf16", "avx512_fp16",
                                                            "amx_bf16", "amx_tile"})
    parts = [fields.get(k, "?") for k in ("vendor_id", "cpu family", "model", "stepping", "model name")]
    return " / ".join(parts + [",".join(flags)])


def cache_path() -> Path | None:
    """Where measured answers are kept: $TRANSFORMER_PRECISION_CACHE if set ("off" keeps none), else
    $XDG_CACHE_HOME/transformer/precision.json (~/.cache when XDG_CACHE_HOME is unset)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "none") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transformer" / "precision.json"


def cache_key(shape: ProbeShape) -> str:
    """The key of an answer: CPU, torch version, thread count, the probe's shape and the kernel
    dispatch settings of the environment."""
    identity = {"cpu": cpu_identity(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "shape": asdict(shape), "dispatch": {name: os.environ.get(name) for name in DISPATCH_ENV}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, unreadable or damaged: measure again
        return {}
    return entries if isinstance(entries, dict) else {}


def _cached_speedup(path: Path | None, key: str) -> float | None:
    if path is None:
        return None
    value = _read_cache(path).get(key)
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _store(path: Path | None, key: str, speedup: float) -> None:
    if path is None:
        return
    entries = _read_cache(path)
    entries[key] = speedup
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(entries, indent=1, sort_keys=True).encode())
    except OSError as e:  # a read-only home: the answer is still used, only not kept
        log.debug("could not cache the precision probe in %s: %s", path, e)


def bf16_speedup(shape: ProbeShape, measure: Measure | None = None) -> tuple[float, float, bool]:
    """float32 time / bfloat16 time of the probe on this CPU, from the cache or measured.

    Returns:
        (speedup, seconds the probe took, whether the answer came from the cache).
    """
    measure = measure or measure_probe
    path, key = cache_path(), cache_key(shape)
    cached = _cached_speedup(path, key)
    if cached is not None:
        return cached, 0.0, True
    start = time.perf_counter()
    # A first look on a few rows: where bf16 is emulated it runs many times slower, and the full
    # probe would then take seconds to confirm what this shows in milliseconds.
    glance = replace(shape, rows=min(shape.rows, GLANCE_ROWS))
    speedup = measure(glance, "fp32", 1) / max(measure(glance, "bf16", 1), 1e-12)
    if speedup >= GLANCE_CLEARLY_SLOWER:
        # Interleaved, so that a burst of background load hits both sides alike; the fastest pass
        # of each is the one least disturbed.
        fp32, bf16 = [], []
        for _ in range(2):
            fp32.append(measure(shape, "fp32", PROBE_REPEATS))
            bf16.append(measure(shape, "bf16", PROBE_REPEATS))
        speedup = min(fp32) / max(min(bf16), 1e-12)
    seconds = time.perf_counter() - start
    if not BF16_MIN_SPEEDUP / CACHE_MARGIN < speedup < BF16_MIN_SPEEDUP * CACHE_MARGIN:
        _store(path, key, speedup)
    return speedup, seconds, False


def choose_precision(precision: str, device: torch.device, shape: ProbeShape, measure: Measure | None = None) -> Choice:
    """Resolve a precision setting for `device`; on the CPU, "auto" (and "bf16", to warn) measure.

    "auto" becomes "bf16" where bf16 is clearly faster (the probe on a CPU, the compute capability
    on a GPU), else "fp32". Other settings are kept; "bf16" on a device where it measures slower
    than float32 (or a GPU without bf16 tensor cores) is allowed, with a warning giving the figure.
    """
    if precision not in ("auto", "bf16"):
        return Choice(precision)
    if device.type != "cpu":
        native = has_native_bf16(device)
        if precision == "bf16" and not native:
            log.warning("bf16 requested on %s, which has no native bf16 matrix instructions: expect it to be much "
                        "slower than fp32", device)
        return Choice("bf16" if precision == "bf16" or native else "fp32")
    speedup, seconds, cached = bf16_speedup(shape, measure)
    fast = speedup >= BF16_MIN_SPEEDUP
    choice = Choice(precision if precision == "bf16" else ("bf16" if fast else "fp32"), speedup, seconds, cached)
    if precision == "bf16" and speedup < 1.0:
        log.warning("bf16 requested, but on this CPU it measured %.2fx float32's speed on the run's shapes "
                    "(%d threads): float32 would be faster", speedup, torch.get_num_threads())
    return choice
