"""Noisy-channel reranking against the formula computed directly, one pair at a time, in float64."""

import logging

import pytest
import torch

from transformer.data.tokenizer import BOS_ID, EOS_ID
from transformer.decoding.rerank import ChannelReranker, channel_log_probs, rerank
from transformer.decoding.search import Hypothesis, beam_search
from transformer.decoding.translator import translate_ids
from transformer.model import Transformer

VOCAB = 20


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(seed: int, **kwargs) -> Transformer:
    """A small untrained float64 model whose next-token distributions are far from uniform."""
    torch.manual_seed(seed)
    model = Transformer(VOCAB, VOCAB, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=2,
                        dropout=0.0, tie_output=False, **kwargs)
    with torch.no_grad():
        model.output_projection.weight.mul_(4.0)
    return model.double().eval()


def random_sources(seed: int, lengths: list[int]) -> list[list[int]]:
    """Source ids ending with EOS, one per length (EOS included)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n - 1,), generator=generator).tolist() + [EOS_ID] for n in lengths]


def log_prob_of_source(reverse: Transformer, source: list[int], output: list[int]) -> float:
    """log p(source | output + EOS), written out for one pair: no batching, no padding."""
    with torch.no_grad():
        src = torch.tensor([output + [EOS_ID]])
        tgt_in, tgt_out = torch.tensor([[BOS_ID] + source[:-1]]), torch.tensor([source])
        log_probs = reverse(src, tgt_in).log_softmax(dim=-1)
        return log_probs.gather(2, tgt_out.unsqueeze(2)).sum().item()


def test_channel_log_probs_equal_one_pair_at_a_time_whatever_the_batching():
    reverse = random_model(1)
    sources = random_sources(2, [2, 5, 9, 3, 7, 4, 6, 8])
    generator = torch.Generator().manual_seed(3)
    outputs = [torch.randint(4, VOCAB, (n,), generator=generator).tolist() for n in (0, 4, 8, 2, 6, 1, 5, 7)]
    expected = [log_prob_of_source(reverse, x, y) for x, y in zip(sources, outputs)]
    for batch_tokens in (1, 12, 1000):  # one pair per batch, a few pairs, all at once
        found = channel_log_probs(reverse, sources, outputs, batch_tokens)
        assert found == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_reranked_translations_maximise_the_noisy_channel_score():
    forward, reverse = random_model(4), random_model(5)
    sources = random_sources(6, [3, 4, 5, 6, 7, 8, 9, 10, 6, 5])
    K, alpha, weight = 4, 1.0, 3.0
    plain = translate_ids(forward, sources, K, alpha, max_len_b=6)
    # Weight 0 keeps the beam's own choice.
    assert translate_ids(forward, sources, K, alpha, max_len_b=6, reranker=ChannelReranker(reverse, 0.0)) == plain
    reranked = translate_ids(forward, sources, K, alpha, max_len_b=6, batch_tokens=9,
                             reranker=ChannelReranker(reverse, weight))
    changed = 0
    for x, got, first in zip(sources, reranked, plain):
        candidates = beam_search(forward, torch.tensor([x]), K, alpha, max_len_b=6, n_best=K)[0]
        assert len(candidates) == K and candidates[0].tokens == first
        scores = [h.score + weight * log_prob_of_source(reverse, x, h.tokens) / len(x) for h in candidates]
        best = max(range(K), key=lambda k: scores[k])
        assert got == candidates[best].tokens
        assert scores[best] - sorted(scores)[-2] > 1e-6  # not decided by a near-tie
        changed += got != first
    assert changed >= 2  # the reverse model does overrule the beam here


def test_sentences_longer_than_the_reverse_models_positions_keep_the_beams_choice(caplog):
    reverse = random_model(8, positional="learned", max_len=6)
    sources = random_sources(9, [6, 7, 4, 4])  # 7 source ids do not fit 6 positions, 6 do
    generator = torch.Generator().manual_seed(10)

    def candidates(*lengths: int) -> list[Hypothesis]:
        return [Hypothesis(torch.randint(4, VOCAB, (n,), generator=generator).tolist(), -1.0 - 0.01 * k)
                for k, n in enumerate(lengths)]

    # The reverse model reads an output with its EOS: 5 tokens fit its 6 positions, 6 do not.
    beams = [candidates(3, 5, 2), candidates(3, 2, 4), candidates(2, 6, 3), candidates(2, 5, 3)]
    with caplog.at_level(logging.WARNING):
        chosen = rerank(ChannelReranker(reverse, 100.0), sources, beams)
    assert chosen[1] == beams[1][0].tokens and chosen[2] == beams[2][0].tokens
    assert "its 7 source tokens are more than the reranking model's 6 positions" in caplog.text
    assert "an output of 7 tokens is longer than the reranking model's 6 positions" in caplog.text
    assert len(caplog.records) == 2
    for i in (0, 3):  # reranked by the formula
        scores = [h.score + 100.0 * log_prob_of_source(reverse, sources[i], h.tokens) / len(sources[i])
                  for h in beams[i]]
        assert chosen[i] == beams[i][max(range(3), key=lambda k: scores[k])].tokens
    assert chosen[0] != beams[0][0].tokens or chosen[3] != beams[3][0].tokens  # not merely left alone


def test_reranking_rejects_a_negative_weight_and_greedy_search():
    for weight in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight must be finite and >= 0"):
            ChannelReranker(random_model(1), weight)
    with pytest.raises(ValueError, match="beam_size >= 2"):
        translate_ids(random_model(1), random_sources(1, [3]), 1, reranker=ChannelReranker(random_model(2), 0.5))
    with pytest.raises(ValueError, match="3 sources but 2 outputs"):
        channel_log_probs(random_model(1), random_sources(1, [3, 4, 5]), [[4], [5]])
