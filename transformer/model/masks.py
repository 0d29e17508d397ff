"""Attention masks: the one place where mask polarity is converted.

Public convention (as in PyTorch): a `key_padding_mask` is a boolean tensor where True marks a
padding position that must be ignored. Internally, and for `scaled_dot_product_attention`, the
combined mask uses the opposite polarity: True marks a key that a query may attend to.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor:
    """Boolean mask letting each query see itself and every earlier key, aligned lower-right.

    With a key/value cache the `q_len` queries are the last `q_len` positions of the `k_len` keys,
    so query i sits at absolute position `k_len - q_len + i` and may attend to keys 0..that position.
    (SDPA's own `is_causal` aligns upper-left, which is wrong as soon as a cache is involved.)

    Returns:
        (q_len, k_len) bool tensor, True where attention is allowed.
    """
    offset = k_len - q_len
    if offset < 0:
        raise ValueError(f"causal_mask: {q_len} queries cannot be the last positions of {k_len} keys")
    rows = torch.arange(q_len, device=device).unsqueeze(1) + offset
    cols = torch.arange(k_len, device=device).unsqueeze(0)
    return cols <= rows


def attention_mask(
    key_padding_mask: Tensor | None, causal: bool, q_len: int, k_len: int, device: torch.device
) -> Tensor | None:
    """Combine a key padding mask and causality into one mask for attention.

    Args:
        key_padding_mask: (B, S) bool, True marks padding keys; or None.
        causal: whether queries may only see keys up to their own position (lower-right aligned).
        q_len: number of queries T.
        k_len: number of keys S.
        device: where to build the mask.

    Returns:
        None when nothing is masked, else a bool tensor broadcastable to (B, H, T, S) where True
        means "may attend": (B, 1, 1, S), (T, S) or (B, 1, T, S).
    """
    allowed = None
    if key_padding_mask is not None:
        if key_padding_mask.shape[-1] != k_len:
            raise ValueError(
                f"key_padding_mask has {key_padding_mask.shape[-1]} positions but there are {k_len} keys"
            )
        allowed = ~key_padding_mask.bool()[:, None, None, :]
    if causal and q_len > 1:  # a single newest query sees every key: nothing to mask
        future = causal_mask(q_len, k_len, device)
        allowed = future if allowed is None else allowed & future
    return allowed
