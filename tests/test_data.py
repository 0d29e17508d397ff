"""Data pipeline: loading errors, real Multi30k counts, encoding, batching, sharding, collation."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from transformer.config import DataConfig, TokenizerConfig
from transformer.data.batches import (
    Batch,
    BatchSampler,
    DataError,
    ParallelData,
    collate,
    encode_pairs,
    load_split,
    make_batches,
)
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer

# shared/ lies beside the repository, in development and in CI.
MULTI30K = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k")


def _cfg(folder: Path, **kw) -> DataConfig:
    return DataConfig(local_dir=str(folder), **kw)


# --- loading -------------------------------------------------------------------------------------


def test_real_multi30k_sizes():
    cfg = DataConfig(local_dir=MULTI30K)  # absent folder must fail the test, not skip it
    sizes = {split: load_split(cfg, split) for split in ("train", "valid", "test")}
    assert {k: (len(s), len(t)) for k, (s, t) in sizes.items()} == {
        "train": (29000, 29000), "valid": (1014, 1014), "test": (1000, 1000)}
    src, tgt = sizes["valid"]
    assert src[0] == "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen"
    assert tgt[0].startswith("A group of men are loading cotton")
    assert all(s == s.strip() for s in src + tgt)


def test_other_language_pair():
    src, tgt = load_split(DataConfig(local_dir=MULTI30K, src_lang="en", tgt_lang="fr"), "test")
    assert len(src) == len(tgt) == 1000


def test_suffixes_and_whitespace(tmp_path: Path):
    (tmp_path / "train.de.txt").write_text("  ein Hund \r\nzwei\u2028Katzen\n\n", encoding="utf-8")
    with gzip.open(tmp_path / "train.en.txt.gz", "wt", encoding="utf-8") as f:
        f.write("a dog\ntwo\u2028cats\n\t\n")
    src, tgt = load_split(_cfg(tmp_path), "train")
    # Only "\n" ends a line: U+2028 inside a sentence must not shift the alignment.
    assert src == ["ein Hund", "zwei\u2028Katzen", ""]
    assert tgt == ["a dog", "two\u2028cats", ""]


def test_gz_preferred_over_plain(tmp_path: Path):
    (tmp_path / "val.de").write_text("plain\n")
    with gzip.open(tmp_path / "val.de.gz", "wt") as f:
        f.write("zipped\n")
    (tmp_path / "val.en").write_text("x\n")
    assert load_split(_cfg(tmp_path), "valid") == (["zipped"], ["x"])


def test_line_count_mismatch_names_both_files(tmp_path: Path):
    (tmp_path / "train.de").write_text("a\nb\nc\n")
    (tmp_path / "train.en").write_text("a\nb\n")
    with pytest.raises(DataError) as e:
        load_split(_cfg(tmp_path), "train")
    msg = str(e.value)
    assert f"{tmp_path / 'train.de'} has 3 lines" in msg and f"{tmp_path / 'train.en'} has 2 lines" in msg
    assert "\n" not in msg


def test_bad_utf8_names_file_and_line(tmp_path: Path):
    (tmp_path / "train.de").write_bytes("ok\nnoch ok\nkaputt \xff hier\n".encode("latin-1"))
    (tmp_path / "train.en").write_text("a\nb\nc\n")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'train.de'}:3: invalid UTF-8 byte b'\\xff'$"):
        load_split(_cfg(tmp_path), "train")


def test_bad_utf8_in_gzip(tmp_path: Path):
    with gzip.open(tmp_path / "train.de.gz", "wb") as f:
        f.write(b"\xc3\n")
    (tmp_path / "train.en").write_text("a\n")
    with pytest.raises(DataError, match=r"train.de.gz:1: invalid UTF-8"):
        load_split(_cfg(tmp_path), "train")


def test_missing_file_names_path_and_suffixes(tmp_path: Path):
    (tmp_path / "test_2016_flickr.de").write_text("a\n")
    with pytest.raises(DataError) as e:
        load_split(_cfg(tmp_path), "test")
    assert str(e.value) == (f"missing file {tmp_path / 'test_2016_flickr.en'}[suffix]; "
                            "tried suffixes '.gz', '.txt.gz', '', '.txt'")


def test_corrupt_gzip(tmp_path: Path):
    (tmp_path / "train.de.gz").write_bytes(b"not gzip at all")
    (tmp_path / "train.en").write_text("a\n")
    with pytest.raises(DataError, match=r"train.de.gz: cannot read"):
        load_split(_cfg(tmp_path), "train")


def test_unknown_split_and_no_source(tmp_path: Path):
    with pytest.raises(DataError, match=r"unknown split 'dev'"):
        load_split(_cfg(tmp_path), "dev")
    with pytest.raises(DataError, match=r"no data source"):
        load_split(DataConfig(), "train")
    with pytest.raises(DataError, match=r"data.local_dir '.*nowhere' is not a folder and data.hub_name"):
        load_split(_cfg(tmp_path / "nowhere"), "train")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_hub_loader_top_level_and_nested_columns(tmp_path: Path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    flat, nested = tmp_path / "flat", tmp_path / "nested"
    flat.mkdir(), nested.mkdir()
    _write_jsonl(flat / "validation.jsonl", [{"de": " Hallo ", "en": "Hello"}, {"de": "Ja", "en": "Yes"}])
    _write_jsonl(nested / "test.jsonl", [{"translation": {"de": "Hallo", "en": "Hello"}}])
    # local_dir that does not exist falls through to the hub source.
    cfg = DataConfig(local_dir=str(tmp_path / "absent"), hub_name=str(flat))
    assert load_split(cfg, "valid") == (["Hallo", "Ja"], ["Hello", "Yes"])
    cfg = DataConfig(hub_name=str(nested), hub_field="translation")
    assert load_split(cfg, "test") == (["Hallo"], ["Hello"])
    with pytest.raises(DataError, match=r"no column 'fr'; columns are \['de', 'en'\]"):
        load_split(DataConfig(hub_name=str(flat), tgt_lang="fr"), "valid")
    with pytest.raises(DataError, match=r"row 0 of 'translation' has no 'fr'"):
        load_split(DataConfig(hub_name=str(nested), hub_field="translation", tgt_lang="fr"), "test")
    with pytest.raises(DataError, match=r"split 'train'\): cannot load"):
        load_split(DataConfig(hub_name=str(nested)), "train")


# --- encoding ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["ein Hund läuft", "a dog runs", "zwei Katzen schlafen", "two cats sleep"] * 20
    return train_tokenizer(texts, TokenizerConfig(vocab_size=100), tmp_path_factory.mktemp("t") / "spm")


def test_encode_pairs_drops_and_counts(tok):
    long = " ".join(["Hund"] * 50)
    src = ["ein Hund", "", "zwei Katzen", long, "ein Hund läuft"]
    tgt = ["a dog", "two cats", "", "a dog", "a dog runs"]
    data = encode_pairs(src, tgt, tok, tok, max_len=10)
    assert (data.n_dropped_empty, data.n_dropped_long) == (2, 1)
    assert data.indices == [0, 4] and len(data) == 2
    assert data.src[0] == tok.encode("ein Hund") + [EOS_ID]
    assert data.tgt[0] == tok.encode("a dog")
    assert data.src_lens == [len(s) for s in data.src]
    assert data.tgt_lens == [len(t) + 1 for t in data.tgt]

    kept = encode_pairs(src, tgt, tok, tok, max_len=10, drop=False)
    assert kept.indices == [0, 1, 2, 3, 4] and (kept.n_dropped_empty, kept.n_dropped_long) == (0, 0)
    assert kept.src[1] == [EOS_ID] and kept.tgt[2] == []

    with pytest.raises(DataError, match="5 source sentences but 4 target sentences"):
        encode_pairs(src, tgt[:4], tok, tok, max_len=10)


# --- batching ------------------------------------------------------------------------------------


def _lengths(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(2, 60, (n,), generator=g).tolist(),
            torch.randint(2, 60, (n,), generator=g).tolist())


def test_batches_respect_budget_and_cover_every_index():
    src_lens, tgt_lens = _lengths(3000)
    src_lens[7] = 500  # longer than the budget on its own
    batches = make_batches(src_lens, tgt_lens, max_tokens=400)
    assert sorted(i for b in batches for i in b) == list(range(3000))
    for b in batches:
        width = max(max(src_lens[i], tgt_lens[i]) for i in b)
        assert len(b) * width <= 400 or b == [7]
    assert [7] in batches
    assert batches == make_batches(src_lens, tgt_lens, max_tokens=400)
    # Bucketing keeps padding low: most padded slots hold real tokens.
    real = sum(tgt_lens)
    padded = sum(len(b) * max(tgt_lens[i] for i in b) for b in batches)
    assert real / padded > 0.9


def test_make_batches_edge_cases():
    assert make_batches([], [], 100) == []
    assert make_batches([3, 3, 3], [3, 3, 3], 9) == [[0, 1, 2]]
    assert make_batches([3, 3, 3], [3, 3, 3], 8) == [[0, 1], [2]]
    with pytest.raises(ValueError):
        make_batches([1], [1, 2], 10)


def test_shuffle_deterministic_per_seed_and_epoch():
    batches = make_batches(*_lengths(2000), max_tokens=300)
    sampler = BatchSampler(batches, seed=5)
    e0, e1 = sampler.epoch_batches(0), sampler.epoch_batches(1)
    assert e0 == BatchSampler(batches, seed=5).epoch_batches(0)
    assert e0 != e1 and e0 != batches
    assert sorted(map(tuple, e0)) == sorted(map(tuple, batches)) == sorted(map(tuple, e1))
    assert BatchSampler(batches, seed=6).epoch_batches(0) != e0
    assert len(sampler) == len(batches)


def test_ddp_shards_disjoint_and_equal():
    batches = make_batches(*_lengths(2000), max_tokens=300)
    world = 4
    assert len(batches) % world != 0  # exercise the truncation
    shards = [BatchSampler(batches, seed=1, rank=r, world_size=world).epoch_batches(4) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == len(batches) // world
    seen = [tuple(b) for s in shards for b in s]
    assert len(seen) == len(set(seen))
    assert len(seen) >= len(batches) - world + 1
    with pytest.raises(ValueError):
        BatchSampler(batches, seed=1, rank=4, world_size=4)
    with pytest.raises(ValueError):
        BatchSampler([[0]], seed=1, rank=0, world_size=2)


# --- collation -----------------------------------------------------------------------------------


def test_collate_shapes_and_special_tokens():
    data = ParallelData(src=[[5, 6, EOS_ID], [7, EOS_ID]], tgt=[[8], [9, 10, 11]], indices=[0, 1])
    batch = collate([1, 0], data)
    assert isinstance(batch, Batch)
    assert batch.src.tolist() == [[7, EOS_ID, PAD_ID], [5, 6, EOS_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 9, 10, 11], [BOS_ID, 8, PAD_ID, PAD_ID]]
    assert batch.tgt_out.tolist() == [[9, 10, 11, EOS_ID], [8, EOS_ID, PAD_ID, PAD_ID]]
    assert batch.src.dtype == batch.tgt_in.dtype == torch.long
    assert (batch.n_src_tokens, batch.n_tgt_tokens) == (5, 6)
    assert batch.n_tgt_tokens == int((batch.tgt_out != PAD_ID).sum())
    assert batch.indices == [1, 0]
    moved = batch.to("cpu")
    assert torch.equal(moved.tgt_out, batch.tgt_out) and moved.n_src_tokens == 5
    with pytest.raises(ValueError):
        collate([], data)


def test_end_to_end_on_real_validation(tok):
    src, tgt = load_split(DataConfig(local_dir=MULTI30K), "valid")
    data = encode_pairs(src, tgt, tok, tok, max_len=128, drop=False)
    assert len(data) == 1014
    batches = make_batches(data.src_lens, data.tgt_lens, max_tokens=2000)
    for b in batches:
        batch = collate(b, data)
        assert batch.src.numel() <= 2000 and batch.tgt_out.numel() <= 2000
