"""Prepared (memory-mapped) training data: the same batches and training as the in-memory path, exact
resumption after SIGKILL, detection of damaged or stale folders, interrupted prepares, one prepare for
two ranks, and two "nodes" that each prepare their own copy.

The corpus, the overrides and the helpers are the tiny word-for-word ones of test_train.py.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONFIG, MAX_STEPS, ROOT, TIMEOUT, assert_same_tensors, free_port, overrides, run_module, step_of

from transformer import atomic
from transformer import train as train_module
from transformer.checkpoint import load_checkpoint, run_checkpoints
from transformer.commands import evaluate
from transformer.config import load_config
from transformer.data import prepare as prepare_module
from transformer.data import tokenizer as tokenizer_module
from transformer.data.batches import BatchSampler, DataError, bucket_batches, collate
from transformer.data.prepared import open_prepared
from transformer.train import main, train

# `reference` (conftest.py) is the run on the in-memory path that prepared runs are compared with.
pytestmark = pytest.mark.usefixtures("restore_process_state")


def prepared(corpus: Path, run_dir: Path, folder: Path, *extra: str, **changes) -> list[str]:
    """The test overrides with training data prepared into (and read from) `folder`."""
    return [*overrides(corpus, run_dir, **changes), f"data.prepared_dir={folder}", *extra]


def test_bucketing_as_array_operations_equals_the_sorted_greedy_cut():
    def reference_batches(src_lens, tgt_lens, max_tokens):  # the definition, written the plain way
        order = sorted(range(len(src_lens)), key=lambda i: (tgt_lens[i], src_lens[i], i))
        batches, batch, width = [], [], 0
        for i in order:
            new_width = max(width, src_lens[i], tgt_lens[i])
            if batch and (len(batch) + 1) * new_width > max_tokens:
                batches.append(batch)
                batch, new_width = [], max(src_lens[i], tgt_lens[i])
            batch.append(i)
            width = new_width
        return batches + [batch] if batch else batches

    rng = np.random.default_rng(0)
    for n, max_tokens in [(0, 10), (1, 1), (3000, 300), (3000, 57), (500, 10_000)]:
        src, tgt = rng.integers(1, 80, n).tolist(), rng.integers(1, 80, n).tolist()
        got = [b.tolist() for b in bucket_batches(np.array(src), np.array(tgt), max_tokens)]
        assert got == reference_batches(src, tgt, max_tokens), (n, max_tokens)


def test_prepared_data_gives_exactly_the_batches_of_the_in_memory_path(corpus, tmp_path):
    memory = load_config(CONFIG, overrides(corpus, tmp_path / "run"))
    mapped = load_config(CONFIG, prepared(corpus, tmp_path / "run", tmp_path / "prep"))
    src_a, tgt_a, data_a, _, _ = train_module.prepare_data(memory, tmp_path, None)
    src_b, tgt_b, data_b, _, _ = train_module.prepare_data(mapped, tmp_path, None)
    assert src_a.to_bytes() == src_b.to_bytes() and tgt_a.to_bytes() == tgt_b.to_bytes()
    assert len(data_a) == len(data_b) == 300
    assert list(data_a.src_lens) == data_b.src_lens.tolist() and list(data_a.tgt_lens) == data_b.tgt_lens.tolist()
    for rank, world in [(0, 1), (1, 2)]:
        batches_a = bucket_batches(data_a.src_lens, data_a.tgt_lens, 300)
        batches_b = bucket_batches(data_b.src_lens, data_b.tgt_lens, 300)
        for epoch in (0, 1):
            order_a = BatchSampler(batches_a, 1, rank, world).epoch_batches(epoch)
            order_b = BatchSampler(batches_b, 1, rank, world).epoch_batches(epoch)
            assert [b.tolist() for b in order_a] == [b.tolist() for b in order_b]
            for a, b in zip(order_a, order_b):
                x, y = collate(a, data_a), collate(b, data_b)
                for name in ("src", "tgt_in", "tgt_out"):
                    assert torch.equal(getattr(x, name), getattr(y, name)), name
                assert (x.n_src_tokens, x.n_tgt_tokens) == (y.n_src_tokens, y.n_tgt_tokens)


def test_training_on_prepared_data_resumes_after_sigkill_bit_identical_to_the_in_memory_run(reference, corpus, tmp_path):
    # The killed run prepares the data itself (it is missing); the resumed one maps it.
    ov = prepared(corpus, tmp_path / "run", tmp_path / "prep")
    with open(tmp_path / "stderr", "w+") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "transformer.train", "--config", str(CONFIG), *ov],
                                   cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + TIMEOUT
        while not run_checkpoints(tmp_path / "run") and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.kill()
        process.wait(timeout=TIMEOUT)
        stderr.seek(0)
        log = stderr.read()
        assert process.returncode == -signal.SIGKILL, log
    assert "preparing the training data" in log
    assert step_of(run_checkpoints(tmp_path / "run")[-1]) < MAX_STEPS

    manifest = (tmp_path / "prep" / "manifest.json").stat().st_mtime_ns
    main(["--config", str(CONFIG), "--resume", *ov])
    assert (tmp_path / "prep" / "manifest.json").stat().st_mtime_ns == manifest  # mapped, not prepared again
    name = f"step_{MAX_STEPS:08d}.pt"
    resumed = load_checkpoint(tmp_path / "run" / "checkpoints" / name)
    uninterrupted = load_checkpoint(reference / "checkpoints" / name)
    for key in ("model", "optimizer", "rng", "tokenizers", "step"):
        assert_same_tensors(resumed[key], uninterrupted[key], key)


def test_damaged_stale_and_changed_folders_are_named_and_rebuilt(corpus, tmp_path, caplog):
    data = tmp_path / "corpus"
    data.mkdir()
    for name in ("train.de", "train.en", "valid.de", "valid.en"):
        (data / name).write_bytes((corpus / name).read_bytes())
    folder = tmp_path / "prep"
    cfg = load_config(CONFIG, prepared(data, tmp_path / "run", folder))
    prepare_module.prepare(cfg)
    assert prepare_module.stale_reason(cfg) is None

    # Truncated: the size check names the file, without reading it.
    tokens = folder / "train.src.bin"
    tokens.write_bytes(tokens.read_bytes()[:-2])
    reason = prepare_module.stale_reason(cfg, verify_content=False)
    assert str(tokens) in reason and "truncated" in reason
    with pytest.raises(DataError, match="train.src.bin has .* bytes") as error:
        open_prepared(folder)
    assert "\n" not in str(error.value)
    prepare_module.ensure_prepared(cfg)  # rebuilds
    assert prepare_module.stale_reason(cfg) is None

    # Edited in place (same size): only the content hash can tell.
    target = folder / "train.tgt.bin"
    raw = bytearray(target.read_bytes())
    raw[10] ^= 1
    target.write_bytes(bytes(raw))
    assert prepare_module.stale_reason(cfg, verify_content=False) is None
    assert "SHA-256" in prepare_module.stale_reason(cfg) and str(target) in prepare_module.stale_reason(cfg)
    with pytest.raises(DataError, match="train.tgt.bin does not match the SHA-256"):
        open_prepared(folder)

    # A corpus file touched but not changed is still the same corpus; a changed one is not.
    prepare_module.main(["--config", str(CONFIG), *prepared(data, tmp_path / "run", folder)])
    os.utime(data / "train.de", ns=(1, 1))
    assert prepare_module.stale_reason(cfg) is None
    with open(data / "train.de", "a", encoding="utf-8") as f, open(data / "train.en", "a", encoding="utf-8") as g:
        f.write("ein hund\n")
        g.write("a dog\n")
    assert f"{(data / 'train.de').resolve()} changed" in prepare_module.stale_reason(cfg)
    prepare_module.main(["--config", str(CONFIG), *prepared(data, tmp_path / "run", folder)])
    assert json.loads((folder / "manifest.json").read_text())["counts"]["pairs"] == 301

    # Another setting that changes the ids names the setting.
    other = load_config(CONFIG, prepared(data, tmp_path / "run", folder, data_max_len=5))
    assert "data.max_len 100 != 5" in prepare_module.stale_reason(other)


def test_an_interrupted_prepare_leaves_nothing_that_training_would_use(corpus, tmp_path, monkeypatch):
    folder = tmp_path / "prep"
    cfg = load_config(CONFIG, prepared(corpus, tmp_path / "run", folder))

    def fail(*args):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(prepare_module, "_move_into_place", fail)
        with pytest.raises(KeyboardInterrupt):
            prepare_module.prepare(cfg)
    assert not folder.exists() and list(tmp_path.iterdir()) == []  # the temporary folder is gone too

    # A prepare killed outright leaves its temporary folder, which nothing reads; a later one
    # interrupted while replacing a complete folder leaves the complete one in place.
    prepare_module.prepare(cfg)
    (tmp_path / ".prep.tmp-killed").mkdir()
    (tmp_path / ".prep.tmp-killed" / "train.src.bin").write_bytes(b"\0" * 7)
    before = json.loads((folder / "manifest.json").read_text())
    with monkeypatch.context() as m:
        m.setattr(prepare_module, "_move_into_place", fail)
        with pytest.raises(KeyboardInterrupt):
            prepare_module.prepare(cfg)
    assert json.loads((folder / "manifest.json").read_text()) == before
    assert prepare_module.stale_reason(cfg) is None


def test_a_prepare_removes_the_folders_that_killed_prepares_left_and_no_others(corpus, tmp_path,
                                                                              killed_staging_folder):
    folder = tmp_path / "prep"
    killed = [killed_staging_folder(folder, "tmp"), killed_staging_folder(folder, "old")]
    live = atomic.staging_folder(folder)  # this process's, being written
    elsewhere = tmp_path / f".prep.tmp-another-host-{os.getpid()}-abcd1234"  # another host's: its pid says nothing here
    elsewhere.mkdir()
    prepare_module.main(["--config", str(CONFIG), "--force", *prepared(corpus, tmp_path / "run", folder)])
    assert not any(path.exists() for path in killed)
    assert sorted(os.listdir(tmp_path)) == sorted([elsewhere.name, live.name, "prep"])
    assert prepare_module.stale_reason(load_config(CONFIG, prepared(corpus, tmp_path / "run", folder))) is None


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["token ids", "index arrays", "manifest", "tokenizer copy"])
def test_a_full_disk_is_one_line_naming_the_folder_and_leaves_nothing(where, corpus, tmp_path, monkeypatch):
    folder = tmp_path / "out" / "prep"
    if where == "token ids":
        monkeypatch.setattr(prepare_module._HashedWriter, "write", no_space)
    elif where == "index arrays":
        monkeypatch.setattr(prepare_module.np, "save", no_space)
    elif where == "manifest":
        write_text = Path.write_text

        def manifest_fails(self, *args, **kwargs):
            return no_space() if self.name == "manifest.json" else write_text(self, *args, **kwargs)
        monkeypatch.setattr(Path, "write_text", manifest_fails)
    else:
        monkeypatch.setattr(tokenizer_module, "atomic_write_bytes", lambda path, data: atomic.atomic_write(path, no_space))
    with pytest.raises(SystemExit) as exit:
        prepare_module.main(["--config", str(CONFIG), *prepared(corpus, tmp_path / "run", folder)])
    message = exit.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    assert message.startswith(f"error: {folder}: cannot write the prepared data: "), message
    assert "No space left on device" in message, message
    assert os.listdir(folder.parent) == []  # no prepared folder, no temporary one


def test_a_failure_that_is_not_the_disks_is_not_called_a_write_error(corpus, tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(prepare_module.np, "save", fails)
    folder = tmp_path / "out" / "prep"
    with pytest.raises(SystemExit) as exit:
        prepare_module.main(["--config", str(CONFIG), *prepared(corpus, tmp_path / "run", folder)])
    assert exit.value.code == f"error: {folder}: cannot prepare the data: Invalid argument"
    assert os.listdir(folder.parent) == []


def test_prepare_cleans_and_deduplicates_as_set_and_counts_it(tmp_path):
    src = ["ein hund", "ein hund", "a b c d e f g h", "x", "", "ein mann"]
    tgt = ["a dog", "a dog", "a b c d e f g h", "x y z w", "y", "a man"]
    for lang, lines in (("de", src), ("en", tgt)):
        (tmp_path / f"train.{lang}").write_text("".join(s + "\n" for s in lines), encoding="utf-8")
    cfg = load_config(CONFIG, prepared(tmp_path, tmp_path / "run", tmp_path / "prep", "data.dedup=true",
                                       "data.clean_max_words=6", "data.clean_ratio=3", tokenizer_vocab_size=100))
    prepare_module.prepare(cfg)
    counts = json.loads((tmp_path / "prep" / "manifest.json").read_text())["counts"]
    assert counts["read"] == 6 and counts["dropped_duplicate"] == 1 and counts["dropped_clean_long"] == 1
    assert counts["dropped_clean_ratio"] == 1 and counts["dropped_empty"] == 1 and counts["pairs"] == 2
    data, tokenizers = open_prepared(tmp_path / "prep")
    assert [tokenizers["en"].decode(data.tgt[i]) for i in range(len(data))] == ["a dog", "a man"]


def test_two_ranks_prepare_once_and_both_train(corpus, tmp_path):
    changes = {"train_max_steps": 2, "train_eval_every": 1000, "train_save_every": 1000,
               "train_eval_bleu_sentences": 0, "train_keep_last": 1, "train_average_last": 1,
               "tokenizer_cache_dir": tmp_path / "tokenizers"}
    done = run_module("torch.distributed.run", "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                      f"--master_port={free_port()}", "-m", "transformer.train", "--config", str(CONFIG),
                      *prepared(corpus, tmp_path / "run", tmp_path / "prep", **changes))
    assert done.returncode == 0, done.stderr[-5000:]
    assert done.stderr.count("training bpe tokenizer") == 1
    assert done.stderr.count("INFO prepared ") == 1
    assert done.stderr.count(" batches per epoch per rank") == 2  # both ranks reached training


def test_two_nodes_each_preparing_a_copy_train_as_one_process_with_accumulate_2(corpus, tmp_path):
    # Two one-process "nodes" without a shared folder: each local rank 0 prepares its own copy.
    steps = 4
    changes = {"model_dropout": 0.0, "train_max_steps": steps, "train_eval_every": 1000, "train_save_every": 1000,
               "train_eval_bleu_sentences": 0, "train_keep_last": 1, "train_average_last": 1}
    port = free_port()
    nodes = []
    for node in (0, 1):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                   "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                   "-m", "transformer.train", "--config", str(CONFIG),
                   *prepared(corpus, tmp_path / "ddp", tmp_path / f"prep{node}",
                             tokenizer_cache_dir=tmp_path / f"tokenizers{node}", **changes)]
        nodes.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for process in nodes:
        _, err = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 0, err[-5000:]
    manifests = [json.loads((tmp_path / f"prep{node}" / "manifest.json").read_text()) for node in (0, 1)]
    assert manifests[0]["files"] == manifests[1]["files"]  # the same bytes on both "nodes"

    train(load_config(CONFIG, prepared(corpus, tmp_path / "single", tmp_path / "prep0", train_accumulate=2, **changes)))
    name = f"step_{steps:08d}.pt"
    ddp, one = (load_checkpoint(d / "checkpoints" / name)["model"] for d in (tmp_path / "ddp", tmp_path / "single"))
    for key in ddp:
        torch.testing.assert_close(ddp[key], one[key], rtol=0, atol=1e-5, msg=lambda message, key=key: f"{key}: {message}")


def test_evaluate_prints_the_papers_bleu_next_to_sacrebleu(reference, capsys):
    capsys.readouterr()
    evaluate.main(["--checkpoint", str(reference / "checkpoints" / "final.pt"), "--device", "cpu", "--bleu", "paper"])
    out = capsys.readouterr().out
    assert "BLEU (standard sacreBLEU, on detokenized text): BLEU = " in out
    assert "BLEU (paper: Moses-tokenized, compounds split, multi-bleu counting): BLEU = " in out


@pytest.mark.parametrize("trouble", ["misaligned", "utf8", "blank"])
def test_a_bad_corpus_is_a_one_line_error_naming_the_file_from_the_preparing_child(trouble, corpus, tmp_path):
    data = tmp_path / "corpus"
    data.mkdir()
    for name in ("train.de", "train.en", "valid.de", "valid.en"):
        (data / name).write_bytes((corpus / name).read_bytes())
    if trouble == "misaligned":
        with open(data / "train.en", "a", encoding="utf-8") as f:
            f.write("one more\n")
        expected = (f"line counts differ: {data / 'train.de'} has 300 lines, {data / 'train.en'} has 301 lines",)
    elif trouble == "blank":
        (data / "train.en").write_text("\n" * 300, encoding="utf-8")
        expected = (f"{data}: every en line sampled from the training split is empty or blank",)
    else:
        lines = (data / "train.de").read_bytes().split(b"\n")
        lines[41] = b"ein \xff hund"
        (data / "train.de").write_bytes(b"\n".join(lines))
        expected = (f"{data / 'train.de'}:42: invalid UTF-8 byte",)
    with pytest.raises(SystemExit) as exit:
        main(["--config", str(CONFIG), *prepared(data, tmp_path / "run", tmp_path / "prep")])
    message = exit.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    assert all(e in message for e in expected), message
    assert not (tmp_path / "prep").exists()


def test_streamed_blocks_split_lines_as_read_lines(tmp_path):
    from transformer.data.batches import read_lines
    text = "a\r\n b \n\nü" * 5 + "\u2028x\n\n"
    path = tmp_path / "f.txt"
    path.write_text(text, encoding="utf-8")
    for block_bytes in (1, 3, 7, 1 << 20):
        got = [line for block in prepare_module._file_blocks(path, block_bytes) for line in block]
        assert got == read_lines(path), block_bytes


def test_the_tokenizer_sample_is_seeded_uniform_in_corpus_order_and_blind_to_chunking():
    from transformer.data.tokenizer import sample_pairs
    src = [f"s{i}" for i in range(20_000)]
    tgt = [f"t{i}" for i in range(20_000)]
    assert sample_pairs([(src, tgt)], 0) == (src, tgt)
    assert sample_pairs([(src[:5], tgt[:5]), (src[5:], tgt[5:])], 20_000) == (src, tgt)
    whole = sample_pairs([(src, tgt)], 1000)
    chunked = sample_pairs([(src[i:i + 777], tgt[i:i + 777]) for i in range(0, 20_000, 777)], 1000)
    assert whole == chunked
    positions = [int(s[1:]) for s in whole[0]]
    assert positions == sorted(set(positions)) and len(positions) == 1000
    assert [f"t{p}" for p in positions] == whole[1]  # pairs stay pairs
    # Uniform: each tenth of the corpus holds about a tenth of the sample (binomial sd ~9.5).
    counts = np.bincount(np.array(positions) // 2000, minlength=10)
    assert counts.min() > 60 and counts.max() < 140, counts


def test_a_hub_dataset_is_read_from_arrow_in_batches_and_gives_the_same_folder_as_files(corpus, tmp_path, monkeypatch):
    import datasets
    src = (corpus / "train.de").read_text(encoding="utf-8").splitlines()
    tgt = (corpus / "train.en").read_text(encoding="utf-8").splitlines()
    table = datasets.Dataset.from_dict({"translation": [{"de": s, "en": t} for s, t in zip(src, tgt)]})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split: table)
    monkeypatch.setattr(prepare_module, "CHUNK_PAIRS", 64)  # several Arrow batches
    files = load_config(CONFIG, prepared(corpus, tmp_path / "run", tmp_path / "files", tokenizer_cache_dir=tmp_path / "tok"))
    hub = load_config(CONFIG, prepared(tmp_path / "absent", tmp_path / "run", tmp_path / "hub", "data.hub_name=wmt14",
                                       "data.hub_field=translation", tokenizer_cache_dir=tmp_path / "tokenizers"))
    prepare_module.prepare(files)
    prepare_module.prepare(hub)
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("files", "hub")]
    assert manifests[0]["files"] == manifests[1]["files"]  # two tokenizer trainings, the same bytes
    assert manifests[1]["inputs"][0]["fingerprint"] == table._fingerprint
    assert prepare_module.stale_reason(hub) is None
