"""SentencePiece tokenizers: fixed special ids, round trips, caching, joint vs separate models."""

import gzip
import logging
from pathlib import Path

import pytest

from transformer.config import TokenizerConfig
from transformer.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    Tokenizer,
    copy_tokenizers,
    load_or_train_tokenizers,
    load_tokenizers,
    train_tokenizer,
)

# shared/ lies beside the repository, in development and in CI.
MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
N_TRAIN = 3000  # enough for a realistic vocabulary, small enough to train in well under a second


def _lines(name: str) -> list[str]:
    with gzip.open(MULTI30K / name, "rt", encoding="utf-8") as f:
        return [line.strip() for line in f][:N_TRAIN]


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    return _lines("train.de.gz"), _lines("train.en.gz")


@pytest.fixture(scope="module")
def joint(corpus, tmp_path_factory) -> Tokenizer:
    cfg = TokenizerConfig(vocab_size=1000, cache_dir=str(tmp_path_factory.mktemp("cache")))
    src_tok, _ = load_or_train_tokenizers(cfg, *corpus, "de", "en")
    return src_tok


def test_special_ids_are_fixed(joint: Tokenizer):
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    sp = joint.processor
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert [joint.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]


def test_encode_has_no_specials_and_round_trips(joint: Tokenizer, corpus):
    de, en = corpus
    held_out = [line.strip() for line in gzip.open(MULTI30K / "val.de.gz", "rt")][:200]
    for sentences in (de[:500], en[:500], held_out):
        for s, ids in zip(sentences, joint.encode_batch(sentences)):
            assert ids == joint.encode(s)
            assert not {PAD_ID, BOS_ID, EOS_ID} & set(ids)
            # SentencePiece's default nmt_nfkc normalisation collapses runs of spaces; nothing else
            # changes in this corpus.
            assert joint.decode(ids) == " ".join(s.split())


def test_decode_skips_special_ids(joint: Tokenizer):
    s = "Ein Mann fährt Fahrrad."
    ids = joint.encode(s)
    assert joint.decode([BOS_ID] + ids + [EOS_ID, PAD_ID, PAD_ID]) == s
    assert joint.encode_batch([]) == []


def test_vocab_size_and_determinism(corpus, tmp_path: Path):
    cfg = TokenizerConfig(vocab_size=500)
    a = train_tokenizer(corpus[1], cfg, tmp_path / "a")
    b = train_tokenizer(corpus[1], cfg, tmp_path / "b")
    assert a.vocab_size == 500
    # Compare vocabularies, not files: the file also records its own model_prefix.
    assert [a.id_to_piece(i) for i in range(500)] == [b.id_to_piece(i) for i in range(500)]
    assert [a.processor.get_score(i) for i in range(500)] == [b.processor.get_score(i) for i in range(500)]


def test_tiny_corpus_does_not_crash(tmp_path: Path):
    tok = train_tokenizer(["ein Hund", "eine Katze"] * 3, TokenizerConfig(vocab_size=8000), tmp_path / "t")
    assert 4 < tok.vocab_size < 8000
    assert tok.decode(tok.encode("ein Hund")) == "ein Hund"


def test_unigram(corpus, tmp_path: Path):
    tok = train_tokenizer(corpus[0][:1000], TokenizerConfig(type="unigram", vocab_size=500), tmp_path / "u")
    assert tok.processor.bos_id() == BOS_ID
    assert tok.decode(tok.encode(corpus[0][0])) == " ".join(corpus[0][0].split())


def test_cache_reuses_model(corpus, tmp_path: Path, caplog):
    cfg = TokenizerConfig(vocab_size=500, cache_dir=str(tmp_path))
    with caplog.at_level(logging.INFO, logger="transformer.data.tokenizer"):
        first, _ = load_or_train_tokenizers(cfg, *corpus, "de", "en")
    assert "training" in caplog.text
    mtime = first.path.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="transformer.data.tokenizer"):
        second, _ = load_or_train_tokenizers(cfg, *corpus, "de", "en")
    assert "reusing cached tokenizer" in caplog.text and "training" not in caplog.text
    assert second.path == first.path and second.path.stat().st_mtime_ns == mtime
    assert list(tmp_path.iterdir()) == [first.path]  # no temporary leftovers

    # Any change to the data or the settings gives a different model file.
    changed, _ = load_or_train_tokenizers(cfg, corpus[0][:-1] + ["anders"], corpus[1], "de", "en")
    resized, _ = load_or_train_tokenizers(TokenizerConfig(vocab_size=400, cache_dir=str(tmp_path)),
                                          *corpus, "de", "en")
    assert len({first.path, changed.path, resized.path}) == 3


def test_joint_is_one_object_separate_are_two(corpus, tmp_path: Path):
    src, tgt = load_or_train_tokenizers(
        TokenizerConfig(vocab_size=500, cache_dir=str(tmp_path)), *corpus, "de", "en")
    assert src is tgt
    src, tgt = load_or_train_tokenizers(
        TokenizerConfig(vocab_size=500, joint=False, cache_dir=str(tmp_path)), *corpus, "de", "en")
    assert src is not tgt and src.path != tgt.path
    de_pieces = {src.id_to_piece(i) for i in range(src.vocab_size)}
    en_pieces = {tgt.id_to_piece(i) for i in range(tgt.vocab_size)}
    assert "▁der" in de_pieces and "▁der" not in en_pieces
    assert "▁the" in en_pieces and "▁the" not in de_pieces


def test_copy_and_load_run_tokenizers(corpus, joint: Tokenizer, tmp_path: Path):
    run = tmp_path / "run"
    paths = copy_tokenizers({"de": joint, "en": joint}, run)
    assert paths == {"de": "spm.model", "en": "spm.model"}
    loaded = load_tokenizers(run, paths)
    assert loaded["de"] is loaded["en"]
    assert loaded["de"].encode("Ein Hund läuft.") == joint.encode("Ein Hund läuft.")

    src, tgt = load_or_train_tokenizers(
        TokenizerConfig(vocab_size=500, joint=False, cache_dir=str(tmp_path / "c")), *corpus, "de", "en")
    paths = copy_tokenizers({"de": src, "en": tgt}, run)
    assert paths == {"de": "spm.de.model", "en": "spm.en.model"}
    loaded = load_tokenizers(run, paths)
    assert loaded["en"].vocab_size == tgt.vocab_size and loaded["de"] is not loaded["en"]


def test_load_missing_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.load(tmp_path / "nope.model")
