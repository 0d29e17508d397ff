"""Peak resident memory of training and decoding, each job in a fresh process (section memory)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from transformer.config import Config
from transformer.precision import ProbeShape, choose_precision

from bench_common import load_setup, progress, table
from bench_decode import decode_batches, decoders
from bench_train import adam, build_trainers, train_step

MEMORY_JOBS = ("train-ours", "train-peer", "decode-ours", "decode-hf")



def rss_mib(field: str = "VmRSS") -> float:
    """This process's current ("VmRSS") or peak ("VmHWM") resident set size, MiB.

    The peak is read from /proc rather than `getrusage(RUSAGE_SELF).ru_maxrss` because Linux carries
    ru_maxrss across fork + exec: a child would report at least its parent's size at the fork.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (VmHWM) from the current RSS; False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def memory_job(job: str, cfg: Config, args: argparse.Namespace) -> dict:
    """Run one job in this (fresh) process and report its RSS in MiB.

    The peak is counted from the moment the data and the model are loaded (`baseline_mib`), so that
    it measures the job and not the loading of the training corpus before it.
    """
    setup = load_setup(cfg, args.memory_steps, args.decode_sentences)
    if job.startswith("train"):
        trainer = build_trainers(cfg, setup.vocab_size, args.seed)["ours" if job == "train-ours" else "nn.Transformer"]
        optimizer = adam(trainer)
        shape = ProbeShape.of(cfg.model.d_model, cfg.model.d_ff, setup.vocab_size, cfg.train.max_tokens, training=True)
        precision = choose_precision(cfg.train.precision, torch.device("cpu"), shape).precision  # as the config trains here
        peak_reset, baseline = reset_peak_rss(), rss_mib()
        for batch in setup.train_batches:
            train_step(trainer, optimizer, batch, precision)
        work = f"training steps: {len(setup.train_batches)}, batches of <= {cfg.train.max_tokens} tokens, {precision}"
    else:
        variant = "ours (cache)" if job == "decode-ours" else "HF Marian"
        run = decoders(cfg, setup, args.beam_size, [variant])[variant]
        batches = decode_batches(setup.test_sources, cfg.decode.batch_tokens)
        peak_reset, baseline = reset_peak_rss(), rss_mib()
        for src in batches:
            run(src)
        work = f"beam {args.beam_size} over {len(setup.test_sources)} sentences"
    return {"job": job, "baseline_mib": baseline, "peak_mib": rss_mib("VmHWM"), "peak_from_baseline": peak_reset,
            "work": work}


def measure_memory(args: argparse.Namespace) -> dict[str, dict]:
    """Run every memory job in a fresh subprocess of this script, one after the other."""
    script = str(Path(__file__).resolve().with_name("benchmark.py"))
    results = {}
    for job in MEMORY_JOBS:
        progress(f"memory: {job} in a subprocess")
        command = [sys.executable, script, "--config", args.config, "--threads", str(args.threads),
                   "--max-tokens", str(args.max_tokens), "--memory-steps", str(args.memory_steps),
                   "--decode-sentences", str(args.decode_sentences), "--beam-size", str(args.beam_size),
                   "--seed", str(args.seed), "--memory-job", job]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory job {job} failed:\n{done.stderr[-2000:]}")
        results[job] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def report_memory(results: dict) -> list[str]:
    """Markdown lines of the memory section."""
    out: list[str] = []
    rows = [[job, r["work"], f"{r['peak_mib']:,.0f}", f"{r['peak_mib'] - r['baseline_mib']:,.0f}"]
            for job, r in results["memory"].items()]
    caption = ("Peak resident memory, each job in a fresh process (MiB; baseline = RSS after loading data and "
               "model; peak = highest RSS from then on):")
    out += ["", caption, "", table(["job", "work", "peak RSS", "peak - baseline"], rows)]
    return out
