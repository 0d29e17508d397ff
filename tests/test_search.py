"""Greedy and beam search against ground truth: hand-computed fake decoders and exhaustive search."""

import itertools
import math

import pytest
import torch
from helpers import random_model, random_source
from torch import Tensor, nn

import transformer.decoding.search as search
from transformer.decoding.search import Hypothesis, beam_search, greedy_search, length_penalty_factor, top_k
from transformer.model import DecoderCache, Transformer

PAD, UNK, BOS, EOS = 0, 1, 2, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def sequence_log_probs(model: Transformer, src: Tensor, outputs: list[list[int]]) -> list[float]:
    """log p(y + [EOS] | src) for each output y of the single source `src` (1, S), in float64."""
    with torch.no_grad():
        model = model.double()
        width = max(len(y) for y in outputs) + 1
        tgt_in = torch.full((len(outputs), width), PAD)
        tgt_out = torch.full((len(outputs), width), PAD)
        for i, y in enumerate(outputs):
            tgt_in[i, : len(y) + 1] = torch.tensor([BOS] + y)
            tgt_out[i, : len(y) + 1] = torch.tensor(y + [EOS])
        log_probs = model(src.expand(len(outputs), -1), tgt_in).log_softmax(dim=-1)
        picked = log_probs.gather(2, tgt_out.unsqueeze(2)).squeeze(2).masked_fill(tgt_out == PAD, 0.0)
    return picked.sum(dim=1).tolist()


def exhaustive_ranking(model: Transformer, src: Tensor, max_len: int, alpha: float) -> list[Hypothesis]:
    """Every output of at most `max_len` tokens (PAD, BOS and EOS excluded), best first."""
    vocab = model.output_projection.out_features
    tokens = [t for t in range(vocab) if t not in (PAD, BOS, EOS)]
    outputs = [list(y) for n in range(max_len + 1) for y in itertools.product(tokens, repeat=n)]
    scores = sequence_log_probs(model, src, outputs)
    ranked = [Hypothesis(y, s / length_penalty_factor(len(y) + 1, alpha)) for y, s in zip(outputs, scores)]
    return sorted(ranked, key=lambda h: -h.score)


def test_beam_size_one_is_greedy():
    lengths = [7, 3, 9, 5, 2]
    stopped_by = set()
    for seed in range(4):
        model = random_model(seed, dtype=torch.float32)
        src = random_source(seed, lengths)
        greedy = greedy_search(model, src, max_len_a=1.0, max_len_b=3)
        beam = beam_search(model, src, beam_size=1, length_penalty=0.6, max_len_a=1.0, max_len_b=3)
        assert [h[0].tokens for h in beam] == greedy
        stopped_by |= {"max_len" if len(y) == n + 3 else "eos" for y, n in zip(greedy, lengths)}
    assert stopped_by == {"max_len", "eos"}  # both ways of ending were exercised


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_finds_the_exhaustive_optimum(seed, alpha):
    # Vocabulary of 6: PAD, UNK, BOS, EOS and two words, so UNK and the two words can be generated.
    # A beam of 3^3 + 3^2 keeps every prefix and ranks every EOS among the first K candidates at
    # every step up to the maximum length of 3, so beam search must then return the true optimum of
    # the length-penalised score, and its n-best list the true ranking.
    model = random_model(seed, vocab=6)
    src = random_source(seed, [4, 2], vocab=6)
    beam = beam_search(model, src, beam_size=36, length_penalty=alpha, max_len_a=0.0, max_len_b=3, n_best=5)
    for i in range(src.size(0)):
        truth = exhaustive_ranking(model, src[i : i + 1], max_len=3, alpha=alpha)
        assert beam[i][0].tokens == truth[0].tokens
        assert [h.tokens for h in beam[i]] == [h.tokens for h in truth[:5]]
        assert [h.score for h in beam[i]] == pytest.approx([h.score for h in truth[:5]], abs=1e-9)


class FixedDecoder(nn.Module):
    """A fake model whose next-token probabilities depend only on the target prefix, by a table.

    Prefixes missing from the table end with certainty (EOS has probability 1).
    """

    pad_id = PAD

    def __init__(self, table: dict[tuple[int, ...], dict[int, float]], vocab: int = 6) -> None:
        super().__init__()
        self.table, self.vocab = table, vocab
        self.steps = 0  # decode calls

    def encode(self, src: Tensor) -> Tensor:
        return torch.zeros(*src.shape, 1, dtype=torch.float64)

    def padding_mask(self, src: Tensor) -> Tensor:
        return src.eq(PAD)

    def new_cache(self) -> DecoderCache:
        return DecoderCache.empty(1)

    def project(self, hidden: Tensor) -> Tensor:
        return hidden  # decode_hidden already gives the log-probabilities

    def decode_hidden(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor, cache=None) -> Tensor:
        assert cache is None, "FixedDecoder needs the whole prefix"
        self.steps += 1
        probs = torch.zeros(tgt.size(0), tgt.size(1), self.vocab, dtype=torch.float64)
        for i, row in enumerate(tgt.tolist()):
            for token, p in self.table.get(tuple(row[1:]), {EOS: 1.0}).items():
                probs[i, -1, token] = p
        return probs.log()


A, B_ = 4, 5
# Greedy takes A (0.5) then A (0.4 > 0.35), and the forced EOS gives p = 0.5 * 0.4 * 0.2 = 0.04;
# a beam of 2 keeps B (0.4) and finds B EOS with p = 0.4 * 0.9 = 0.36.
GARDEN_PATH = {
    (): {A: 0.5, B_: 0.4, EOS: 0.1},
    (A,): {A: 0.4, B_: 0.25, EOS: 0.35},
    (B_,): {A: 0.05, B_: 0.05, EOS: 0.9},
    (A, A): {A: 0.5, B_: 0.3, EOS: 0.2},
    (A, B_): {A: 0.25, B_: 0.25, EOS: 0.5},
}


def test_fixed_decoder_greedy_path_differs_from_beam():
    model, src = FixedDecoder(GARDEN_PATH), torch.tensor([[4, EOS]])
    assert greedy_search(model, src, max_len_a=0.0, max_len_b=2, use_cache=False) == [[A, A]]
    model.steps = 0
    beam = beam_search(model, src, beam_size=2, length_penalty=0.6, max_len_a=0.0, max_len_b=2, use_cache=False)
    assert beam[0][0].tokens == [B_]
    assert beam[0][0].score == pytest.approx(math.log(0.36) / ((5 + 2) / 6) ** 0.6, abs=1e-12)
    # After step 1 the best active prefix, A A with p = 0.2, can at best score log 0.2 / lp(3) =
    # -1.35 < -0.93 for B EOS: the search stops there instead of decoding step 2.
    assert model.steps == 2


def test_fixed_decoder_beam_follows_the_documented_rules():
    # Step 0: A, B, EOS ranked; EOS is third, beyond K = 2, so it is not finished. Step 1: B EOS
    # (0.36) finishes; the beam continues with A A (0.2) and A B (0.125), but A EOS (0.175) ranked
    # third is dropped. Step 2 is the maximum length: EOS is forced on A A and A B, whose forced EOS
    # probabilities count: 0.2 * 0.2 = 0.04 and 0.125 * 0.5 = 0.0625.
    model, src = FixedDecoder(GARDEN_PATH), torch.tensor([[4, EOS]])
    beam = beam_search(model, src, beam_size=2, length_penalty=0.0, max_len_a=0.0, max_len_b=2, n_best=2,
                       use_cache=False)
    assert [h.tokens for h in beam[0]] == [[B_], [A, B_]]
    assert [h.score for h in beam[0]] == pytest.approx([math.log(0.36), math.log(0.0625)], abs=1e-12)


@pytest.mark.parametrize("alpha, expected", [(0.0, []), (2.0, [A])])
def test_fixed_decoder_length_penalty_changes_the_winner(alpha, expected):
    # Empty output: log 0.3 / lp(1) = -1.204; A EOS: log(0.7 * 0.35) / lp(2) = -1.406 / (7/6)^alpha,
    # which wins for alpha = 2 (-1.033) but not for alpha = 0.
    model = FixedDecoder({(): {A: 0.7, EOS: 0.3}, (A,): {A: 0.65, EOS: 0.35}})
    beam = beam_search(model, torch.tensor([[4, EOS]]), beam_size=2, length_penalty=alpha, max_len_a=0.0,
                       max_len_b=5, use_cache=False)
    assert beam[0][0].tokens == expected


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_batched_equals_one_sentence_at_a_time(search):
    model = random_model(7)
    lengths = [6, 2, 9, 4]
    src = random_source(7, lengths)

    def run(x: Tensor):
        if search == "greedy":
            return greedy_search(model, x, max_len_b=6)
        return [[(h.tokens, round(h.score, 9)) for h in hs]
                for hs in beam_search(model, x, beam_size=3, max_len_b=6, n_best=3)]

    alone = [run(src[i : i + 1, :n])[0] for i, n in enumerate(lengths)]
    assert run(src) == alone


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_cached_equals_uncached(dtype, positional):
    model = random_model(3, dtype=dtype, positional=positional, max_len=64)
    src = random_source(3, [5, 8, 3])
    assert greedy_search(model, src, max_len_b=8) == greedy_search(model, src, max_len_b=8, use_cache=False)
    cached = beam_search(model, src, beam_size=4, max_len_b=8, n_best=4)
    uncached = beam_search(model, src, beam_size=4, max_len_b=8, n_best=4, use_cache=False)
    assert [[h.tokens for h in hs] for hs in cached] == [[h.tokens for h in hs] for hs in uncached]
    tolerance = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 0.05}[dtype]
    for a, b in zip(cached, uncached):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=tolerance)


@pytest.mark.parametrize("n_best", [1, 3, 5])
def test_n_best_lists_are_sorted_full_and_correctly_scored(n_best):
    alpha = 0.6
    model = random_model(11)
    src = random_source(11, [5, 3, 7])
    beam = beam_search(model, src, beam_size=5, length_penalty=alpha, max_len_b=10, n_best=n_best)
    for i, hypotheses in enumerate(beam):
        assert len(hypotheses) == n_best
        scores = [h.score for h in hypotheses]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hypotheses}) == n_best
        assert all(PAD not in h.tokens and BOS not in h.tokens and EOS not in h.tokens for h in hypotheses)
        rescored = sequence_log_probs(model, src[i : i + 1], [h.tokens for h in hypotheses])
        expected = [s / length_penalty_factor(len(h.tokens) + 1, alpha) for s, h in zip(rescored, hypotheses)]
        assert scores == pytest.approx(expected, abs=1e-9)


def test_maximum_length_follows_source_length_and_learned_positions():
    model = random_model(5, positional="learned", max_len=6)
    src = random_source(5, [3, 6])
    outputs = greedy_search(model, src, max_len_a=2.0, max_len_b=50)  # would allow 56 and 62 tokens
    assert all(len(y) <= 5 for y in outputs)  # positions 0..5: BOS and at most 5 tokens
    assert greedy_search(model, src, max_len_a=0.0, max_len_b=0) == [[], []]
    assert [h[0].tokens for h in beam_search(model, src, max_len_a=0.0, max_len_b=0)] == [[], []]


def test_finished_sentences_leave_the_batch():
    model = random_model(2)
    src = random_source(2, [2, 9, 4, 6])
    rows: list[int] = []
    decode_hidden = model.decode_hidden

    def spy(tgt: Tensor, *args, **kwargs) -> Tensor:
        rows.append(tgt.size(0))
        return decode_hidden(tgt, *args, **kwargs)

    model.decode_hidden = spy
    outputs = greedy_search(model, src, max_len_a=0.0, max_len_b=12)
    assert rows[0] == 4 and rows == sorted(rows, reverse=True)
    assert len(rows) == max(len(y) for y in outputs) + 1
    assert sum(rows) == sum(len(y) + 1 for y in outputs)  # one decoder row per generated token

    rows.clear()
    beam_search(model, src, beam_size=3, max_len_a=1.0, max_len_b=2)  # maximum lengths 4, 11, 6, 8
    # The first step decodes one row per sentence (its K rows are the same BOS prefix), then K.
    assert rows[0] == 4 and rows[1] == 12 and rows[1:] == sorted(rows[1:], reverse=True) and rows[-1] == 3


def test_invalid_settings_are_rejected():
    model, src = random_model(0), random_source(0, [3])
    with pytest.raises(ValueError, match="n_best"):
        beam_search(model, src, beam_size=2, n_best=3)
    with pytest.raises(ValueError, match="length_penalty"):
        beam_search(model, src, length_penalty=-1.0)
    with pytest.raises(ValueError, match="max_len_a"):
        greedy_search(model, src, max_len_a=-1.0)


@pytest.mark.parametrize("V, k, block", [(103, 5, 4), (96, 8, 8), (40, 3, 16), (64, 1, 4), (30, 30, 4)])
def test_top_k_equals_torch_topk(V, k, block):
    """Blocks of `block` columns, with and without a partial last block, k above and below the block count."""
    x = torch.randn(50, V, generator=torch.Generator().manual_seed(V + k))
    x[3] = -math.inf  # a row with nothing allowed
    x[4, :-1] = -math.inf  # only the last column allowed
    x[5] = x[5].abs().neg().sort(descending=True).values  # the best entries in the first block
    values, ids = top_k(x, k, block)
    expected_values, expected_ids = x.topk(k, dim=-1)
    torch.testing.assert_close(values, expected_values, atol=0, rtol=0)
    finite = expected_values.isfinite()
    assert torch.equal(ids[finite], expected_ids[finite])  # random values: no ties among finite ones
    assert torch.equal(x.gather(1, ids), values)


def test_top_k_of_a_non_contiguous_matrix():
    x = torch.randn(300, 40, generator=torch.Generator().manual_seed(1)).t()  # (40, 300), strided
    values, ids = top_k(x, 4, block=16)
    expected_values, expected_ids = x.topk(4, dim=-1)
    assert torch.equal(values, expected_values) and torch.equal(ids, expected_ids)


def test_beam_search_with_blockwise_top_k_equals_torch_topk(monkeypatch):
    """A vocabulary wide enough for `top_k`'s blocks gives the same n-best lists as torch.topk."""
    model = random_model(5, vocab=700)
    src = random_source(5, [4, 7, 2])
    fast = beam_search(model, src, beam_size=4, n_best=4, max_len_b=5)
    monkeypatch.setattr(search, "top_k", lambda x, k: x.topk(k, dim=-1))
    assert beam_search(model, src, beam_size=4, n_best=4, max_len_b=5) == fast
