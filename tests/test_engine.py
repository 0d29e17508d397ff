"""The engine interface: one DecodeConfig in, n-best lists with scores out, from every engine; and the
settings built once from a checkpoint's config with the command line's options over it."""

import dataclasses

import pytest
import torch

from transformer.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from transformer.commands import evaluate, options
from transformer.config import DecodeConfig
from transformer.decoding.engine import Candidate
from transformer.decoding.rerank import ChannelReranker, channel_log_probs
from transformer.decoding.search import Hypothesis, beam_search, greedy_search
from transformer.decoding.translator import RerankingEngine, TorchEngine, source_ids, translate, translate_ids

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = ["ein mann spielt mit einem ball", "", "eine frau läuft im park", "kind", "der hund spielt im park"]


@pytest.fixture(scope="module")
def loaded(tiny_run):
    return load_model([tiny_run / "checkpoints" / "step_1.pt"])


def test_the_torch_engine_returns_the_beams_n_best_lists_with_their_scores(loaded):
    engine = TorchEngine(loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer)
    # One sentence per batch (a budget of 1 token), so that each list is the search of that sentence alone.
    settings = DecodeConfig(beam_size=3, n_best=3, max_len_b=6, batch_tokens=1)
    sources = source_ids(loaded.src_tokenizer, SENTENCES)
    found = engine.search(sources, settings)
    assert found[1] == [Hypothesis([], None)]  # an empty source: one empty output, not scored
    for ids, hypotheses in zip(sources, found):
        if ids:
            expected = beam_search(loaded.model, torch.tensor([ids]), 3, settings.length_penalty, 1.0, 6, n_best=3)[0]
            assert hypotheses == expected and len(hypotheses) == 3
    candidates = engine.translate(SENTENCES, settings)
    assert candidates == [[Candidate(loaded.tgt_tokenizer.decode(h.tokens), h.score) for h in hs] for hs in found]
    # The functions of loose arguments give the best of each list.
    assert translate_ids(loaded.model, sources, 3, settings.length_penalty, 1.0, 6, 1) == [hs[0].tokens for hs in found]
    assert translate(loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, SENTENCES, beam_size=3, max_len_b=6,
                     batch_tokens=1) == [c[0].text for c in candidates]


def test_a_beam_of_one_is_greedy_search_with_one_unscored_output(loaded):
    engine = TorchEngine(loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer)
    sources = source_ids(loaded.src_tokenizer, SENTENCES)
    found = engine.search(sources, DecodeConfig(beam_size=1, max_len_b=6, batch_tokens=1))
    for ids, hypotheses in zip(sources, found):
        expected = greedy_search(loaded.model, torch.tensor([ids]), 1.0, 6)[0] if ids else []
        assert hypotheses == [Hypothesis(expected, None)]
    with pytest.raises(ValueError, match="n_best=2"):
        engine.search(sources, DecodeConfig(beam_size=1, n_best=2))


def test_an_engine_refuses_a_length_penalty_of_the_other_form(loaded, tiny_ctranslate2):
    from transformer.decoding.ctranslate2_engine import CTranslate2Model

    sources = source_ids(loaded.src_tokenizer, SENTENCES)
    with pytest.raises(ValueError, match="'gnmt', not 'length'"):
        TorchEngine(loaded.model).search(sources, DecodeConfig(length_penalty_form="length"))
    with pytest.raises(ValueError, match="'length'.*not 'gnmt'"):
        CTranslate2Model(tiny_ctranslate2, "float32", threads=1).search(sources, DecodeConfig())


def test_reranking_ranks_every_candidate_by_the_noisy_channel_score(loaded, tiny_run):
    reverse = load_model([tiny_run / "checkpoints" / "step_2.pt"]).model
    sources = source_ids(loaded.src_tokenizer, SENTENCES)
    settings = DecodeConfig(beam_size=3, n_best=3, max_len_b=6, rerank_weight=20.0)
    ranked = RerankingEngine(loaded.model, reverse).search(sources, settings)
    beams = TorchEngine(loaded.model).search(sources, settings)
    assert ranked[1] == [Hypothesis([], None)]
    for x, candidates, beam in zip(sources, ranked, beams):
        if not x:
            continue
        assert sorted(h.tokens for h in candidates) == sorted(h.tokens for h in beam)  # the same K candidates
        scores = [h.score for h in candidates]
        assert scores == sorted(scores, reverse=True)
        channel = channel_log_probs(reverse, [x] * len(beam), [h.tokens for h in beam])
        expected = {tuple(h.tokens): h.score + 20.0 * c / len(x) for h, c in zip(beam, channel)}
        assert scores == pytest.approx([expected[tuple(h.tokens)] for h in candidates])
    # The best of each list is what translate_ids chooses with the reranker; n_best cuts the lists.
    chosen = translate_ids(loaded.model, sources, 3, settings.length_penalty, 1.0, 6,
                           reranker=ChannelReranker(reverse, 20.0))
    assert chosen == [hs[0].tokens for hs in ranked]
    best_two = RerankingEngine(loaded.model, reverse).search(sources, dataclasses.replace(settings, n_best=2))
    assert best_two == [hs[:2] for hs in ranked]


def test_the_ctranslate2_engine_returns_n_best_lists_with_its_scores(loaded, tiny_ctranslate2):
    from transformer.decoding.ctranslate2_engine import CTranslate2Model

    engine = CTranslate2Model(tiny_ctranslate2, "float32", threads=1, max_src_len=64)
    settings = DecodeConfig(engine="ctranslate2", length_penalty_form="length", length_penalty=1.0, beam_size=3,
                            n_best=2, max_len_b=6)
    found = engine.search(source_ids(loaded.src_tokenizer, SENTENCES), settings)
    assert found[1] == [Hypothesis([], None)]
    for hypotheses in found[:1] + found[2:]:
        assert len(hypotheses) == 2 and hypotheses[0].score >= hypotheses[1].score
    best = engine.translate_ids(source_ids(loaded.src_tokenizer, SENTENCES), 3, 1.0, 1.0, 6)
    assert best == [hs[0].tokens for hs in found]
    # evaluate takes any engine, and scores the best of each list.
    result = evaluate.evaluate(engine, SENTENCES, SENTENCES, settings)
    assert result["hypotheses"] == [c[0].text for c in engine.translate(SENTENCES, settings)]


def test_decode_settings_are_the_checkpoints_with_the_options_over_them(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "step_1.pt"
    # A checkpoint written before the newer decode keys existed gets their defaults.
    state = load_checkpoint(ckpt)
    state.pop("format")
    for key in ("n_best", "length_penalty_form", "use_cache", "engine", "rerank_with", "rerank_weight"):
        del state["config"]["decode"][key]
    save_checkpoint(state, tmp_path / "older.pt")
    decode = load_model([tmp_path / "older.pt"]).config.decode
    assert decode == load_model([ckpt]).config.decode == DecodeConfig(beam_size=2, max_len_a=1.0, max_len_b=4)

    parser = evaluate._parser()
    args = parser.parse_args(["--checkpoint", str(ckpt), "--beam", "3", "--alpha", "1.5", "--batch-tokens", "99",
                              "--no-cache", "--rerank-with", "a.pt", "b.pt", "--rerank-weight", "2"])
    assert options.decode_settings(decode, args) == dataclasses.replace(
        decode, beam_size=3, length_penalty=1.5, batch_tokens=99, use_cache=False, rerank_with=["a.pt", "b.pt"],
        rerank_weight=2.0)
    assert options.decode_settings(decode, parser.parse_args(["--checkpoint", str(ckpt)])) == decode
    greedy = parser.parse_args(["--checkpoint", str(ckpt), "--beam", "1"])
    with pytest.raises(CheckpointError, match="decode.n_best must be >= 1 and at most decode.beam_size"):
        options.decode_settings(dataclasses.replace(decode, n_best=2), greedy)
