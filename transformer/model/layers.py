"""Position-wise feed-forward network and the encoder and decoder layers (paper section 3.1, 3.3).

Each sub-layer is wrapped in a residual connection and layer normalisation. Post-LN, the paper's
`LayerNorm(x + Dropout(Sublayer(x)))`, is the default; `norm_first=True` gives pre-LN,
`x + Dropout(Sublayer(LayerNorm(x)))`, whose stacks then need a final LayerNorm (see `Encoder`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MultiHeadAttention
from .dropout import Dropout
from .cache import AttentionCache
from .packing import TokenLayout


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2, applied to each position separately (equation 2).

    Args:
        d_model: input and output width D.
        d_ff: inner width.
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)
        nn.init.zeros_(self.linear1.bias)
        nn.init.zeros_(self.linear2.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return self.linear2(F.relu(self.linear1(x)))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each with residual connection, dropout and LayerNorm.

    Args:
        d_model: model width D.
        n_heads: attention heads H.
        d_ff: feed-forward inner width.
        dropout: dropout on each sub-layer's output before the residual sum (P_drop).
        attention_dropout: dropout on the attention weights.
        norm_first: pre-LN instead of the paper's post-LN.
    """

    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, attention_dropout: float = 0.0,
        norm_first: bool = False,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.ff = FeedForward(d_model, d_ff)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, layout: TokenLayout | None = None
    ) -> Tensor:
        """Args:
            x: (B, S, D); or (N, D), only the real tokens, with `layout`.
            key_padding_mask: (B, S) bool, True marks padding.
            layout: where the N tokens of a packed `x` sit in the (B, S) batch. Every sub-layer
                but attention is position-wise, so this runs them on the real tokens only.

        Returns:
            the shape of `x`.
        """
        def attend(h: Tensor) -> Tensor:
            return self.self_attn(h, key_padding_mask=key_padding_mask, layout=layout)[0]

        if self.norm_first:
            x = x + self.dropout(attend(self.norm1(x)))
            return x + self.dropout(self.ff(self.norm2(x)))
        x = self.norm1(x + self.dropout(attend(x)))
        return self.norm2(x + self.dropout(self.ff(x)))


class DecoderLayer(nn.Module):
    """Causal self-attention, attention over the encoder output, then feed-forward.

    Args: as for `EncoderLayer`.
    """

    def __init__(
        self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, attention_dropout: float = 0.0,
        norm_first: bool = False,
    ) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, attention_dropout)
        self.ff = FeedForward(d_model, d_ff)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Tensor | None = None,
        self_cache: AttentionCache | None = None,
        cross_cache: AttentionCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Args:
            x: (B, T, D) target positions (only the new ones when decoding with a cache).
            memory: (B, S, D) encoder output.
            memory_key_padding_mask: (B, S) bool, True marks source padding.
            self_cache, cross_cache: incremental decoding state of the two attentions, or None.
            need_weights: also return the attention weights.

        Returns:
            output (B, T, D), self-attention weights (B, H, T, L) and cross-attention weights
            (B, H, T, S), the weights being None unless requested.
        """
        def self_block(h: Tensor) -> tuple[Tensor, Tensor | None]:
            return self.self_attn(h, causal=True, cache=self_cache, need_weights=need_weights)

        def cross_block(h: Tensor) -> tuple[Tensor, Tensor | None]:
            return self.cross_attn(h, memory, memory_key_padding_mask, cache=cross_cache, need_weights=need_weights)

        if self.norm_first:
            h, self_weights = self_block(self.norm1(x))
            x = x + self.dropout(h)
            h, cross_weights = cross_block(self.norm2(x))
            x = x + self.dropout(h)
            return x + self.dropout(self.ff(self.norm3(x))), self_weights, cross_weights
        h, self_weights = self_block(x)
        x = self.norm1(x + self.dropout(h))
        h, cross_weights = cross_block(x)
        x = self.norm2(x + self.dropout(h))
        return self.norm3(x + self.dropout(self.ff(x))), self_weights, cross_weights
