"""Helpers that several test modules share: paths, the tiny corpora and runs' settings, and checks.

The fixtures built on them are in conftest.py. Test modules import these with `from helpers import ...`
(pytest puts tests/ on the import path); no test module imports another.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from torch import Tensor

from transformer.data.tokenizer import EOS_ID, PAD_ID
from transformer.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "multi30k_de_en.yaml"
TIMEOUT = 180  # seconds for any one subprocess: far above what they need, only there to end a hang

# A word-for-word dictionary: the "translation" of a sentence is the mapped words in the same order.
LEXICON = {
    "ein": "a", "mann": "man", "frau": "woman", "kind": "child", "hund": "dog", "katze": "cat",
    "spielt": "plays", "läuft": "runs", "springt": "jumps", "sitzt": "sits", "im": "in the", "park": "park",
    "auf": "on", "der": "the", "straße": "street", "mit": "with", "einem": "a", "ball": "ball",
    "schnell": "quickly", "rot": "red", "blau": "blue", "groß": "big", "klein": "small", "wasser": "water",
    "vor": "in front of", "dem": "the", "baum": "tree", "junge": "boy", "mädchen": "girl", "fährt": "rides",
    "fahrrad": "bike", "isst": "eats", "apfel": "apple", "grün": "green", "weiß": "white", "zwei": "two",
}
SPLITS = {"train": 300, "valid": 30, "test": 20}
MAX_STEPS = 30  # of the reference run and of every run compared with it

TINY_WORDS = {
    "de": "ein mann eine frau kind hund spielt läuft im park auf der straße mit einem ball schnell".split(),
    "en": "a man woman child dog plays runs in the park on street with ball quickly".split(),
}


def tiny_sentences(words: list[str], n: int, seed: int) -> list[str]:
    """`n` seeded random sentences of 3 to 8 of `words`."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (n,), generator=generator).tolist()
    return [" ".join(words[i] for i in torch.randint(len(words), (k,), generator=generator).tolist()) for k in lengths]


def write_corpus(folder: Path) -> Path:
    """Write a tiny word-for-word de -> en corpus, train/valid/test, into `folder` and return it."""
    rng = random.Random(0)
    words = sorted(LEXICON)
    for split, n in SPLITS.items():
        src = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]
        (folder / f"{split}.de").write_text("".join(s + "\n" for s in src), encoding="utf-8")
        (folder / f"{split}.en").write_text("".join(" ".join(LEXICON[w] for w in s.split()) + "\n" for s in src),
                                            encoding="utf-8")
    return folder


def overrides(corpus: Path, run_dir: Path, **changes: Any) -> list[str]:
    """Dotted overrides of the real de-en config that make a seconds-long CPU run; `train_max_steps=5`
    style keyword arguments (section and key joined by the first underscore) change single values."""
    values: dict[str, Any] = {
        "data.local_dir": corpus, "data.hub_name": "null", "data.src_lang": "de", "data.tgt_lang": "en",
        "data.train_split": "train", "data.valid_split": "valid", "data.test_split": "test", "data.max_len": 100,
        "tokenizer.type": "bpe", "tokenizer.vocab_size": 120, "tokenizer.joint": "true",
        "tokenizer.cache_dir": corpus / "tokenizers",
        "model.d_model": 32, "model.n_heads": 2, "model.d_ff": 64, "model.n_encoder_layers": 1,
        "model.n_decoder_layers": 1, "model.dropout": 0.1, "model.attention_dropout": 0.0, "model.max_len": 128,
        "model.share_embeddings": "true", "model.tie_output": "true",
        "train.output_dir": run_dir, "train.seed": 1, "train.device": "cpu", "train.threads": 1,
        "train.precision": "fp32", "train.max_tokens": 300, "train.accumulate": 1, "train.max_steps": MAX_STEPS,
        "train.max_epochs": 0, "train.max_minutes": 0, "train.lr_scale": 1, "train.warmup_steps": 10,
        "train.lr_decay": "inverse_sqrt", "train.cooldown": 0.2,
        "train.clip_norm": 0, "train.weight_decay": 0, "train.label_smoothing": 0.1, "train.log_every": 5,
        "train.eval_every": 10, "train.eval_bleu_sentences": 20, "train.save_every": 5, "train.keep_last": 5,
        "train.average_last": 2, "train.patience": 0, "train.max_nonfinite": 10, "train.short_budget": "off",
        "train.short_budget_below": 2000, "train.short_budget_max_steps": 1600, "train.short_budget_dropout": 0.1,
        "decode.beam_size": 2, "decode.max_len_a": 1.0, "decode.max_len_b": 5, "decode.batch_tokens": 2000,
    }
    for name, value in changes.items():
        section, key = name.split("_", 1)
        assert f"{section}.{key}" in values, name
        values[f"{section}.{key}"] = value
    return [f"{key}={value}" for key, value in values.items()]


@contextlib.contextmanager
def process_state_kept():
    """In-process runs install signal handlers and log handlers; put the test process back as it was."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    log_handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for handler in list(root.handlers):
            if handler not in log_handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)


def run_module(*args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    """`python -m ARGS` from the repository root, output captured as text."""
    return subprocess.run([sys.executable, "-m", *args], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(args: list[str], log: Path) -> Iterator[str]:
    """A real `transformer-serve ARGS --port 0` process, its output in `log`: yields its base URL
    (http://127.0.0.1:PORT/) once it listens, and stops it with SIGINT at the end."""
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "transformer.commands.serve", *args, "--port", "0"],
                                   cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (listening := re.search(r"serving on (http://\S+/)", log.read_text(encoding="utf-8"))):
            assert process.poll() is None, f"transformer-serve exited with {process.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"transformer-serve did not start:\n{log.read_text()}"
            time.sleep(0.05)
        yield listening.group(1)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def step_of(path: Path) -> int:
    return int(path.stem.split("_")[1])


def steps_logged(run_dir: Path) -> list[tuple[int, bool]]:
    """(step, whether it validated) for each row of the run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], "valid_loss" in r) for r in rows]


def assert_same_tensors(a: Any, b: Any, where: str = "") -> None:
    """Recursively: equal structure, bit-identical tensors, equal other values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def one_line_error(exit: pytest.ExceptionInfo, *fragments: str) -> str:
    """The message of a command's SystemExit, checked to be one line, "error: ...", holding `fragments`."""
    message = exit.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    assert all(f in message for f in fragments), message
    return message


def random_model(seed: int, vocab: int = 20, dtype: torch.dtype = torch.float64, **kwargs) -> Transformer:
    """A small untrained model whose next-token distributions are far from uniform."""
    torch.manual_seed(seed)
    model = Transformer(vocab, vocab, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=2,
                        dropout=0.0, tie_output=False, **kwargs)
    with torch.no_grad():
        model.output_projection.weight.mul_(4.0)  # peaky distributions: the search choices matter
    return model.to(dtype).eval()


def random_source(seed: int, lengths: list[int], vocab: int = 20) -> Tensor:
    """(B, S) right-padded source ids ending with EOS, one row per length."""
    generator = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD_ID)
    for i, n in enumerate(lengths):
        src[i, : n - 1] = torch.randint(4, vocab, (n - 1,), generator=generator)
        src[i, n - 1] = EOS_ID
    return src


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}
