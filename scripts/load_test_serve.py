"""Load test of `transformer-serve` on 127.0.0.1: many concurrent clients against one single-sentence
client and against `transformer-translate` on the same sentences in one run (the ceiling).

    python scripts/load_test_serve.py --checkpoint runs/multi30k_de_en/checkpoints/final.pt

1. `transformer-translate` translates the sentences (Multi30k test_2016_flickr by default) in one
   run; the time it spends translating them (its chunks of 256 lines, timed inside the process)
   gives the ceiling.
2. A `transformer-serve` process starts; one client sends the sentences one request at a time,
   one after another: the sequential figure, and each sentence's single-request answer.
3. `--clients` clients send single-sentence requests at once, in a loop, for `--seconds`: the
   figures under load. Every answer is compared with the sentence's single-request answer, the
   batches formed are read from the server's /metrics, and the server's resident memory is sampled
   every half second.

The clients are aiohttp's, which spend about 0.1 ms of CPU per request: the load generator shares
the machine with the server and must cost it little (httpx's async client spends some 40 times more
at 200 connections). It prints a report in markdown (and writes it as JSON with `--output`), and exits non-zero when a
request failed, an answer differed (in float32), the server under load reached less than 0.7x the
command's sentences/s or less than 3x the sequential server's, or its memory grew by more than 5%
after the first 5 seconds of load.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "multi30k" / "test_2016_flickr.de.gz"
MEMORY_SETTLE_SECONDS = 5.0  # memory may grow while the first batches warm up; after that it must stay flat


@dataclass
class Figures:
    """What one way of translating achieved."""

    sentences: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)
    errors: int = 0
    mismatches: int = 0

    @property
    def per_second(self) -> float:
        return self.sentences / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """The q-th percentile latency in seconds (nearest rank)."""
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else float("nan")


def read_sentences(path: Path, limit: int | None) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[:limit] if limit else lines


# Runs transformer-translate's entry point with its translation of each chunk timed: the time it spends
# translating, without loading the model or starting Python (which an empty input would measure, noisily).
TIMED_COMMAND = """
import sys, time
from transformer.commands import translate
untimed, spent = translate.translate, []
def timed(*args, **kwargs):
    start = time.perf_counter()
    try:
        return untimed(*args, **kwargs)
    finally:
        spent.append(time.perf_counter() - start)
translate.translate = timed
try:
    translate.main(sys.argv[2:])
finally:
    open(sys.argv[1], "w").write(str(sum(spent)))
"""


def command_ceiling(checkpoint: str, sentences: list[str], extra: list[str]) -> tuple[Figures, list[str]]:
    """`transformer-translate` on every sentence in one run; the time it spent translating them."""
    with tempfile.TemporaryDirectory() as folder:
        source, seconds = Path(folder) / "input.txt", Path(folder) / "seconds"
        source.write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
        done = subprocess.run([sys.executable, "-c", TIMED_COMMAND, str(seconds), "--checkpoint", checkpoint,
                               "--input", str(source), *extra], check=True, capture_output=True)
        spent = float(seconds.read_text())
    lines = done.stdout.decode("utf-8").split("\n")[:-1]
    return Figures(len(sentences), spent), lines


class Server:
    """A `transformer-serve` process on a free port of 127.0.0.1, with its memory sampled while it runs."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "transformer.commands.serve", *args, "--port", "0"],
                                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while not (found := re.search(r"serving on (http://\S+/)", log.read_text(encoding="utf-8"))):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"transformer-serve did not start:\n{log.read_text(encoding='utf-8')}")
            time.sleep(0.1)
        self.url = found.group(1)
        self.memory: list[tuple[float, int]] = []  # (seconds since sampling began, resident bytes)
        self._sampling = threading.Event()

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def peak_rss(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024

    def sample_memory(self, every: float = 0.5) -> threading.Thread:
        """Start sampling the resident memory every `every` seconds until `stop_sampling`."""
        start = time.monotonic()

        def sample() -> None:
            while not self._sampling.wait(every):
                self.memory.append((time.monotonic() - start, self.rss()))

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        return thread

    def stop_sampling(self, thread: threading.Thread) -> None:
        self._sampling.set()
        thread.join()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        return metric_values(self.url)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def metric_values(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample, sorted labels): value} of the server's /metrics."""
    with urllib.request.urlopen(url + "metrics", timeout=60) as answer:
        text = answer.read().decode("utf-8")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def sequential(url: str, sentences: list[str]) -> tuple[Figures, list[str]]:
    """One client, one sentence per request, one request after another."""
    figures, answers = Figures(), []
    async with aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(total=600)) as http:
        start = time.perf_counter()
        for sentence in sentences:
            sent = time.perf_counter()
            async with http.post("/translate", json={"text": sentence}) as response:
                answer = await response.json()
            figures.latencies.append(time.perf_counter() - sent)
            if response.status != 200:
                figures.errors += 1
                answers.append("")
                continue
            answers.append(answer["translations"][0])
            figures.sentences += 1
        figures.seconds = time.perf_counter() - start
    return figures, answers


async def concurrent(url: str, sentences: list[str], expected: list[str] | None, clients: int,
                     seconds: float) -> Figures:
    """`clients` clients, each sending single-sentence requests in a loop for `seconds`; answers are
    compared with `expected` (per sentence) where given. Requests still out at the end are waited
    for and counted, and the time runs until the last answer."""
    figures = Figures()
    order = iter(range(10**12))
    deadline = time.perf_counter() + seconds

    async def client(http: aiohttp.ClientSession) -> None:
        while time.perf_counter() < deadline:
            i = next(order) % len(sentences)
            sent = time.perf_counter()
            try:
                async with http.post("/translate", json={"text": sentences[i]}) as response:
                    answer = await response.json()
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                figures.errors += 1
                continue
            figures.latencies.append(time.perf_counter() - sent)
            if response.status != 200:
                figures.errors += 1
                continue
            figures.sentences += 1
            if expected is not None and answer["translations"][0] != expected[i]:
                figures.mismatches += 1

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base_url=url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        figures.seconds = time.perf_counter() - start
    return figures


def batches_formed(before: dict, after: dict) -> dict[str, float]:
    """The batches the server formed between two scrapes: how many, their mean size, and how many
    fell in each bucket of the batch-size histogram."""
    name = "transformer_serve_batch_sentences"

    def rise(sample: str, labels: tuple) -> float:
        return after.get((sample, labels), 0.0) - before.get((sample, labels), 0.0)

    buckets = sorted(((float(dict(labels)["le"]), labels) for (sample, labels) in after
                      if sample == f"{name}_bucket"), key=lambda b: b[0])
    count_labels = next(labels for (sample, labels) in after if sample == f"{name}_count")
    count, total = rise(f"{name}_count", count_labels), rise(f"{name}_sum", count_labels)
    busy = rise("transformer_serve_batch_seconds_sum", count_labels)
    histogram, below = {}, 0.0
    for bound, labels in buckets:
        cumulative = rise(f"{name}_bucket", labels)
        if cumulative - below:
            histogram[f"<= {bound:g}"] = cumulative - below
        below = cumulative
    return {"batches": count, "mean_sentences": total / count if count else 0.0, "histogram": histogram,
            "decoding_seconds": busy, "decoding_per_second": total / busy if busy else 0.0}


def memory_report(samples: list[tuple[float, int]]) -> dict:
    """Resident memory over the run: where it stood every 5 s, its peak, and how much the peak grew
    after the first 5 s of load."""
    mib = [(t, rss / 2**20) for t, rss in samples]
    settled = [rss for t, rss in mib if t >= MEMORY_SETTLE_SECONDS]
    peak_at_settle = max(rss for t, rss in mib if t < MEMORY_SETTLE_SECONDS) if settled else mib[-1][1]
    every_5s = {f"{t:.0f} s": round(rss) for t, rss in mib if round(t * 2) % 10 == 0}
    return {"start_mib": mib[0][1], "peak_at_5s_mib": peak_at_settle, "peak_mib": max(rss for _, rss in mib),
            "end_mib": mib[-1][1], "every_5s_mib": every_5s,
            "growth_after_5s": max(settled or [peak_at_settle]) / peak_at_settle - 1.0}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def row(name: str, f: Figures, ceiling: Figures) -> str:
    latency = " | ".join(f"{f.percentile(q) * 1000:.0f}" for q in (50, 95, 99)) if f.latencies else "- | - | -"
    return (f"| {name} | {f.sentences} | {f.seconds:.1f} | {f.per_second:.1f} | {f.per_second / ceiling.per_second:.2f}x "
            f"| {latency} | {f.errors} |")


def report(run: dict, ceiling: Figures, alone: Figures, loaded: Figures) -> Iterator[str]:
    yield (f"CPU: {run['cpu']}, {run['cores']} cores; load average before the run {run['load_before']}; "
           f"{run['sentences']} sentences of {run['source']}; server options {' '.join(run['server_args'])}")
    yield ""
    yield "| | sentences | seconds | sentences/s | of the command's | p50 ms | p95 ms | p99 ms | errors |"
    yield "|---|---|---|---|---|---|---|---|---|"
    yield row("transformer-translate, one run (the ceiling)", ceiling, ceiling)
    yield row("server, one request at a time", alone, ceiling)
    yield row(f"server, {run['clients']} concurrent clients", loaded, ceiling)
    yield ""
    compared = (f"{loaded.mismatches} answers differed from the single-request answer" if run["exact"] else
                "answers not compared with the single-request ones (bf16 and int8 depend on the batch)")
    yield (f"Under load: {loaded.per_second / alone.per_second:.2f}x the sequential server, "
           f"{loaded.per_second / ceiling.per_second:.2f}x the command; {compared}; {run['command_mismatches']} "
           f"of {alone.sentences} single-request answers differed from the command's line.")
    b = run["batches"]
    yield (f"Batches formed under load: {b['batches']:.0f}, {b['mean_sentences']:.1f} sentences on average; "
           f"by size: {', '.join(f'{k}: {v:.0f}' for k, v in b['histogram'].items())}. The model's thread decoded "
           f"for {b['decoding_seconds']:.1f} of the {loaded.seconds:.1f} s, at {b['decoding_per_second']:.1f} "
           "sentences/s while it did.")
    m = run["memory"]
    yield (f"Server memory (RSS): {m['start_mib']:.0f} MiB when the load began, peak {m['peak_at_5s_mib']:.0f} MiB "
           f"in the first {MEMORY_SETTLE_SECONDS:g} s, peak {m['peak_mib']:.0f} MiB over the run "
           f"({100 * m['growth_after_5s']:+.1f}% after {MEMORY_SETTLE_SECONDS:g} s), {m['end_mib']:.0f} MiB at the "
           f"end; every 5 s: {', '.join(f'{k}: {v}' for k, v in m['every_5s_mib'].items())} MiB; "
           f"VmHWM {run['vmhwm_mib']:.0f} MiB.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="sentences, one per line (.gz or text)")
    parser.add_argument("--limit", type=int, help="use only the first N sentences")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--precision", default=None, help="as transformer-translate takes it (default: the checkpoint's)")
    parser.add_argument("--server-arg", action="append", default=[], help="another transformer-serve option (repeatable)")
    parser.add_argument("--output", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    sentences = read_sentences(args.source, args.limit)
    extra = ["--precision", args.precision] if args.precision else []
    run = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
           "sentences": len(sentences), "source": str(args.source), "clients": args.clients, "seconds": args.seconds,
           "server_args": ["--checkpoint", args.checkpoint, *extra, *args.server_arg]}
    print(f"translating {len(sentences)} sentences with transformer-translate...", file=sys.stderr)
    ceiling, command_lines = command_ceiling(args.checkpoint, sentences, extra)
    with tempfile.TemporaryDirectory() as folder:
        server = Server(run["server_args"], Path(folder) / "serve.log")
        try:
            print(f"{server.url}: one request at a time...", file=sys.stderr)
            alone, singles = asyncio.run(sequential(server.url, sentences))
            run["command_mismatches"] = sum(a != b for a, b in zip(singles, command_lines))
            print(f"{args.clients} concurrent clients for {args.seconds:g} s...", file=sys.stderr)
            before = server.metrics()
            sampler = server.sample_memory()
            exact = run["exact"] = (args.precision or "fp32") == "fp32"
            loaded = asyncio.run(concurrent(server.url, sentences, singles if exact else None, args.clients,
                                            args.seconds))
            server.stop_sampling(sampler)
            run["batches"] = batches_formed(before, server.metrics())
            run["memory"] = memory_report(server.memory)
            run["vmhwm_mib"] = server.peak_rss() / 2**20
            run["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        finally:
            server.stop()
    lines = list(report(run, ceiling, alone, loaded))
    print("\n".join(lines))
    figures = {name: {**{k: v for k, v in asdict(f).items() if k != "latencies"}, "per_second": f.per_second, "p50": f.percentile(50), "p95": f.percentile(95),
                      "p99": f.percentile(99)} for name, f in (("command", ceiling), ("sequential", alone),
                                                                ("concurrent", loaded))}
    if args.output:
        args.output.write_text(json.dumps({**run, "figures": figures, "report": lines}, indent=1), encoding="utf-8")
    failures = [message for failed, message in (
        (loaded.errors + alone.errors > 0, f"{loaded.errors + alone.errors} requests failed"),
        (loaded.mismatches > 0, f"{loaded.mismatches} answers under load differed from the single-request answer"),
        (loaded.per_second < 0.7 * ceiling.per_second, "under 0.7x the command's sentences/s"),
        (loaded.per_second < 3 * alone.per_second, "under 3x the sequential server's sentences/s"),
        (run["memory"]["growth_after_5s"] > 0.05, "memory grew by more than 5% after the first 5 s"),
    ) if failed]
    for message in failures:
        print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
