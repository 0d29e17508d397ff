"""Benchmark this Transformer against the implementations people would otherwise use.

    python scripts/benchmark.py                        # everything (long: run it on a quiet machine)
    python scripts/benchmark.py --quick                # smoke run, well under a minute
    python scripts/benchmark.py --only train --batches 10 --json runs/benchmark.json
    python scripts/benchmark.py --only deploy --checkpoint runs/multi30k_de_en/checkpoints/final.pt

Five sections, each selectable with --only, each in its own file beside this one:

* train (bench_train.py): training-step throughput (forward + backward + fused Adam step, source +
          target non-pad tokens per second) of `TranslationLoss` on our `Transformer` against the
          same model written with `torch.nn.Transformer`, on real token-bucketed Multi30k batches,
          in float32 and under bfloat16 autocast.
* flops (bench_train.py): achieved matmul FLOP/s of our training step (FLOPs counted
          analytically, cross-checked with `FlopCounterMode`) as a fraction of a large matmul's.
* decode (bench_decode.py): beam-4 decoding of test_2016_flickr with random weights, every
          sentence forced to its batch's padded source length: ours with and without the key/value
          cache against Hugging Face's `MarianMTModel.generate`, and ours in float32, bfloat16 and
          int8 against CTranslate2 (our model converted by `transformer-export`) in float32 and int8.
* memory (bench_memory.py): peak RSS of training and decoding, each in a fresh subprocess.
* deploy (bench_deploy.py, needs --checkpoint): real decoding with a trained checkpoint: ours in
          float32 / bfloat16 / int8, its Hugging Face export and its CTranslate2 export in float32 /
          int8; greedy outputs compared, each engine's length penalty chosen on validation, test
          BLEU and sentences/s with the ratio of every pair.

Both sides of every comparison run in this one process, with the same model dimensions, the same
batches, the same thread count and the same allocator settings (`keep_freed_memory`, and
MALLOC_ARENA_MAX=1, with which this script re-executes itself when it is not set: CTranslate2
decodes on its own threads, whose glibc arenas would otherwise hand memory back to the system and
page-fault it in again), interleaved (A, B, A, B, ...) so that background load hits both alike;
the tables report medians and ratios. Random weights, except in deploy: speed does not depend on
what a model learned, but BLEU does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from transformer.config import load_config
from transformer.runtime import bound_onednn_caches, keep_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the section modules beside this file

from bench_common import load_setup, machine, progress  # noqa: E402
from bench_decode import report_decode, run_decode  # noqa: E402
from bench_deploy import report_deploy, run_deploy  # noqa: E402
from bench_memory import MEMORY_JOBS, measure_memory, memory_job, report_memory  # noqa: E402
from bench_train import report_flops, report_train, run_flops, run_train  # noqa: E402

SECTIONS = ("train", "flops", "decode", "memory", "deploy")


def report(results: dict) -> str:
    """The markdown tables of whatever sections ran."""
    m = results["machine"]
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['capability']}, "
           + f"bf16 probe {m['bf16_speedup']:.2f}x float32 (auto trains in {m['bf16_choice']})" + f"; torch {m['torch']}"
           + (f", transformers {m['transformers']}" if "transformers" in m else "") + f"; torch threads: {m['threads']}."]
    for section, lines in (("train", report_train), ("flops", report_flops), ("decode", report_decode),
                           ("memory", report_memory), ("deploy", report_deploy)):
        if section in results:
            out += lines(results)
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="configs/multi30k_de_en.yaml", help="model dimensions, data, batch size")
    parser.add_argument("--only", choices=SECTIONS, action="append", help="run only this section (repeatable)")
    parser.add_argument("--json", default="runs/benchmark.json", help="where to write all results")
    parser.add_argument("--threads", type=int, help="torch intra-op threads; None: 2, or 1 with --quick")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=0, help="training batch budget (0: the config's)")
    parser.add_argument("--batches", type=int, default=20, help="training batches, spread over the length range")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the batches")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per model")
    parser.add_argument("--bf16-batches", type=int, default=2,
                        help="batches for the bfloat16 runs on a CPU without native bf16 (where it is slow)")
    parser.add_argument("--bf16-max-tokens", type=int, default=600,
                        help="on a CPU without native bf16, bfloat16 batches are cut to this many tokens per side")
    parser.add_argument("--bf16-repeats", type=int, default=2, help="bfloat16 repeats on a CPU without native bf16")
    parser.add_argument("--peak-size", type=int, default=2048, help="n of the n x n matmul measuring the peak")
    parser.add_argument("--decode-sentences", type=int, default=1000, help="test sentences to decode")
    parser.add_argument("--decode-repeats", type=int, default=2)
    parser.add_argument("--beam-size", type=int, default=4)
    parser.add_argument("--skip-uncached", action="store_true", help="leave out ours without the cache (slowest)")
    parser.add_argument("--uncached-sentences", type=int, default=200,
                        help="test sentences for the cache vs no-cache comparison")
    parser.add_argument("--decode-peers", choices=("all", "marian", "ctranslate2"), default="all",
                        help="decode: which peers to compare with")
    parser.add_argument("--memory-steps", type=int, default=10, help="training steps per memory job")
    parser.add_argument("--checkpoint", help="deploy: trained checkpoint to decode with (the section runs only with it)")
    parser.add_argument("--deploy-sentences", type=int, default=1014, help="deploy: validation / test sentences")
    parser.add_argument("--deploy-repeats", type=int, default=2, help="deploy: timed test passes per decoder")
    parser.add_argument("--alphas-ours", type=float, nargs="+", default=[1.0, 1.5, 2.0],
                        help="deploy: GNMT length penalties tried on validation for ours")
    parser.add_argument("--alphas-length", type=float, nargs="+", default=[0.6, 1.0, 1.5],
                        help="deploy: |Y|^alpha length penalties tried on validation for Hugging Face and CTranslate2")
    parser.add_argument("--profile", type=int, default=0,
                        help="deploy: profile ours in float32 on this many test sentences (0: no profile)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 minute)")
    parser.add_argument("--memory-job", choices=MEMORY_JOBS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is None:
        # A smoke run must be quick on a busy shared machine too, where two spinning OpenMP threads
        # competing with other work are many times slower than one.
        args.threads = 1 if args.quick else 2
    if args.quick:
        args.max_tokens, args.batches, args.repeats, args.warmup = 200, 2, 1, 1
        args.bf16_batches, args.bf16_max_tokens, args.bf16_repeats = 1, 24, 1
        args.peak_size = 1024
        args.decode_sentences, args.decode_repeats = 6, 1
        args.memory_steps = 1
        args.deploy_sentences, args.deploy_repeats = 6, 1
        args.alphas_ours, args.alphas_length = args.alphas_ours[:1], args.alphas_length[:1]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if argv is None and os.environ.get("MALLOC_ARENA_MAX") != "1":
        # Set before the process starts, glibc's arena count applies to every thread; see the docstring.
        os.environ["MALLOC_ARENA_MAX"] = "1"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # one process, so both sides of every comparison get the same allocator
    bound_onednn_caches()  # and the same oneDNN kernel caches
    cfg = load_config(args.config, [f"train.max_tokens={args.max_tokens}"] if args.max_tokens else [])
    if args.memory_job is not None:
        print(json.dumps(memory_job(args.memory_job, cfg, args)))
        return
    sections = args.only or [s for s in SECTIONS if s != "deploy" or args.checkpoint]
    if "deploy" in sections and not args.checkpoint:
        sys.exit("error: --only deploy needs --checkpoint")
    results: dict = {"machine": machine(cfg), "args": vars(args)}
    if {"train", "flops", "decode"} & set(sections):
        progress("loading data and tokenizer")
        setup = load_setup(cfg, args.batches, args.decode_sentences)
        if "train" in sections:
            results["train"] = run_train(cfg, setup, args)
        if "flops" in sections:
            results["flops"] = run_flops(cfg, setup, args, results.get("train"))
        if "decode" in sections:
            results["decode"] = run_decode(cfg, setup, args)
    if "memory" in sections:
        results["memory"] = measure_memory(args)
    if "deploy" in sections:
        results["deploy"] = run_deploy(args)
    print(report(results))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
