"""Running position-wise layers on the real tokens of a padded batch only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TokenLayout:
    """Where the N real tokens of a padded (B, L) batch sit.

    Every part of an encoder layer but attention treats positions independently, so those parts
    can run on an (N, D) matrix of the real tokens: `pack` takes them out of a (B, L, D) batch,
    `unpack` puts them back with zeros at the padding, which attention then masks out.

    Attributes:
        index: (N,) positions of the real tokens in the flattened (B * L) batch, in order.
        batch_size: B.
        length: L.
    """

    index: Tensor
    batch_size: int
    length: int

    @classmethod
    def from_padding_mask(cls, key_padding_mask: Tensor) -> "TokenLayout":
        """From a (B, L) bool mask, True at padding."""
        B, L = key_padding_mask.shape
        return cls(key_padding_mask.logical_not().flatten().nonzero().squeeze(1), B, L)

    @classmethod
    def dense(cls, batch_size: int, length: int, device: torch.device | str | None = None) -> "TokenLayout":
        """The layout of a (B, L) batch without padding, built without reading any tensor."""
        return cls(torch.arange(batch_size * length, device=device), batch_size, length)

    @property
    def n_tokens(self) -> int:
        """N, the real tokens."""
        return self.index.numel()

    @property
    def is_dense(self) -> bool:
        """Whether every position is a real token (no padding, nothing to pack); known on the host."""
        return self.n_tokens == self.batch_size * self.length

    def pack(self, x: Tensor) -> Tensor:
        """(B, L, ...) -> (N, ...): the real positions."""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: Tensor) -> Tensor:
        """(N, ...) -> (B, L, ...), zeros at padding."""
        rest = x.shape[1:]
        return x.new_zeros(self.batch_size * self.length, *rest).index_copy(0, self.index, x).view(
            self.batch_size, self.length, *rest
        )
