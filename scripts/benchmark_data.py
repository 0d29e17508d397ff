"""Data-path benchmark on a WMT14-sized corpus: prepare time and memory, start-up, training memory.

    python scripts/make_corpus.py --out data/wmt14_standin            # 4.5M pairs (a few minutes)
    python scripts/benchmark_data.py --corpus data/wmt14_standin --work /tmp/bench

Each measured command runs as its own process while this script samples the memory of it and of
its children from /proc every 0.5 s (RSS, RssAnon and PSS; PSS counts a page shared by N processes
as 1/N in each, so the memory-mapped corpus is not counted once per rank). It reports:

1. ``transformer-prepare`` of the corpus with the WMT14 base config (``tokenizer.vocab_size`` from
   ``--vocab-size``, 37000 by default):
   wall time and the peak RSS/PSS of the whole process tree (the encoding workers included);
2. ``transformer-train`` of the README's Multi30k model on the prepared data: seconds from launch to
   the first training step, and peak RssAnon; then the same model on Multi30k (29k pairs) in memory,
   and the ratio of the two peaks;
3. ``torchrun --nproc_per_node=2`` training on the prepared folder (with ``--torchrun-fresh``: on a new
   folder and tokenizer cache, so that the log shows how many tokenizer trainings and prepares two
   ranks cause): whether both ranks trained, and each rank's peak RssAnon and PSS against the same bound.

Prints a Markdown table (the one in docs/data.md) and writes it with the raw figures to --work.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


class Monitor:
    """Samples a process tree: per-process peaks, and peaks of the tree's sums."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        self.root, self.interval = root, interval
        self.peak: dict[int, dict[str, int]] = {}
        self.parent: dict[int, int] = {}
        self.cmdline: dict[int, str] = {}
        self.tree_rss = self.tree_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids, frontier = [self.root], [self.root]
            while frontier:
                kids = [c for p in frontier for c in _children(p) for _ in [self.parent.setdefault(c, p)]]
                pids += kids
                frontier = kids
            rss_sum = pss_sum = 0
            for pid in pids:
                if pid not in self.cmdline:
                    try:
                        self.cmdline[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    except OSError:
                        self.cmdline[pid] = ""
                sample = {"rss": _status_kib(pid, "VmRSS"), "anon": _status_kib(pid, "RssAnon"), "pss": _pss_kib(pid)}
                peak = self.peak.setdefault(pid, {k: 0 for k in sample})
                for k, v in sample.items():
                    peak[k] = max(peak[k], v)
                rss_sum += sample["rss"]
                pss_sum += sample["pss"]
            self.tree_rss, self.tree_pss = max(self.tree_rss, rss_sum), max(self.tree_pss, pss_sum)
            time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process and of its children that have ended."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def run(command: list[str], log: Path, first_line: str | None = None) -> dict:
    """Run `command`, logging its output to `log`; return wall and CPU time, memory peaks, and the
    wall and CPU time at which a line containing `first_line` first appeared.

    CPU time is what a busy shared machine does not inflate: on an idle one the wall time of a
    single-threaded part is about its CPU time.
    """
    start = time.perf_counter()
    seen_at = seen_cpu = None
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        monitor = Monitor(process.pid)
        for line in process.stdout:
            out.write(line)
            if first_line and seen_at is None and first_line in line:
                seen_at = time.perf_counter() - start
                seen_cpu = _cpu_seconds(process.pid)
        _, status, usage = os.wait4(process.pid, 0)
        monitor.stop()
    if status != 0:
        sys.exit(f"{' '.join(command)} failed ({status}); see {log}")
    return {"seconds": time.perf_counter() - start, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "first_seen_s": seen_at, "first_seen_cpu_s": seen_cpu, "monitor": monitor, "text": log.read_text()}


def mib(kib: int) -> float:
    return kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="output folder of scripts/make_corpus.py")
    parser.add_argument("--multi30k", type=Path, default=ROOT.parent / "shared" / "data" / "multi30k")
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (prepared data, runs, logs)")
    parser.add_argument("--steps", type=int, default=20, help="training steps of each training run")
    parser.add_argument("--skip", nargs="*", default=[], choices=["prepare", "train", "torchrun"])
    parser.add_argument("--vocab-size", type=int, default=37000,
                        help="tokenizer.vocab_size of the prepared corpus; 8000 (Multi30k's) compares training memory "
                             "of the two corpora with the same model")
    parser.add_argument("--torchrun-fresh", action="store_true",
                        help="torchrun prepares a new folder with a new tokenizer cache (shows one prepare for two "
                             "ranks at full size; costs a second prepare) instead of mapping the one prepared above")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    standin = [f"data.local_dir={args.corpus.resolve()}", "data.hub_name=null", "data.src_lang=en", "data.tgt_lang=de",
               "data.train_split=train", "data.valid_split=val", "data.test_split=test_2016_flickr"]
    # The WMT14 base config's data settings, so that every run below finds the same prepared folder up to date.
    wmt = [*standin, "data.max_len=256", "data.clean_max_words=250", "data.clean_ratio=9",
           f"tokenizer.vocab_size={args.vocab_size}"]
    # The README's Multi30k model, a short run: the training memory without decoding for validation BLEU.
    short = [f"train.max_steps={args.steps}", "train.log_every=1", "train.eval_every=100000", "train.save_every=100000",
             "train.eval_bleu_sentences=0", "train.average_last=1", "train.keep_last=1", "train.max_minutes=0"]
    results: dict = {}

    if "prepare" not in args.skip:
        r = run([python, "-m", "transformer.data.prepare", "--config", "configs/wmt14_en_de_base.yaml", *wmt,
                 f"data.prepared_dir={work / 'prepared'}", f"tokenizer.cache_dir={work / 'tokenizers'}", "--force"],
                work / "prepare.log")
        m = r["monitor"]
        results["prepare"] = {"seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"], "tree_peak_rss_mib": mib(m.tree_rss),
                              "tree_peak_pss_mib": mib(m.tree_pss),
                              "main_peak_rss_mib": mib(m.peak[m.root]["rss"])}
        manifest = json.loads((work / "prepared" / "manifest.json").read_text())
        results["prepare"]["counts"] = manifest["counts"]
        print(json.dumps(results["prepare"]), flush=True)

    if "train" not in args.skip:
        for name, extra in [("prepared", [*wmt, f"data.prepared_dir={work / 'prepared'}",
                                          f"tokenizer.cache_dir={work / 'tokenizers'}"]),
                            ("multi30k", [f"data.local_dir={args.multi30k}"])]:
            r = run([python, "-m", "transformer.train", "--config", "configs/multi30k_de_en.yaml", *extra, *short,
                     f"train.output_dir={work / ('run_' + name)}"], work / f"train_{name}.log", first_line=" step 1 epoch ")
            m = r["monitor"]
            results[f"train_{name}"] = {"first_step_s": r["first_seen_s"], "first_step_cpu_s": r["first_seen_cpu_s"],
                                        "seconds": r["seconds"],
                                        "peak_rss_anon_mib": mib(m.peak[m.root]["anon"]),
                                        "peak_pss_mib": mib(m.peak[m.root]["pss"]),
                                        "peak_rss_mib": mib(m.peak[m.root]["rss"])}
            print(name, json.dumps(results[f"train_{name}"]), flush=True)
        results["anon_ratio"] = results["train_prepared"]["peak_rss_anon_mib"] / results["train_multi30k"]["peak_rss_anon_mib"]

    if "torchrun" not in args.skip:
        r = run([python, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                 "--master_port=29533", "-m", "transformer.train", "--config", "configs/multi30k_de_en.yaml", *wmt,
                 *([f"data.prepared_dir={work / 'prepared_ddp'}", f"tokenizer.cache_dir={work / 'tokenizers_ddp'}"]
                   if args.torchrun_fresh else [f"data.prepared_dir={work / 'prepared'}",
                                                f"tokenizer.cache_dir={work / 'tokenizers'}"]), *short,
                 f"train.output_dir={work / 'run_ddp'}"], work / "torchrun.log")
        m = r["monitor"]
        rank_pids = [pid for pid, parent in m.parent.items()
                     if parent == m.root and "transformer.train" in m.cmdline.get(pid, "")]
        results["torchrun"] = {
            "tokenizer_trainings": r["text"].count("training bpe tokenizer"),
            "prepares": r["text"].count("INFO prepared "),
            "ranks_training": r["text"].count(" batches per epoch per rank"),
            "rank_peak_rss_anon_mib": [mib(m.peak[p]["anon"]) for p in rank_pids],
            "rank_peak_pss_mib": [mib(m.peak[p]["pss"]) for p in rank_pids],
            "seconds": r["seconds"], "fresh": args.torchrun_fresh,
        }
        print(json.dumps(results["torchrun"]), flush=True)

    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    (work / "table.md").write_text(table(results))


def table(r: dict) -> str:
    rows = ["| measurement | figure | bound |", "|---|---|---|"]
    if "prepare" in r:
        p = r["prepare"]
        c = p["counts"]
        rows += [f"| prepare: wall time (CPU time, all processes) | {p['seconds'] / 60:.1f} min ({p['cpu_seconds'] / 60:.1f} min) | 15 min |",
                 f"| prepare: peak RSS, all processes (PSS) | {p['tree_peak_rss_mib'] / 1024:.2f} GiB "
                 f"({p['tree_peak_pss_mib'] / 1024:.2f} GiB) | 3 GiB |",
                 f"| prepared pairs; tokens en / de per pair | {c['pairs']:,}; {c['src_tokens'] / c['pairs']:.1f} / "
                 f"{c['tgt_tokens'] / c['pairs']:.1f} | |"]
    if "train_prepared" in r:
        a, b = r["train_prepared"], r["train_multi30k"]
        rows += [f"| training start on prepared data: launch to first step, wall (CPU) | {a['first_step_s']:.1f} s "
                 f"({a['first_step_cpu_s']:.1f} s) | 60 s |",
                 f"| same, Multi30k in memory | {b['first_step_s']:.1f} s ({b['first_step_cpu_s']:.1f} s) | |",
                 f"| peak RssAnon, prepared 4.5M pairs / Multi30k 29k pairs | {a['peak_rss_anon_mib']:.0f} / "
                 f"{b['peak_rss_anon_mib']:.0f} MiB = {r['anon_ratio']:.2f}x | 1.3x |",
                 f"| peak PSS, prepared / Multi30k | {a['peak_pss_mib']:.0f} / {b['peak_pss_mib']:.0f} MiB | |"]
    if "torchrun" in r:
        t = r["torchrun"]
        rows += [f"| torchrun 2 ranks: tokenizer trainings, prepares, ranks training | {t['tokenizer_trainings']}, "
                 f"{t['prepares']}, {t['ranks_training']} | {'1, 1' if t['fresh'] else '0, 0 (prepared above)'}, 2 |",
                 f"| torchrun 2 ranks: peak RssAnon per rank | {' / '.join(f'{x:.0f}' for x in t['rank_peak_rss_anon_mib'])} MiB | "
                 f"1.3x Multi30k |",
                 f"| torchrun 2 ranks: peak PSS per rank | {' / '.join(f'{x:.0f}' for x in t['rank_peak_pss_mib'])} MiB | |"]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
