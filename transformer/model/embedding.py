"""The input front end of every stack: scaled token embeddings plus positions, then dropout."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .dropout import Dropout


class TokenEmbedding(nn.Embedding):
    """Dropout(E[tokens] * sqrt(D) + positions) (paper sections 3.4, 3.5 and 5.4).

    A token table initialised N(0, 1/D), so that rows have unit variance after the sqrt(D)
    scaling, with the padding row kept zero. The positional encodings are an argument of `forward`
    rather than a part of this module, so that one positions module can serve several tables (the
    source and target sides of `Transformer`). `weight` is the (V, D) table that a tied pre-softmax
    projection shares.

    Args:
        vocab_size: number of token ids V.
        d_model: model width D.
        dropout: P_drop on the sum of embeddings and positions.
        pad_id: the padding token id, whose row stays zero and receives no gradient.
    """

    def __init__(self, vocab_size: int, d_model: int, dropout: float = 0.1, pad_id: int = 0) -> None:
        super().__init__(vocab_size, d_model, padding_idx=pad_id)
        nn.init.normal_(self.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.weight[pad_id].zero_()
        self.scale = math.sqrt(d_model)
        self.dropout = Dropout(dropout)

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:  # type: ignore[override]
        """Args:
            tokens: (B, L) token ids.
            positions: (L, D) encodings of the L positions, e.g. `SinusoidalPositionalEncoding(L, offset)`.

        Returns:
            (B, L, D).
        """
        return self.dropout(super().forward(tokens) * self.scale + positions)
