"""Check this package on a GPU machine in a few minutes: `python scripts/check_gpu.py --data DIR`.

Run from the repository root, on a machine with a CUDA build of PyTorch (2.11 to 2.13) already
installed. Nothing is downloaded and the installed torch is left as it is: the package runs from
this source tree (PYTHONPATH); `pip install --no-deps --no-build-isolation -e .` installs it the
same way (docs/gpu.md). `--data DIR` holds the Multi30k files (train, val and test_2016_flickr,
.de and .en, gzipped or plain); `datasets`, `sacremoses` and `ctranslate2` are not needed.

Stages, in this order; `--stage NAME[,NAME]` runs some alone. Each runs in its own process under
its own timeout (`--timeout`, 120 s), so that a hang is cut short and named:

    env      Python, torch and its CUDA build, the GPUs, and the modules the package needs
    devices  pytest tests/test_devices.py: the model, search and training tests on CUDA as well as on
             the CPU, a CUDA step's synchronisations, a two-process NCCL step where two GPUs are visible
    train    300 Multi30k steps in bf16 and in fp16: tokens/s, ms per step, peak GPU memory,
             synchronisations per step (torch.cuda.set_sync_debug_mode, steps 21-40)
    decode   beam search on the GPU with the bf16 run's checkpoint, in fp32 (TF32) and in bf16:
             sentences/s and BLEU on the validation split
    ddp      two processes over NCCL, where two GPUs are visible: ms per step, device reads and
             collectives per step, counted inside each rank

`--cpu` runs the same stages on the CPU at tiny sizes (fp32 and bf16; gloo for ddp) in under two
minutes. The summary is printed and written to OUT/summary.md (`--out`, default runs/check_gpu).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "devices", "train", "decode", "ddp")
CONFIG = ROOT / "configs" / "multi30k_de_en.yaml"
REQUIRED = ("torch", "numpy", "sentencepiece", "sacrebleu", "yaml", "tqdm", "matplotlib", "pytest")
OPTIONAL = ("datasets", "sacremoses", "ctranslate2", "transformers")
SYNC_STEPS = range(21, 41)  # steps whose synchronisations are counted (the debug mode slows them)
# Tiny sizes for --cpu; the GPU runs the config's own model.
CPU_SIZES = ["model.d_model=64", "model.n_heads=2", "model.d_ff=128", "model.n_encoder_layers=1",
             "model.n_decoder_layers=1", "tokenizer.vocab_size=1000", "tokenizer.sample_size=5000",
             "train.max_tokens=1000", "train.threads=1"]  # one thread: a second costs more than it gives here


# ---- the stages, each run in a child process that prints its result as one JSON line ----

def env_stage(args: argparse.Namespace) -> dict:
    import importlib.util
    import platform

    found = {name: importlib.util.find_spec(name) is not None for name in REQUIRED + OPTIONAL}
    import torch
    result = {"python": platform.python_version(), "torch": torch.__version__, "cuda build": torch.version.cuda,
              "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
              "missing required": [n for n in REQUIRED if not found[n]],
              "optional absent": [n for n in OPTIONAL if not found[n]]}
    if not args.cpu and not result["gpus"]:
        raise SystemExit("error: no CUDA GPU visible to torch (use --cpu to check the CPU paths)")
    if result["missing required"]:
        raise SystemExit(f"error: missing modules the package needs: {', '.join(result['missing required'])}")
    return result


def train_overrides(args: argparse.Namespace, precision: str, steps: int, name: str | None = None) -> list[str]:
    """The Multi30k config's settings for a run of `steps` steps into OUT/`name` (train_PRECISION),
    validated and saved once, at its end."""
    return [f"data.local_dir={args.data}", "data.hub_name=null", f"train.device={'cpu' if args.cpu else 'cuda'}",
            f"train.precision={precision}", f"train.max_steps={steps}", "train.max_minutes=0", "train.short_budget=off",
            "train.eval_every=1000000", "train.eval_bleu_sentences=0", f"train.save_every={steps}", "train.keep_last=1",
            "train.average_last=1", f"train.log_every={min(50, steps)}", f"train.output_dir={args.out / (name or f'train_{precision}')}",
            f"tokenizer.cache_dir={args.out / 'tokenizers'}", *(CPU_SIZES if args.cpu else [])]


def train_stage(args: argparse.Namespace) -> dict:
    """`args.steps` Multi30k steps in `args.precision`, each step timed and, on a GPU, its synchronisations counted."""
    import warnings

    import torch

    from transformer import train as train_module
    from transformer.config import load_config

    cuda = not args.cpu
    starts, tokens, syncs = {}, {}, []
    train_step = train_module.train_step

    def measured_step(run):
        step = run.position.step + 1
        if cuda:
            torch.cuda.set_sync_debug_mode("warn" if step in SYNC_STEPS else "default")
        starts[step] = time.perf_counter()
        lr, step_tokens, loss = train_step(run)
        tokens[step] = step_tokens
        return lr, step_tokens, loss

    train_module.train_step = measured_step
    cfg = load_config(CONFIG, train_overrides(args, args.precision, args.steps))
    shutil.rmtree(cfg.train.output_dir, ignore_errors=True)  # this script's own run of an earlier check
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.perf_counter()
        run_dir = train_module.train(cfg)
        total = time.perf_counter() - started
    syncs = [w for w in caught if "synchronizing" in str(w.message)]
    first = max(2, args.steps // 6)  # after the first steps (memory pools, kernel choices) settle
    window = range(first, args.steps)  # each step's time runs to the start of the next
    seconds = starts[args.steps] - starts[first]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"precision": args.precision, "steps": args.steps, "seconds in all": round(total, 1),
            "ms per step": round(1000 * statistics.median(starts[n + 1] - starts[n] for n in window), 2),
            "tokens/s": round(sum(tokens[n] for n in window) / seconds),
            "peak GPU memory GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "syncs per step": len(syncs) / len(SYNC_STEPS) if cuda and args.steps > SYNC_STEPS[-1] else None,
            "sync sites": sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})[:5] if cuda else None,
            "last loss": [r["loss"] for r in rows if "loss" in r][-1],
            "valid loss": [r["valid_loss"] for r in rows if "valid_loss" in r][-1]}


def decode_stage(args: argparse.Namespace) -> dict:
    """Beam search over the validation split with the train stage's checkpoint (trained here if absent)."""
    import sacrebleu
    import torch

    from transformer.checkpoint import load_model
    from transformer.data.batches import load_split
    from transformer.decoding.translator import translate
    from transformer.runtime import PRECISION_DTYPES, use_tf32

    precision = "fp32" if args.cpu else "bf16"
    checkpoint = args.out / f"train_{precision}" / "checkpoints" / "final.pt"
    if not checkpoint.is_file():
        from transformer.config import load_config
        from transformer.train import train
        train(load_config(CONFIG, train_overrides(args, precision, args.steps)))
    device = torch.device("cpu" if args.cpu else "cuda")
    use_tf32(device, True)
    loaded = load_model([checkpoint], device)
    sources, references = load_split(loaded.config.data, "valid")
    sources, references = sources[:args.sentences], references[:args.sentences]
    d = loaded.config.decode
    result = {"sentences": len(sources), "beam": d.beam_size, "checkpoint": str(checkpoint)}
    for name in ("fp32", "bf16"):
        model = loaded.model.to(PRECISION_DTYPES[name])

        def run(texts: list[str]) -> list[str]:
            return translate(model, loaded.src_tokenizer, loaded.tgt_tokenizer, texts, beam_size=d.beam_size,
                             length_penalty=d.length_penalty, max_len_a=d.max_len_a, max_len_b=d.max_len_b,
                             batch_tokens=d.batch_tokens, device=device)

        run(sources[:32])  # warm-up: kernels chosen, memory pools filled
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        start = time.perf_counter()
        hypotheses = run(sources)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        result[name] = {"sentences/s": round(len(sources) / seconds, 1),
                        "BLEU": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2),
                        "peak GPU memory GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                        if device.type == "cuda" else None}
    return result


def ddp_stage(args: argparse.Namespace) -> dict:
    """Two ranks under torchrun (NCCL on two GPUs, gloo with --cpu), counted inside each rank."""
    import torch

    if not args.cpu and torch.cuda.device_count() < 2:
        return {"not run": f"{torch.cuda.device_count()} GPU visible; a two-process NCCL step needs two"}
    record_dir = args.out / "ddp_record"
    for folder in (record_dir, args.out / "ddp"):  # this script's own run of an earlier check
        shutil.rmtree(folder, ignore_errors=True)
    record_dir.mkdir(parents=True)
    steps = max(args.steps // 10, 8)
    precision = "fp32" if args.cpu else "bf16"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "tests" / "multinode_worker.py"), "--config", str(CONFIG),
               *train_overrides(args, precision, steps, "ddp")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "RECORD_DIR": str(record_dir)})
    if done.returncode != 0:
        raise SystemExit("error: the two-process run failed: " + done.stderr.strip().splitlines()[-1][-300:])
    result = {"ranks": 2, "backend": "gloo" if args.cpu else "nccl", "steps": steps}
    for rank in (0, 1):
        steps_run = json.loads((record_dir / f"rank{rank}.json").read_text())["steps"]
        plain = [s for s in steps_run if 1 < s["step"] < steps]  # not DDP's set-up step, nor the final save
        times = [b["time"] - a["time"] for a, b in zip(plain, plain[1:])]
        result[f"rank {rank}"] = {"ms per step": round(1000 * statistics.median(times), 2),
                                  "reads per step": sorted({json.dumps(s["reads"], sort_keys=True) for s in plain}),
                                  "collectives per step": sorted({json.dumps(s["collectives"], sort_keys=True)
                                                                  for s in plain})}
    return result


def devices_stage(args: argparse.Namespace) -> dict:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_devices.py"],
                          cwd=ROOT, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    result = {"summary": lines[-1] if lines else done.stderr.strip()[-300:],
              "not run": [line.split(": ", 1)[-1] for line in lines if line.startswith("SKIPPED")]}
    if done.returncode != 0:
        failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
        raise SystemExit("error: " + "; ".join(failed or [result["summary"]]))
    return result


CHILDREN = {"env": env_stage, "devices": devices_stage, "train": train_stage, "decode": decode_stage, "ddp": ddp_stage}


# ---- the parent: one child per stage (and per precision), each under its timeout ----

def run_child(args: argparse.Namespace, stage: str, timeout: float, *extra: str) -> tuple[str, dict | str]:
    """Run `stage` in a child process; ("ok", its result), or ("FAILED" / "TIMEOUT", why)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--data", str(args.data),
               "--out", str(args.out), "--steps", str(args.steps), "--sentences", str(args.sentences),
               *(["--cpu"] if args.cpu else []), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the stage's own children (torchrun's ranks, pytest's) too
        child.communicate()
        return "TIMEOUT", f"stopped at the stage's timeout of {args.timeout:g} s"
    (args.out / f"{stage}{''.join('_' + e.lstrip('-') for e in extra)}.log").write_text(out + err, encoding="utf-8")
    results = [line[len("RESULT "):] for line in out.splitlines() if line.startswith("RESULT ")]
    if child.returncode == 0 and results:
        return "ok", json.loads(results[-1])
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    return "FAILED", (errors or lines or [f"exit status {child.returncode}"])[-1][:500]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of the Multi30k files")
    parser.add_argument("--cpu", action="store_true", help="check the CPU paths at tiny sizes (no GPU needed)")
    parser.add_argument("--stage", default=",".join(STAGES), help=f"stages to run, of {', '.join(STAGES)}")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "check_gpu", help="where runs and logs go")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds each stage may take")
    parser.add_argument("--steps", type=int, help="training steps (default: 300 on a GPU, 30 with --cpu)")
    parser.add_argument("--sentences", type=int, help="sentences to decode (default: 1014 on a GPU, 100 with --cpu)")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (30 if args.cpu else 300)
    args.sentences = args.sentences or (100 if args.cpu else 1014)
    args.data, args.out = args.data.resolve(), args.out.resolve()
    if args.child:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
        print("RESULT " + json.dumps(CHILDREN[args.child](args)), flush=True)
        return 0
    stages = [s.strip() for s in args.stage.split(",") if s.strip()]
    if unknown := [s for s in stages if s not in STAGES]:
        parser.error(f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    report, failures = [f"# check_gpu ({'--cpu' if args.cpu else 'GPU'}): {' '.join(sys.argv[1:])}", ""], 0
    for stage in (s for s in STAGES if s in stages):
        started = time.perf_counter()
        runs = [(f"{stage} {p}", ("--precision", p)) for p in (("fp32", "bf16") if args.cpu else ("bf16", "fp16"))] \
            if stage == "train" else [(stage, ())]
        for name, extra in runs:
            left = args.timeout - (time.perf_counter() - started)
            status, result = run_child(args, stage, left, *extra) if left > 0 else ("TIMEOUT", "no time left in the stage")
            failures += status != "ok"
            line = f"{name}: {status} ({time.perf_counter() - started:.0f} s) {json.dumps(result)}"
            print(line, flush=True)
            report.append(f"- {line}")
    (args.out / "summary.md").write_text("\n".join(report) + "\n", encoding="utf-8")
    print(f"{'all stages passed' if not failures else f'{failures} failed'}; summary in {args.out / 'summary.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
