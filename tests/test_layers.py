"""Encoder and decoder layers against torch.nn.Transformer*Layer with copied weights (float64, eval)."""

import pytest
import torch
from torch import nn

from transformer.model import DecoderLayer, Encoder, EncoderLayer, MultiHeadAttention, TokenLayout

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
        if hasattr(ours, name):
            getattr(ref, name).load_state_dict(getattr(ours, name).state_dict())


def padding(B: int, S: int) -> torch.Tensor:
    return torch.arange(S).unsqueeze(0) >= (S - torch.arange(B)).unsqueeze(1)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_matches_torch(norm_first):
    torch.manual_seed(0)
    ours = EncoderLayer(D, H, FF, dropout=0.1, norm_first=norm_first).double().eval()
    ref = nn.TransformerEncoderLayer(D, H, FF, dropout=0.1, batch_first=True, norm_first=norm_first,
                                     dtype=torch.float64).eval()
    with torch.no_grad():
        copy_common(ours, ref)
    x = torch.randn(3, 7, D, dtype=torch.float64)
    mask = padding(3, 7)
    keep = ~mask
    torch.testing.assert_close(ours(x, mask)[keep], ref(x, src_key_padding_mask=mask)[keep], atol=1e-10, rtol=0)


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


def test_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    layer = EncoderLayer(D, H, FF, dropout=0.5)
    x = torch.randn(2, 5, D)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


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
