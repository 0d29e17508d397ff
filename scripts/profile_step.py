"""Where the time of one training step goes: matrix products against everything else.

    python scripts/profile_step.py                       # float32, our model, 20 steps
    python scripts/profile_step.py --model peer --precision bf16

Runs `--steps` training steps (forward, backward, fused Adam) on the benchmark's Multi30k batches,
after `--warmup` untimed ones (by default a whole pass over the same batches, so that the heap has
grown to the largest batch, as it has a few steps into a training run), and prints the time of
each ATen op summed over the steps: the matrix products (mm, addmm, bmm, baddbmm, and the fused
attention kernel) as one group, and the largest of the rest one by one. The matmuls are also
grouped by shape, with the FLOP/s each shape reaches against a 2048² matmul timed in the same
process.

Each op is timed from a `TorchDispatchMode`, which sees every ATen op of the forward, the backward
and the optimizer once, after autograd and composite ops have been broken down, so nothing is
counted twice. `torch.profiler` is not used: its event records are allocated among the step's
tensors and fragment the heap, so that under it the loss's large (N, V) tensors are page-faulted
in afresh at every step (the vocabulary softmax then took 10-30x its time outside the profiler).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from transformer.config import load_config
from transformer.runtime import bound_onednn_caches, keep_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import load_setup, machine, spread  # noqa: E402
from bench_train import adam, build_trainers, train_step  # noqa: E402

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def matmul_flops(name: str, shapes: list) -> int:
    """FLOPs of one mm/addmm/bmm/baddbmm call from its recorded input shapes (0 if not a plain product)."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2 * m * k * n
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2 * m * k * n
        if name in ("aten::bmm", "aten::baddbmm"):
            a, b = (shapes[0], shapes[1]) if name == "aten::bmm" else (shapes[1], shapes[2])
            return 2 * a[0] * a[1] * a[2] * b[2]
    except (IndexError, TypeError, ValueError):
        return 0
    return 0


class OpTimer(TorchDispatchMode):
    """Sums the wall time of every ATen op called under it, by op name, and the matmuls' by shape."""

    def __init__(self, model_dims: set[int]) -> None:
        super().__init__()
        self.model_dims = model_dims
        self.seconds: dict[str, float] = defaultdict(float)
        self.by_shape: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])  # seconds, FLOPs, calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        name = func._schema.name
        self.seconds[name] += elapsed
        if name in MATMULS:
            shapes = [list(a.shape) for a in args if isinstance(a, torch.Tensor)]
            entry = self.by_shape[(name, shape_class(shapes, self.model_dims))]
            entry[0] += elapsed
            entry[1] += matmul_flops(name, shapes)
            entry[2] += 1
        return out


def shape_class(shapes: list, model_dims: set[int]) -> str:
    """Input shapes with every size that is not one of the model's own written as N (token counts
    change from batch to batch), e.g. "[N, 256] x [256, 1024]"."""
    return " x ".join("[" + ", ".join(str(d) if d in model_dims else "N" for d in shape) + "]"
                      for shape in shapes if shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/multi30k_de_en.yaml")
    parser.add_argument("--model", choices=("ours", "peer"), default="ours", help="peer: torch.nn.Transformer")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: one pass, --steps)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=15, help="ops outside the matmuls listed one by one")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.warmup = args.steps if args.warmup is None else args.warmup
    keep_freed_memory()
    bound_onednn_caches()
    cfg = load_config(args.config)
    setup = load_setup(cfg, args.steps, 1)
    trainer = build_trainers(cfg, setup.vocab_size, 0)["ours" if args.model == "ours" else "nn.Transformer"]
    optimizer = adam(trainer)
    for batch in spread(setup.train_batches, args.warmup):
        train_step(trainer, optimizer, batch, args.precision)
    dtype = torch.float32 if args.precision == "fp32" else torch.bfloat16
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    torch.matmul(a, b)
    model_dims = {cfg.model.d_model, cfg.model.d_ff, 3 * cfg.model.d_model, setup.vocab_size,
                  cfg.model.d_model // cfg.model.n_heads}
    timer = OpTimer(model_dims)
    start = time.perf_counter()
    with timer:
        for batch in setup.train_batches:
            train_step(trainer, optimizer, batch, args.precision)
    wall = time.perf_counter() - start
    peak_times = []
    for _ in range(5):
        t = time.perf_counter()
        torch.matmul(a, b)
        peak_times.append(time.perf_counter() - t)
    peak = 2 * 2048**3 / sorted(peak_times)[2]

    self_us = {name: seconds * 1e6 for name, seconds in timer.seconds.items()}
    by_shape = {key: [seconds * 1e6, flops, calls] for key, (seconds, flops, calls) in timer.by_shape.items()}
    total = sum(self_us.values())
    matmul = sum(v for k, v in self_us.items() if k in MATMULS)
    m = machine(cfg)
    print(f"Machine: {m['cpu']}, {m['cores']} cores, {m['capability']}; torch {m['torch']}; {args.threads} threads")
    print(f"{args.model}, {args.precision}, {len(setup.train_batches)} steps of <= {cfg.train.max_tokens} tokens: "
          f"{wall:.2f} s wall with the timer, {total / 1e6:.2f} s in ATen ops")
    print(f"2048² {args.precision} matmul: {peak / 1e9:.1f} GFLOP/s\n")
    print("| ops | time (s) | share |")
    print("|---|---|---|")
    print(f"| matrix products | {matmul / 1e6:.3f} | {matmul / total:.1%} |")
    print(f"| everything else | {(total - matmul) / 1e6:.3f} | {(total - matmul) / total:.1%} |")
    rest = sorted(((v, k) for k, v in self_us.items() if k not in MATMULS), reverse=True)
    for v, k in rest[:args.top]:
        print(f"| {k} | {v / 1e6:.3f} | {v / total:.1%} |")
    print("\n| matmul | shapes | calls | time (s) | share of step | GFLOP/s | of 2048² peak |")
    print("|---|---|---|---|---|---|---|")
    for (name, shapes), (us, flops, calls) in sorted(by_shape.items(), key=lambda kv: -kv[1][0])[:args.top]:
        rate = flops / (us / 1e6) if us and flops else 0.0
        print(f"| {name} | {shapes} | {calls} | {us / 1e6:.3f} | {us / total:.1%} | {rate / 1e9:.0f} | {rate / peak:.0%} |")


if __name__ == "__main__":
    main()
