"""Shared test settings and fixtures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CONFIG, TINY_WORDS, overrides, process_state_kept, tiny_sentences, write_corpus

import transformer.model.attention as attention_module

# No test reads or writes the user's cache of precision measurements: "auto" measures afresh.
os.environ["TRANSFORMER_PRECISION_CACHE"] = "off"

# The tests use tiny tensors, for which a second OpenMP thread costs more than it gives, and CI
# machines are shared: one thread keeps timings stable.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models, whatever an earlier test (a training run with
    `train.threads`) left set; the previous count is restored after it. Use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["written-out", "fused"])
def attention_kernel(request, monkeypatch):
    """Run a test on both CPU attention paths: short attention is written out, long goes to SDPA."""
    if request.param == "fused":
        monkeypatch.setattr(attention_module, "CPU_WRITTEN_OUT_MAX_KEYS", 0)
    return request.param


@pytest.fixture
def restore_process_state():
    """Signal and log handlers as they were before the test, whatever an in-process run installed. Use
    it with `pytestmark = pytest.mark.usefixtures("restore_process_state")`."""
    with process_state_kept():
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Plain-text train/valid/test files for de -> en (`helpers.write_corpus`), and a tokenizer cache
    shared by the module's runs."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """An uninterrupted run of `transformer-train` (in-process, through its command-line entry point)
    on `corpus` with `helpers.overrides`, the run that resumed and altered runs are compared with."""
    from transformer.train import main

    run_dir = tmp_path_factory.mktemp("reference")
    with process_state_kept():
        main(["--config", str(CONFIG), *overrides(corpus, run_dir)])
    return run_dir


def write_tiny_run(root: Path, model: dict, steps: tuple[int, ...], data: dict | None = None, train: dict | None = None):
    """Write a run folder of a tiny untrained de->en model into `root` and return its `Config`.

    data/{train,valid,test}.{de,en} (200, 6 and 8 sentences of `TINY_WORDS`), a joint 100-piece
    SentencePiece model, and checkpoints/step_N.pt for each N in `steps` (weights seeded with N, the
    same config and vocabulary). `model`, `data` and `train` are keyword arguments of the config's
    sections.
    """
    from transformer.checkpoint import save_checkpoint, tokenizer_state
    from transformer.config import (
        Config,
        DataConfig,
        DecodeConfig,
        ModelConfig,
        TokenizerConfig,
        TrainConfig,
        config_to_dict,
    )
    from transformer.data.tokenizer import PAD_ID, train_tokenizer
    from transformer.model import Transformer

    folder = root / "data"
    folder.mkdir()
    for split, seed, n in (("train", 0, 200), ("valid", 1, 6), ("test", 2, 8)):
        for lang, offset in (("de", 0), ("en", 10)):
            text = "\n".join(tiny_sentences(TINY_WORDS[lang], n, seed + offset)) + "\n"
            (folder / f"{split}.{lang}").write_text(text, encoding="utf-8")
    texts = [line for lang in ("de", "en") for line in (folder / f"train.{lang}").read_text(encoding="utf-8").split("\n")]
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=100), root / "spm")
    cfg = Config(
        model=ModelConfig(**model),
        data=DataConfig(local_dir=str(folder), valid_split="valid", test_split="test", **(data or {})),
        decode=DecodeConfig(beam_size=2, max_len_a=1.0, max_len_b=4),
        train=TrainConfig(**(train or {})),
    )
    for step in steps:
        torch.manual_seed(step)
        weights = Transformer.from_config(cfg.model, tokenizer.vocab_size, tokenizer.vocab_size, PAD_ID)
        state = {"config": config_to_dict(cfg), "model": weights.state_dict(),
                 "tokenizers": tokenizer_state(tokenizer, tokenizer), "step": step}
        save_checkpoint(state, root / "checkpoints" / f"step_{step}.pt")
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder with test/valid data and three checkpoints (steps 1, 2 and 10) of a tiny untrained
    model with a two-layer decoder, and no config.yaml: what the decoding commands read."""
    root = tmp_path_factory.mktemp("run")
    write_tiny_run(root, dict(d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=2, dropout=0.0,
                              max_len=24, share_embeddings=True), steps=(1, 2, 10))
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A de->en run folder of a tiny untrained model, small enough to load in milliseconds.

    It holds data/{train,valid,test}.{de,en}, config.yaml (training on that data into this folder)
    and checkpoints/step_1.pt and step_2.pt (different weights, the same config and joint vocabulary,
    shared embeddings, so that they average and export). Tests must not change it: copy what they alter.
    """
    from transformer.config import save_config

    root = tmp_path_factory.mktemp("tiny_run")
    cfg = write_tiny_run(root, dict(d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=1,
                                    dropout=0.0, max_len=64, share_embeddings=True),
                         steps=(1, 2), data=dict(max_len=50), train=dict(output_dir=str(root), device="cpu", max_steps=2))
    save_config(cfg, root / "config.yaml")
    return root


@pytest.fixture(scope="session")
def tiny_ctranslate2(tiny_run, tmp_path_factory) -> Path:
    """`tiny_run`'s step_1.pt exported with `transformer-export --format ctranslate2`. Tests must not change it."""
    pytest.importorskip("ctranslate2")
    from transformer.commands import export

    folder = tmp_path_factory.mktemp("tiny_ctranslate2") / "ct2"
    export.main(["--checkpoint", str(tiny_run / "checkpoints" / "step_1.pt"), "--format", "ctranslate2",
                 "--output", str(folder)])
    return folder


@pytest.fixture(scope="session")
def tiny_lm(tiny_run, tmp_path_factory) -> Path:
    """A language-model checkpoint as examples/language_model.py writes it, read by `transformer-generate`."""
    import sentencepiece as spm

    from transformer.model import TransformerLM

    vocab_size = spm.SentencePieceProcessor(model_file=str(tiny_run / "spm.model")).vocab_size()
    settings = dict(vocab_size=vocab_size, d_model=16, n_heads=2, d_ff=32, n_layers=1, dropout=0.0, max_len=32)
    torch.manual_seed(0)
    model = TransformerLM(**settings)
    proto = torch.frombuffer(bytearray((tiny_run / "spm.model").read_bytes()), dtype=torch.uint8)
    path = tmp_path_factory.mktemp("tiny_lm") / "lm.pt"
    torch.save({"settings": settings, "model": model.state_dict(), "tokenizer": proto}, path)
    return path


@pytest.fixture
def killed_staging_folder():
    """A function (target, kind="tmp") -> the folder that a process killed while building `target`
    leaves beside it (see `transformer.atomic.staging_folder`), with a partial file in it."""
    children = []

    def make(target: Path, kind: str = "tmp") -> Path:
        code = ("import sys, time\nfrom transformer.atomic import staging_folder\n"
                "print(staging_folder(sys.argv[1], sys.argv[2]), flush=True)\ntime.sleep(60)")
        child = subprocess.Popen([sys.executable, "-c", code, str(target), kind], stdout=subprocess.PIPE, text=True)
        children.append(child)
        folder = Path(child.stdout.readline().strip())
        (folder / "partial.bin").write_bytes(b"\0" * 100)
        child.kill()
        child.wait()
        return folder

    yield make
    for child in children:
        child.stdout.close()
