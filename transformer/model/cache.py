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
    """Keys and values of one attention layer, each (B, H, L, d_k); None until first filled.

    Self-attention entries are views of the first L positions of storage (B, H, capacity, d_k).
    `select`, which beam search calls after every step to reorder its hypotheses, copies the kept
    rows into new storage with room for exactly one more position, so that the next one-position
    `append` writes in place and leaves `key` and `value` contiguous, which attention reads
    without another copy. An append that does not fit reallocates to the exact size. Storage that
    grows geometrically would need fewer reallocations, but its strided views would be copied by
    the attention matmuls at every step, which costs more (docs/benchmarks.md).

    Cross-attention entries are set once, contiguous, by `MultiHeadAttention`.
    """

    key: Tensor | None = None
    value: Tensor | None = None
    _key_storage: Tensor | None = field(default=None, repr=False)
    _value_storage: Tensor | None = field(default=None, repr=False)

    @property
    def length(self) -> int:
        """Number of cached positions L."""
        return 0 if self.key is None else self.key.size(2)

    def append(self, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Add new positions (B, H, T, d_k) and return all keys and values (B, H, L + T, d_k)."""
        L, T = self.length, key.size(2)
        if self._key_storage is None or self._value_storage is None or L + T > self._key_storage.size(2):
            key_storage = key.new_empty(key.size(0), key.size(1), L + T, key.size(3))
            value_storage = value.new_empty(value.size(0), value.size(1), L + T, value.size(3))
            if self.key is not None and self.value is not None:
                key_storage[:, :, :L] = self.key
                value_storage[:, :, :L] = self.value
            self._key_storage, self._value_storage = key_storage, value_storage
        self._key_storage[:, :, L : L + T] = key
        self._value_storage[:, :, L : L + T] = value
        self.key, self.value = self._key_storage[:, :, : L + T], self._value_storage[:, :, : L + T]
        return self.key, self.value

    def select(self, index: Tensor) -> None:
        """Keep batch rows `index` (LongTensor (B',)), in that order."""
        if self.key is None or self.value is None:
            return
        if self._key_storage is None or self._value_storage is None:  # set directly (cross-attention)
            self.key, self.value = self.key.index_select(0, index), self.value.index_select(0, index)
            return
        L = self.length
        key_storage = self.key.new_empty(len(index), self.key.size(1), L + 1, self.key.size(3))
        value_storage = self.value.new_empty(len(index), self.value.size(1), L + 1, self.value.size(3))
        torch.index_select(self.key, 0, index, out=key_storage[:, :, :L])
        torch.index_select(self.value, 0, index, out=value_storage[:, :, :L])
        self._key_storage, self._value_storage = key_storage, value_storage
        self.key, self.value = key_storage[:, :, :L], value_storage[:, :, :L]


@dataclass
class DecoderCache:
    """Per-layer caches of a decoder stack: `self_attn[i]` and `cross_attn[i]` for layer i.

    A stack without cross-attention (a decoder-only language model) has an empty `cross_attn`.
    """

    self_attn: list[AttentionCache] = field(default_factory=list)
    cross_attn: list[AttentionCache] = field(default_factory=list)

    @classmethod
    def empty(cls, n_layers: int, cross_attention: bool = True) -> "DecoderCache":
        """A cache with nothing in it for a decoder of `n_layers` layers, with or without cross-attention."""
        cross = [AttentionCache() for _ in range(n_layers)] if cross_attention else []
        return cls([AttentionCache() for _ in range(n_layers)], cross)

    @property
    def length(self) -> int:
        """Number of target positions already decoded (the offset of the next position)."""
        return self.self_attn[0].length if self.self_attn else 0

    def select(self, index: Tensor, memory_index: Tensor | None = None) -> None:
        """Keep batch rows `index` of every entry: drop finished sentences or reorder anything.

        Args:
            index: (B',) LongTensor of rows to keep, in their new order.
            memory_index: rows to keep of the cross-attention entries when these hold fewer rows
                than the self-attention ones (a memory shared by several hypotheses, see
                `MultiHeadAttention`); None: `index`.
        """
        for entry in self.self_attn:
            entry.select(index)
        for entry in self.cross_attn:
            entry.select(index if memory_index is None else memory_index)

    def reorder_beams(self, index: Tensor) -> None:
        """Reorder self-attention entries after a beam-search step.

        Cross-attention entries are left alone, which is valid because `index` only moves rows among
        the hypotheses of the same source sentence, whose cross-attention entries are identical (or
        shared, when the memory has one row per sentence).

        Args:
            index: (B,) LongTensor; new row r takes the state of old row index[r].
        """
        for entry in self.self_attn:
            entry.select(index)
