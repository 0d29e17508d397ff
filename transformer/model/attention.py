"""Scaled dot-product attention and multi-head attention (paper sections 3.2.1 and 3.2.2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import AttentionCache
from .masks import attention_mask
from .packing import TokenLayout

# On the CPU, attention over at most this many keys runs the written-out form rather than PyTorch's
# fused (flash) kernel: for short key sequences the written-out form is faster in bfloat16 and on
# some CPUs in float32 (elsewhere even in whole training steps), for long ones it is slower, and
# translation sentences are short. docs/benchmarks.md describes how the threshold was chosen.
CPU_WRITTEN_OUT_MAX_KEYS = 96


def scaled_dot_product_attention(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None, dropout: float = 0.0
) -> tuple[Tensor, Tensor]:
    """softmax(Q K^T / sqrt(d_k)) V, written out so that the attention weights can be returned.

    This function is the readable definition, the path for visualisation, and what
    `MultiHeadAttention` runs for short attention on the CPU (see `CPU_WRITTEN_OUT_MAX_KEYS`);
    elsewhere it uses PyTorch's fused kernel.

    Args:
        query: (B, H, T, d_k).
        key: (B, H, S, d_k).
        value: (B, H, S, d_v).
        mask: bool, broadcastable to (B, H, T, S), True where attention is allowed; or None.
        dropout: dropout probability applied to the attention weights.

    Returns:
        output (B, H, T, d_v) and weights (B, H, T, S).
    """
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # At least float32 inside: PyTorch's CPU softmax is much slower in bfloat16, and less exact.
    weights = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
    return F.dropout(weights, dropout, training=dropout > 0) @ value, weights


class InputProjection(nn.Linear):
    """W^Q, W^K and W^V stacked as one (3D, D) linear layer (the layout of `nn.MultiheadAttention`).

    Self-attention applies all 3D rows in one matrix multiplication (`forward`); cross-attention
    applies the W^Q rows to the queries (`query`) and the W^K, W^V rows to the memory (`memory`).
    Naming the two halves lets an inference-only replacement (e.g. `transformer.decoding.quantize`) provide
    them without slicing a weight.

    Args:
        d_model: model width D.
        bias: whether the projections have biases.
    """

    def __init__(self, d_model: int, bias: bool = True) -> None:
        super().__init__(d_model, 3 * d_model, bias=bias)

    def query(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D): x W^Q + b^Q."""
        D = self.in_features
        return F.linear(x, self.weight[:D], None if self.bias is None else self.bias[:D])

    def memory(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., 2D): [x W^K + b^K, x W^V + b^V]."""
        D = self.in_features
        return F.linear(x, self.weight[D:], None if self.bias is None else self.bias[D:])


class MultiHeadAttention(nn.Module):
    """Multi-head attention: h parallel scaled dot-product attentions over learned projections.

    One (3D, D) input projection holds W^Q, W^K and W^V stacked (the layout of
    `torch.nn.MultiheadAttention`): self-attention applies it in a single matrix multiplication;
    cross-attention applies the W^Q rows to the queries and the W^K, W^V rows to the memory.

    Args:
        d_model: model width D.
        n_heads: number of heads H; d_k = d_v = D / H.
        dropout: dropout on the attention weights.
        bias: whether the projections have biases.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_heads, self.d_k = d_model, n_heads, d_model // n_heads
        self.dropout = dropout
        self.in_proj = InputProjection(d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        nn.init.xavier_uniform_(self.in_proj.weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        if bias:
            nn.init.zeros_(self.in_proj.bias)
            nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: Tensor, n: int) -> Tensor:
        """(B, L, n*D) -> n tensors stacked as (n, B, H, L, d_k)."""
        B, L, _ = x.shape
        return x.view(B, L, n, self.n_heads, self.d_k).permute(2, 0, 3, 1, 4)

    def forward(
        self,
        query: Tensor,
        memory: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        causal: bool = False,
        cache: AttentionCache | None = None,
        need_weights: bool = False,
        layout: TokenLayout | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from `query` to itself (self-attention) or to `memory` (cross-attention).

        Args:
            query: (B, T, D); or (N, D), the real tokens of a padded batch, with `layout`.
            memory: (B, S, D) for cross-attention; None for self-attention. It may also have
                B' = B / g rows, each shared by g consecutive query rows (the g hypotheses of one
                sentence in beam search): the g * T queries then attend to it together, which
                gives the same result as repeating memory g times, without the copies.
            key_padding_mask: (B, S) bool, True marks keys to ignore (padding); (B', S) for a
                memory of B' rows. For self-attention with a cache, S counts the cached positions too.
            causal: each query sees only keys up to its own position (self-attention in a decoder).
                With a cache the T queries are the newest positions (lower-right alignment).
            cache: incremental decoding state. Self-attention appends this call's keys and values
                and attends over all of them; cross-attention projects `memory` on the first call,
                stores it, and reuses it on later calls.
            need_weights: also return the attention weights (slower path).
            layout: for self-attention without a cache over a packed `query`: where its N tokens
                sit in the padded (B, T) batch. The projections then run on the N tokens only.

        Returns:
            output (B, T, D), or (N, D) with `layout`; and, if `need_weights`, weights
            (B, H, T, S), else None.
        """
        if layout is not None:
            if memory is not None or cache is not None:
                raise ValueError("a packed query (layout) is for self-attention without a cache")
            qkv = layout.unpack(self.in_proj(query))  # (B, T, 3D), zeros at padding
            B, T, D = qkv.size(0), qkv.size(1), self.d_model
            q, k, v = self._split_heads(qkv, 3)
        elif memory is None:
            B, T, D = query.shape
            q, k, v = self._split_heads(self.in_proj(query), 3)
            if cache is not None:
                k, v = cache.append(k, v)
        else:
            B, T, D = query.shape
            q = self._split_heads(self.in_proj.query(query), 1)[0]
            if cache is not None and cache.key is not None:
                k, v = cache.key, cache.value
            else:
                k, v = self._split_heads(self.in_proj.memory(memory), 2)
                if cache is not None:
                    # Contiguous once, rather than copied by the attention matmuls at every step.
                    k, v = k.contiguous(), v.contiguous()
                    cache.key, cache.value = k, v
        # g query rows per memory row (1 except for shared cross-attention memory): fold the g
        # rows' queries into one row of g * T queries, (B, H, T, d_k) -> (B', H, g * T, d_k).
        B_kv, H, S = k.size(0), self.n_heads, k.size(2)
        if B % B_kv or (causal and B != B_kv):
            raise ValueError(f"query batch {B} must be a multiple of the memory batch {B_kv} (equal to it if causal)")
        g = B // B_kv
        q = q.reshape(B_kv, g, H, T, self.d_k).transpose(1, 2).reshape(B_kv, H, g * T, self.d_k)
        dropout = self.dropout if self.training else 0.0
        if need_weights or (query.device.type == "cpu" and (T == 1 or S <= CPU_WRITTEN_OUT_MAX_KEYS)):
            # The written-out form also serves short attention on the CPU (see
            # CPU_WRITTEN_OUT_MAX_KEYS) and, whatever the cache length, single-query steps of
            # incremental decoding there, where it is also faster than the fused kernel.
            mask = attention_mask(key_padding_mask, causal, g * T, S, query.device)
            out, weights = scaled_dot_product_attention(q, k, v, mask, dropout)
            weights = weights.view(B_kv, H, g, T, S).transpose(1, 2).reshape(B, H, T, S) if need_weights else None
        elif causal and key_padding_mask is None and T == S:
            # Queries and keys are the same positions: the fused kernel's causal flag is exact here.
            out, weights = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True), None
        else:
            mask = attention_mask(key_padding_mask, causal, g * T, S, query.device)
            out, weights = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout), None
        # (B', H, g * T, d_k) -> (B', g, T, H, d_k) -> (B, T, D)
        out = out.view(B_kv, H, g, T, self.d_k).permute(0, 2, 3, 1, 4).reshape(B, T, D)
        if layout is not None:
            out = layout.pack(out)
        return self.out_proj(out), weights
