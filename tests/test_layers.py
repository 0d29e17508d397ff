"""Encoder and decoder layers against torch.nn.Transformer*Layer with copied weights (float64, eval).

A decoder layer without cross-attention is checked against nn.TransformerEncoderLayer with a
causal mask, the usual way to build a decoder-only model from PyTorch's modules."""

import pytest
import torch
from torch import nn

from transformer.model import Decoder, DecoderLayer, Encoder, EncoderLayer, FeedForward, MultiHeadAttention, TokenLayout

pytestmark = pytest.mark.usefixtures("attention_kernel")  # both CPU attention paths (conftest.py)

D, H, FF = 16, 4, 32


def copy_attention(ours, ref) -> None:
    ref.in_proj_weight.copy_(ours.in_proj.weight)
    ref.in_proj_bias.copy_(ours.in_proj.bias)
    ref.out_proj.weight.copy_(ours.out_proj.weight)
    ref.out_proj.bias.copy_(ours.out_proj.bias)


def copy_common(ours, ref) -> None:
    for p in ours.parameters():
        p.normal_(0, 0.5)
    copy_attention(ours.self_attn, ref.self_attn)
    for name in ("linear1", "linear2"):
        getattr(ref, name).load_state_dict(getattr(ours.ff, name).state_dict())
    for name in ("norm1", "norm2", "norm3"):
        if getattr(ours, name, None) is not None:
            getattr(ref, name).load_state_dict(getattr(ours, name).state_dict())


def padding(B: int, S: int) -> torch.Tensor:
    return torch.arange(S).unsqueeze(0) >= (S - torch.arange(B)).unsqueeze(1)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_matches_torch(norm_first, activation):
    torch.manual_seed(0)
    ours = EncoderLayer(D, H, FF, dropout=0.1, norm_first=norm_first, activation=activation).double().eval()
    ref = nn.TransformerEncoderLayer(D, H, FF, dropout=0.1, batch_first=True, norm_first=norm_first,
                                     activation=activation, dtype=torch.float64).eval()
    with torch.no_grad():
        copy_common(ours, ref)
    x = torch.randn(3, 7, D, dtype=torch.float64)
    mask = padding(3, 7)
    keep = ~mask
    torch.testing.assert_close(ours(x, mask)[0][keep], ref(x, src_key_padding_mask=mask)[keep], atol=1e-10, rtol=0)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first):
    torch.manual_seed(0)
    ours = DecoderLayer(D, H, FF, dropout=0.1, norm_first=norm_first).double().eval()
    ref = nn.TransformerDecoderLayer(D, H, FF, dropout=0.1, batch_first=True, norm_first=norm_first,
                                     dtype=torch.float64).eval()
    with torch.no_grad():
        copy_common(ours, ref)
        copy_attention(ours.cross_attn, ref.multihead_attn)
    x = torch.randn(3, 6, D, dtype=torch.float64)
    memory = torch.randn(3, 8, D, dtype=torch.float64)
    mask = padding(3, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    expected = ref(x, memory, tgt_mask=causal, memory_key_padding_mask=mask.double().masked_fill(mask, float("-inf")),
                   tgt_is_causal=True)
    torch.testing.assert_close(ours(x, memory, mask)[0], expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_only_layer_matches_torch_encoder_layer_with_causal_mask(norm_first, activation):
    torch.manual_seed(0)
    ours = DecoderLayer(D, H, FF, dropout=0.1, norm_first=norm_first, activation=activation,
                        cross_attention=False).double().eval()
    ref = nn.TransformerEncoderLayer(D, H, FF, dropout=0.1, batch_first=True, norm_first=norm_first,
                                     activation=activation, dtype=torch.float64).eval()
    with torch.no_grad():
        copy_common(ours, ref)
    assert ours.cross_attn is None and ours.norm3 is None
    x = torch.randn(3, 9, D, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(9, dtype=torch.float64)
    out, self_weights, cross_weights = ours(x, need_weights=True)
    torch.testing.assert_close(out, ref(x, src_mask=causal, is_causal=True), atol=1e-10, rtol=0)
    assert cross_weights is None and torch.all(self_weights.triu(1) == 0)
    with pytest.raises(ValueError, match="memory"):
        ours(x, x)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_only_stack_matches_torch_encoder_with_causal_mask(norm_first):
    """A stack without cross-attention, its final pre-LN norm included, and cached step-by-step
    decoding through it."""
    torch.manual_seed(0)
    ours = Decoder(3, D, H, FF, dropout=0.1, norm_first=norm_first, activation="gelu",
                   cross_attention=False).double().eval()
    layer = nn.TransformerEncoderLayer(D, H, FF, dropout=0.1, batch_first=True, norm_first=norm_first,
                                       activation="gelu", dtype=torch.float64)
    ref = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(D, dtype=torch.float64) if norm_first else None,
                                enable_nested_tensor=False).eval()
    with torch.no_grad():
        for ours_layer, ref_layer in zip(ours.layers, ref.layers):
            copy_common(ours_layer, ref_layer)
        if norm_first:
            ours.norm.weight.normal_()
            ref.norm.load_state_dict(ours.norm.state_dict())
    x = torch.randn(2, 11, D, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(11, dtype=torch.float64)
    expected = ref(x, mask=causal, is_causal=True)
    torch.testing.assert_close(ours(x), expected, atol=1e-10, rtol=0)
    cache = ours.new_cache()
    assert cache.cross_attn == []
    steps = [ours(x[:, :4], cache=cache)] + [ours(x[:, t : t + 1], cache=cache) for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-10, rtol=0)
    assert cache.length == 11


def test_feed_forward_activation_is_checked_and_named():
    assert "activation=gelu" in repr(FeedForward(D, FF, "gelu"))
    with pytest.raises(ValueError, match="activation must be one of 'relu', 'gelu', got 'tanh'"):
        FeedForward(D, FF, "tanh")


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    layer = EncoderLayer(D, H, FF, dropout=0.5)
    x = torch.randn(2, 5, D)
    layer.train()
    assert not torch.allclose(layer(x)[0], layer(x)[0])
    layer.eval()
    torch.testing.assert_close(layer(x)[0], layer(x)[0])


def test_token_layout_packs_real_tokens_and_unpacks_with_zeros():
    mask = padding(3, 4)  # rows with 4, 3 and 2 real tokens
    x = torch.arange(3 * 4 * 2, dtype=torch.float64).view(3, 4, 2)
    layout = TokenLayout.from_padding_mask(mask)
    packed = layout.pack(x)
    assert layout.n_tokens == 9 and torch.equal(packed, x[~mask])
    unpacked = layout.unpack(packed)
    assert torch.equal(unpacked[~mask], x[~mask]) and torch.all(unpacked[mask] == 0)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_on_real_tokens_matches_torch_with_gradients(norm_first):
    """`Encoder` runs its layers on the packed real tokens: outputs and input gradients at real
    positions equal nn.TransformerEncoder's over the padded batch, and padding outputs are zero."""
    torch.manual_seed(0)
    ours = Encoder(2, D, H, FF, dropout=0.1, norm_first=norm_first).double().eval()
    layer = nn.TransformerEncoderLayer(D, H, FF, dropout=0.1, batch_first=True, norm_first=norm_first,
                                       dtype=torch.float64)
    ref = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D, dtype=torch.float64) if norm_first else None,
                                enable_nested_tensor=False).eval()
    with torch.no_grad():
        for ours_layer, ref_layer in zip(ours.layers, ref.layers):
            copy_common(ours_layer, ref_layer)
        if norm_first:
            ours.norm.weight.normal_()
            ref.norm.load_state_dict(ours.norm.state_dict())
    mask = padding(4, 7)
    keep = ~mask
    x = torch.randn(4, 7, D, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, expected = ours(x, mask), ref(x_ref, src_key_padding_mask=mask)
    torch.testing.assert_close(out[keep], expected[keep], atol=1e-10, rtol=0)
    assert torch.all(out[mask] == 0)
    weights = torch.randn_like(out)
    (out[keep] * weights[keep]).sum().backward()
    (expected[keep] * weights[keep]).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-10, rtol=0)
    assert torch.all(x.grad[mask] == 0)


def test_packed_self_attention_rejects_memory_and_cache():
    attention = MultiHeadAttention(D, H)
    layout = TokenLayout.from_padding_mask(padding(2, 3))
    with pytest.raises(ValueError, match="layout"):
        attention(torch.randn(layout.n_tokens, D), memory=torch.randn(2, 3, D), layout=layout)
