"""MultiHeadAttention against torch.nn.MultiheadAttention, the formula, and gradcheck (float64)."""

import math

import pytest
import torch
from torch import nn

from transformer.model import MultiHeadAttention, attention_mask, causal_mask, scaled_dot_product_attention

D, H = 16, 4


pytestmark = pytest.mark.usefixtures("attention_kernel")  # both CPU attention paths (conftest.py)


def pair(dropout: float = 0.0) -> tuple[MultiHeadAttention, nn.MultiheadAttention]:
    torch.manual_seed(0)
    ours = MultiHeadAttention(D, H, dropout).double().eval()
    ref = nn.MultiheadAttention(D, H, batch_first=True, dtype=torch.float64).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_()
        ref.in_proj_weight.copy_(ours.in_proj.weight)
        ref.in_proj_bias.copy_(ours.in_proj.bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ours, ref


def padding(B: int, S: int) -> torch.Tensor:
    """(B, S) True at padding: row b has b trailing pad positions."""
    return torch.arange(S).unsqueeze(0) >= (S - torch.arange(B)).unsqueeze(1)


def test_self_attention_with_padding_matches_torch():
    ours, ref = pair()
    x = torch.randn(3, 7, D, dtype=torch.float64)
    mask = padding(3, 7)
    out, _ = ours(x, key_padding_mask=mask)
    expected, _ = ref(x, x, x, key_padding_mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)


def test_causal_self_attention_matches_torch():
    ours, ref = pair()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    out, _ = ours(x, causal=True)
    expected, _ = ref(x, x, x, attn_mask=nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64))
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)


def test_causal_with_padding_matches_torch():
    ours, ref = pair()
    x = torch.randn(3, 6, D, dtype=torch.float64)
    mask = padding(3, 6)
    out, _ = ours(x, key_padding_mask=mask, causal=True)
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)  # True = not allowed, as torch expects
    expected, _ = ref(x, x, x, key_padding_mask=mask, attn_mask=future)
    keep = ~mask  # rows of padded queries are irrelevant; compare the real positions
    torch.testing.assert_close(out[keep], expected[keep], atol=1e-10, rtol=0)


def test_cross_attention_with_padding_matches_torch():
    ours, ref = pair()
    q = torch.randn(3, 5, D, dtype=torch.float64)
    memory = torch.randn(3, 9, D, dtype=torch.float64)
    mask = padding(3, 9)
    out, weights = ours(q, memory, key_padding_mask=mask, need_weights=True)
    expected, expected_weights = ref(q, memory, memory, key_padding_mask=mask, average_attn_weights=False)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
    torch.testing.assert_close(weights, expected_weights, atol=1e-10, rtol=0)


@pytest.mark.parametrize("T", [1, 3])  # one query per row (a decoding step) and several
def test_memory_shared_by_groups_of_query_rows_equals_repeated_memory(T):
    ours, _ = pair()
    g = 4  # query rows per memory row, as beam search's hypotheses share their sentence's memory
    q = torch.randn(3 * g, T, D, dtype=torch.float64)
    memory = torch.randn(3, 9, D, dtype=torch.float64)
    mask = padding(3, 9)
    repeated = memory.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)
    for need_weights in (False, True):
        out, weights = ours(q, memory, key_padding_mask=mask, need_weights=need_weights)
        expected, expected_weights = ours(q, *repeated[:1], key_padding_mask=repeated[1], need_weights=need_weights)
        torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
        if need_weights:
            torch.testing.assert_close(weights, expected_weights, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="multiple of the memory batch"):
        ours(q[:5], memory, key_padding_mask=mask)


def test_self_attention_cache_grows_position_by_position():
    from transformer.model import AttentionCache

    ours, _ = pair()
    x = torch.randn(2, 40, D, dtype=torch.float64)  # appends with no select between them reallocate each time
    full, _ = ours(x, causal=True)
    cache = AttentionCache()
    steps = [ours(x[:, t : t + 1], causal=True, cache=cache)[0] for t in range(40)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-10, rtol=0)
    assert cache.length == 40 and cache.key.shape == (2, H, 40, D // H)


def test_select_leaves_room_so_the_next_position_is_appended_in_place_and_contiguous():
    from transformer.model import AttentionCache

    k, v, k_new, v_new = (torch.randn(3, H, n, D // H, dtype=torch.float64) for n in (5, 5, 1, 1))
    cache = AttentionCache()
    cache.append(k, v)
    rows = torch.tensor([2, 0, 0])
    cache.select(rows)
    start = cache.key.data_ptr(), cache.value.data_ptr()
    keys, values = cache.append(k_new, v_new)
    assert (keys.data_ptr(), values.data_ptr()) == start, "the append after a select reallocated"
    assert keys.is_contiguous() and values.is_contiguous()
    torch.testing.assert_close(keys, torch.cat([k[rows], k_new], 2), atol=0, rtol=0)
    torch.testing.assert_close(values, torch.cat([v[rows], v_new], 2), atol=0, rtol=0)


def test_weights_path_equals_fused_path():
    ours, _ = pair()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    fast, none = ours(x, causal=True)
    slow, weights = ours(x, causal=True, need_weights=True)
    assert none is None
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, H, 6, dtype=torch.float64))
    assert torch.all(weights.triu(1) == 0), "a query attended to a future key"


def test_scaled_dot_product_attention_is_the_formula():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 4, 5, dtype=torch.float64) for _ in range(3))
    out, weights = scaled_dot_product_attention(q, k, v)
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(5)
    expected_weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(weights, expected_weights, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, torch.einsum("bhts,bhsd->bhtd", expected_weights, v), atol=1e-12, rtol=0)


def test_causal_mask_is_lower_right_aligned():
    mask = causal_mask(2, 5)  # two newest queries after three cached positions
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    assert attention_mask(None, True, 1, 4, torch.device("cpu")) is None
    with pytest.raises(ValueError):
        causal_mask(3, 2)


def test_incremental_self_attention_equals_full():
    from transformer.model import AttentionCache

    ours, _ = pair()
    x = torch.randn(2, 7, D, dtype=torch.float64)
    full, _ = ours(x, causal=True)
    cache = AttentionCache()
    chunks = [ours(x[:, :3], causal=True, cache=cache)[0]]  # several queries at once, then one at a time
    for t in range(3, 7):
        chunks.append(ours(x[:, t : t + 1], causal=True, cache=cache)[0])
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-10, rtol=0)
    # Two new queries on top of a cache: lower-right causal alignment must hold.
    cache = AttentionCache()
    ours(x[:, :4], causal=True, cache=cache)
    torch.testing.assert_close(ours(x[:, 4:6], causal=True, cache=cache)[0], full[:, 4:6], atol=1e-10, rtol=0)


def test_gradcheck():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2).double()
    q = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    m = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    mask = padding(2, 4)
    assert torch.autograd.gradcheck(lambda a, b: mha(a, b, key_padding_mask=mask)[0], (q, m))
    assert torch.autograd.gradcheck(lambda a: mha(a, causal=True)[0], (q,))


def test_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, 3)
