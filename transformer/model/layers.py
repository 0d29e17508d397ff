"""Position-wise feed-forward network and the encoder and decoder layers (paper section 3.1, 3.3).

A decoder layer without cross-attention (`cross_attention=False`) is the layer of a decoder-only
language model: causal self-attention and feed-forward, nothing else.

Each sub-layer is wrapped in a residual connection and layer normalisation. Post-LN, the paper's
`LayerNorm(x + Dropout(Sublayer(x)))`, is the default; `norm_first=True` gives pre-LN,
`x + Dropout(Sublayer(LayerNorm(x)))`, whose stacks then need a final LayerNorm (see `Encoder`).
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiHeadAttention
from .dropout import Dropout
from .cache import AttentionCache
from .packing import TokenLayout


# The feed-forward non-linearities by name: "relu" is the paper's (equation 2), "gelu" (exact,
# not the tanh approximation) that of BERT and GPT.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu}


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2, applied to each position separately (equation 2).

    Args:
        d_model: input and output width D.
        d_ff: inner width.
        activation: the non-linearity between the two projections, a key of `ACTIVATIONS`; the
            paper's ReLU by default.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")
        self.activation = activation
        self._activation = ACTIVATIONS[activation]
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)
        nn.init.zeros_(self.linear1.bias)
        nn.init.zeros_(self.linear2.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return self.linear2(self._activation(self.linear1(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each with residual connection, dropout and LayerNorm.

    Args:
        d_model: model width D.
        n_heads: attention heads H.
        d_ff: feed-forward inner width.
        dropout: dropout on each sub-layer's output before the residual sum (P_drop).
        attention_dropout: dropout on the attention weights.
        norm_first: pre-LN instead of the paper's post-LN.
        activation: the feed-forward non-linearity, "relu" (paper) or "gelu".
    """

    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, attention_dropout: float = 0.0,
        norm_first: bool = False, activation: str = "relu",
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.ff = FeedForward(d_model, d_ff, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, layout: TokenLayout | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Args:
            x: (B, S, D); or (N, D), only the real tokens, with `layout`.
            key_padding_mask: (B, S) bool, True marks padding.
            layout: where the N tokens of a packed `x` sit in the (B, S) batch. Every sub-layer
                but attention is position-wise, so this runs them on the real tokens only.
            need_weights: also return the self-attention weights.

        Returns:
            output of the shape of `x`, and self-attention weights (B, H, S, S) or None unless requested.
        """
        def attend(h: Tensor) -> tuple[Tensor, Tensor | None]:
            return self.self_attn(h, key_padding_mask=key_padding_mask, layout=layout, need_weights=need_weights)

        if self.norm_first:
            h, weights = attend(self.norm1(x))
            x = x + self.dropout(h)
            return x + self.dropout(self.ff(self.norm2(x))), weights
        h, weights = attend(x)
        x = self.norm1(x + self.dropout(h))
        return self.norm2(x + self.dropout(self.ff(x))), weights


class DecoderLayer(nn.Module):
    """Causal self-attention, attention over the encoder output, then feed-forward.

    With `cross_attention=False` the middle sub-layer is left out: causal self-attention then
    feed-forward, the layer of a decoder-only language model. `norm1` then belongs to the
    self-attention and `norm2` to the feed-forward, as in `EncoderLayer`.

    Args:
        cross_attention: whether the layer attends over an encoder output (`memory`).
        Other arguments: as for `EncoderLayer`.
    """

    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, attention_dropout: float = 0.0,
        norm_first: bool = False, activation: str = "relu", cross_attention: bool = True,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, attention_dropout) if cross_attention else None
        self.ff = FeedForward(d_model, d_ff, activation)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model) if cross_attention else None
        self.dropout = Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        memory_key_padding_mask: Tensor | None = None,
        self_cache: AttentionCache | None = None,
        cross_cache: AttentionCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Args:
            x: (B, T, D) target positions (only the new ones when decoding with a cache).
            memory: (B, S, D) encoder output; None for a layer without cross-attention.
            memory_key_padding_mask: (B, S) bool, True marks source padding.
            self_cache, cross_cache: incremental decoding state of the two attentions, or None.
            need_weights: also return the attention weights.

        Returns:
            output (B, T, D), self-attention weights (B, H, T, L) and cross-attention weights
            (B, H, T, S), the weights being None unless requested (cross: always None without
            cross-attention).
        """
        if (memory is None) != (self.cross_attn is None):
            raise ValueError("memory is required with cross-attention and must be None without it")

        def self_block(h: Tensor) -> tuple[Tensor, Tensor | None]:
            return self.self_attn(h, causal=True, cache=self_cache, need_weights=need_weights)

        def cross_block(h: Tensor) -> tuple[Tensor, Tensor | None]:
            assert self.cross_attn is not None
            return self.cross_attn(h, memory, memory_key_padding_mask, cache=cross_cache, need_weights=need_weights)

        ff_norm = self.norm2 if self.norm3 is None else self.norm3
        cross_weights = None
        if self.norm_first:
            h, self_weights = self_block(self.norm1(x))
            x = x + self.dropout(h)
            if self.cross_attn is not None:
                h, cross_weights = cross_block(self.norm2(x))
                x = x + self.dropout(h)
            return x + self.dropout(self.ff(ff_norm(x))), self_weights, cross_weights
        h, self_weights = self_block(x)
        x = self.norm1(x + self.dropout(h))
        if self.cross_attn is not None:
            h, cross_weights = cross_block(x)
            x = self.norm2(x + self.dropout(h))
        return ff_norm(x + self.dropout(self.ff(x))), self_weights, cross_weights
