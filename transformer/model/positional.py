"""Positional information added to token embeddings (paper section 3.5).

The paper's sinusoidal encoding, interleaved as in equations (PE(pos, 2i) = sin, PE(pos, 2i+1) = cos),
and the learned positional embedding that Table 3 row (E) compares it with. Both map a range of
positions to vectors; the caller adds them to the scaled token embeddings.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(
    length: int, d_model: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

    Computed in float64, then rounded to `dtype`.

    Returns:
        (length, d_model) tensor.
    """
    if d_model % 2:
        raise ValueError(f"sinusoidal positions need an even d_model, got {d_model}")
    position = torch.arange(length, dtype=torch.float64, device=device).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64, device=device) * (-math.log(10000.0) / d_model))
    table = torch.empty(length, d_model, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table.to(dtype)


class SinusoidalPositionalEncoding(nn.Module):
    """The paper's fixed encoding, precomputed for `max_len` positions and extended on demand.

    Args:
        d_model: model width D (even).
        max_len: positions precomputed up front; longer inputs grow the table.
    """

    def __init__(self, d_model: int, max_len: int = 1024) -> None:
        super().__init__()
        self.d_model = d_model
        # Not persistent: the table is a function of d_model, so checkpoints need not carry it.
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        """Encodings of positions offset .. offset + length - 1.

        Returns:
            (length, D) tensor.
        """
        end = offset + length
        if end > self.table.size(0):
            # In the table's dtype, so that a module cast with .to(dtype) stays in it.
            self.table = sinusoidal_table(max(end, 2 * self.table.size(0)), self.d_model, self.table.device,
                                          self.table.dtype)
        return self.table[offset:end]


class LearnedPositionalEmbedding(nn.Module):
    """One trained vector per position, up to `max_len` positions (paper Table 3, row E).

    Args:
        d_model: model width D.
        max_len: number of positions that have a vector; longer inputs are an error.
    """

    def __init__(self, d_model: int, max_len: int = 1024) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.embedding.weight, std=d_model**-0.5)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        """Embeddings of positions offset .. offset + length - 1.

        Returns:
            (length, D) tensor.
        """
        end = offset + length
        if end > self.embedding.num_embeddings:
            raise ValueError(
                f"position {end - 1} is beyond the {self.embedding.num_embeddings} learned positions (model.max_len)"
            )
        return self.embedding.weight[offset:end]


def positional_encoding(kind: str, d_model: int, max_len: int = 1024) -> nn.Module:
    """The positions module named by `kind`: "sinusoidal" (paper) or "learned" (Table 3, row E).

    Returns:
        a module mapping (length, offset) to (length, D) encodings.
    """
    if kind == "sinusoidal":
        return SinusoidalPositionalEncoding(d_model, max_len)
    if kind == "learned":
        return LearnedPositionalEmbedding(d_model, max_len)
    raise ValueError(f"positional must be 'sinusoidal' or 'learned', got {kind!r}")
