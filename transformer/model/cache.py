"""The decoder's key/value cache for incremental decoding.

The cache is owned by the caller (e.g. a search algorithm) and passed into `Transformer.decode`;
no module keeps hidden state. Self-attention entries grow by the new positions at every step;
cross-attention entries hold the projected encoder output, computed once per source.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class AttentionCache:
    """Keys and values of one attention layer, each (B, H, L, d_k); None until first filled."""

    key: Tensor | None = None
    value: Tensor | None = None

    @property
    def length(self) -> int:
        """Number of cached positions L."""
        return 0 if self.key is None else self.key.size(2)

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Add new positions (B, H, T, d_k) and return all keys and values (B, H, L + T, d_k)."""
        if self.key is None:
            self.key, self.value = key, value
        else:
            self.key = torch.cat([self.key, key], dim=2)
            self.value = torch.cat([self.value, value], dim=2)
        return self.key, self.value

    def select(self, index: Tensor) -> None:
        """Keep batch rows `index` (LongTensor (B',)), in that order."""
        if self.key is not None:
            self.key = self.key.index_select(0, index)
            self.value = self.value.index_select(0, index)


@dataclass
class DecoderCache:
    """Per-layer caches of a decoder stack: `self_attn[i]` and `cross_attn[i]` for layer i."""

    self_attn: list[AttentionCache] = field(default_factory=list)
    cross_attn: list[AttentionCache] = field(default_factory=list)

    @classmethod
    def empty(cls, n_layers: int) -> "DecoderCache":
        """A cache with nothing in it for a decoder of `n_layers` layers."""
        return cls([AttentionCache() for _ in range(n_layers)], [AttentionCache() for _ in range(n_layers)])

    @property
    def length(self) -> int:
        """Number of target positions already decoded (the offset of the next position)."""
        return self.self_attn[0].length if self.self_attn else 0

    def select(self, index: Tensor) -> None:
        """Keep batch rows `index` of every entry: drop finished sentences or reorder anything.

        Args:
            index: (B',) LongTensor of rows to keep, in their new order.
        """
        for entry in self.self_attn + self.cross_attn:
            entry.select(index)

    def reorder_beams(self, index: Tensor) -> None:
        """Reorder self-attention entries after a beam-search step.

        Cross-attention entries are left alone, which is valid because `index` only moves rows among
        the hypotheses of the same source sentence, whose cross-attention entries are identical.

        Args:
            index: (B,) LongTensor; new row r takes the state of old row index[r].
        """
        for entry in self.self_attn:
            entry.select(index)
