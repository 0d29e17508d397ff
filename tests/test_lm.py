"""The decoder-only language model: parity with PyTorch's modules, cached decoding and generation,
and the sampling filters on a hand-computed distribution."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transformer.model import TransformerLM, filter_logits, next_token, sinusoidal_table

PAD, BOS, EOS = 0, 2, 3
V = 40


def tiny(dtype: torch.dtype = torch.float64, **kwargs) -> TransformerLM:
    torch.manual_seed(0)
    settings = dict(d_model=32, n_heads=4, d_ff=64, n_layers=2) | kwargs
    return TransformerLM(V, **settings).to(dtype).eval()


@pytest.mark.usefixtures("attention_kernel")  # both CPU attention paths (conftest.py)
@pytest.mark.parametrize("norm_first", [False, True])
def test_matches_torch_encoder_with_causal_mask_and_tied_projection(norm_first):
    """The whole model on copied weights: nn.Embedding * sqrt(D) + sinusoids, nn.TransformerEncoder
    with a causal mask, then the embedding matrix as the output projection."""
    ours = tiny(norm_first=norm_first, activation="gelu")
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, activation="gelu", batch_first=True,
                                       norm_first=norm_first, dtype=torch.float64)
    ref = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32, dtype=torch.float64) if norm_first else None,
                                enable_nested_tensor=False).eval()
    with torch.no_grad():
        for ours_layer, ref_layer in zip(ours.decoder.layers, ref.layers):
            ref_layer.self_attn.in_proj_weight.copy_(ours_layer.self_attn.in_proj.weight)
            ref_layer.self_attn.in_proj_bias.copy_(ours_layer.self_attn.in_proj.bias)
            ref_layer.self_attn.out_proj.load_state_dict(ours_layer.self_attn.out_proj.state_dict())
            for name in ("linear1", "linear2"):
                getattr(ref_layer, name).load_state_dict(getattr(ours_layer.ff, name).state_dict())
            for name in ("norm1", "norm2"):
                getattr(ref_layer, name).load_state_dict(getattr(ours_layer, name).state_dict())
        if norm_first:
            ref.norm.load_state_dict(ours.decoder.norm.state_dict())
    tokens = torch.randint(4, V, (3, 10))
    # The positions buffer is built in float32, then cast with the model.
    x = F.embedding(tokens, ours.embed.weight) * math.sqrt(32) + sinusoidal_table(10, 32).double()
    causal = nn.Transformer.generate_square_subsequent_mask(10, dtype=torch.float64)
    expected = ref(x, mask=causal, is_causal=True) @ ours.embed.weight.T
    torch.testing.assert_close(ours(tokens), expected, atol=1e-10, rtol=0)
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == V * 32 + sum(p.numel() for p in ours.decoder.parameters())  # no separate output matrix


@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_incremental_forward_equals_full_forward(positional):
    model = tiny(positional=positional, max_len=16)
    tokens = torch.randint(4, V, (3, 12))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        steps = [model(tokens[:, :5], cache)] + [model(tokens[:, t : t + 1], cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=0)
    assert cache.length == 12 and cache.cross_attn == []


def test_future_tokens_and_trailing_padding_do_not_change_earlier_logits():
    model = tiny()
    tokens = torch.randint(4, V, (2, 9))
    changed = tokens.clone()
    changed[:, 6:] = PAD
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-12, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.3, top_k=10, top_p=0.9)])
def test_cached_generation_equals_uncached_generation(sampling):
    model = tiny()
    prompt = torch.tensor([[BOS, 5, 6], [BOS, 7, 8], [BOS, 9, 9], [BOS, 4, 4]])
    cached = model.generate(prompt, 20, EOS, generator=torch.Generator().manual_seed(7), **sampling)
    uncached = model.generate(prompt, 20, EOS, generator=torch.Generator().manual_seed(7), use_cache=False,
                              **sampling)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] > 3 and torch.equal(cached[:, :3], prompt)


def test_seeded_sampling_is_reproducible_and_the_seed_matters():
    model = tiny(dtype=torch.float32)
    prompt = torch.full((6, 1), BOS)

    def sample(seed: int) -> torch.Tensor:
        return model.generate(prompt, 15, EOS, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    torch.manual_seed(3)
    a = model.generate(prompt, 15, EOS)
    torch.manual_seed(3)
    assert torch.equal(model.generate(prompt, 15, EOS), a)


class ScriptedLM(TransformerLM):
    """Puts all probability on scripted tokens: row r's n-th new token is SCRIPT[r][n]."""

    SCRIPT = [[5, EOS, 6, 6, 6, 6], [7, 8, 9, EOS, 6, 6], [4, 4, 4, 4, 4, 4]]

    def forward(self, tokens, cache=None):
        step = tokens.size(1) - 1 if cache is None else cache.length + tokens.size(1) - 1
        if cache is not None:
            cache.self_attn[0].append(*(torch.zeros(tokens.size(0), 1, tokens.size(1), 1),) * 2)
        logits = torch.full((tokens.size(0), tokens.size(1), 12), -10.0)
        for row, script in enumerate(self.SCRIPT[: tokens.size(0)]):
            logits[row, -1, script[step]] = 10.0
        return logits


@pytest.mark.parametrize("rows", [2, 3])
def test_eos_stops_a_row_and_the_others_continue(rows):
    model = ScriptedLM(12, d_model=8, n_heads=2, d_ff=8, n_layers=1)
    out = model.generate(torch.full((rows, 1), BOS), 6, EOS, temperature=0.0)
    expected = torch.tensor([[BOS, 5, EOS, PAD, PAD, PAD, PAD],
                             [BOS, 7, 8, 9, EOS, PAD, PAD],
                             [BOS, 4, 4, 4, 4, 4, 4]])
    if rows == 2:  # every row has ended after four new tokens: generation stops there
        expected = expected[:2, :5]
    assert torch.equal(out, expected)


def test_generation_respects_learned_positions():
    model = tiny(positional="learned", max_len=8)
    with pytest.raises(ValueError, match="exceed the 8 learned positions"):
        model.generate(torch.full((1, 3), BOS), 6)
    assert model.generate(torch.full((1, 3), BOS), 5, temperature=0).shape == (1, 8)


# A fixed distribution, sorted for reading: p = 0.4, 0.3, 0.15, 0.1, 0.05 over tokens 3, 0, 4, 1, 2.
PROBS = torch.tensor([[0.3, 0.1, 0.05, 0.4, 0.15]], dtype=torch.float64)


@pytest.mark.parametrize(
    "top_k, top_p, kept",
    [
        (0, 1.0, {0, 1, 2, 3, 4}),
        (1, 1.0, {3}),
        (3, 1.0, {3, 0, 4}),
        (0, 0.35, {3}),          # 0.4 alone reaches 0.35
        (0, 0.6, {3, 0}),        # 0.4 < 0.6, 0.4 + 0.3 >= 0.6
        (0, 0.8, {3, 0, 4}),     # 0.7 < 0.8, 0.85 >= 0.8
        (0, 0.9, {3, 0, 4, 1}),  # 0.85 < 0.9, 0.95 >= 0.9
        (2, 0.9, {3, 0}),        # top-k first, then the nucleus of what it leaves
        (4, 0.5, {3, 0}),
    ],
)
def test_top_k_and_top_p_keep_exactly_the_right_tokens(top_k, top_p, kept):
    logits = PROBS.log()
    filtered = filter_logits(logits, top_k, top_p)
    assert {int(i) for i in torch.nonzero(filtered[0].isfinite())} == kept
    # What is kept is renormalised in proportion to the original probabilities.
    index = torch.tensor(sorted(kept))
    probs = filtered.softmax(-1)[0]
    torch.testing.assert_close(probs[index], PROBS[0, index] / PROBS[0, index].sum())
    samples = {int(next_token(logits.expand(400, -1), 1.0, top_k, top_p, torch.Generator().manual_seed(0))[i])
               for i in range(400)}
    assert samples == kept


def test_filters_work_row_by_row_and_temperature_zero_is_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]])
    assert torch.equal(filter_logits(logits, top_k=2).isfinite(),
                       torch.tensor([[False, True, True, False], [False, False, True, True]]))
    assert torch.equal(next_token(logits, temperature=0.0), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        next_token(logits, temperature=-1.0)
