"""A sequence classifier: the Transformer's encoder with a pooling layer and a linear head."""

from __future__ import annotations

from torch import Tensor, nn

from .embedding import TokenEmbedding
from .positional import positional_encoding
from .transformer import Encoder

POOLINGS = ("mean", "first")


class EncoderClassifier(nn.Module):
    """Class logits for each sequence, from an encoder stack (as BERT's classification head, without
    its pre-training).

    The sequence is embedded (`TokenEmbedding`), encoded with padding masked out, pooled into one
    D-vector, and projected to the classes: "mean" averages the real (non-padding) positions,
    "first" takes position 0 (put a class token such as BOS there).

    Args:
        vocab_size: number of token ids V.
        n_classes: number of classes C.
        d_model, n_heads, d_ff, dropout, attention_dropout, norm_first, activation, positional,
            max_len, pad_id: as for `transformer.model.TransformerLM`.
        n_layers: encoder layers N.
        pooling: "mean" or "first".
    """

    def __init__(
        self,
        vocab_size: int,
        n_classes: int,
        d_model: int = 512,
        n_heads: int = 8,
        d_ff: int = 2048,
        n_layers: int = 6,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        norm_first: bool = False,
        activation: str = "relu",
        positional: str = "sinusoidal",
        max_len: int = 1024,
        pooling: str = "mean",
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be 'mean' or 'first', got {pooling!r}")
        self.pooling, self.pad_id = pooling, pad_id
        self.embed = TokenEmbedding(vocab_size, d_model, dropout, pad_id)
        self.positions = positional_encoding(positional, d_model, max_len)
        self.encoder = Encoder(n_layers, d_model, n_heads, d_ff, dropout, attention_dropout, norm_first, activation)
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        """Args:
            tokens: (B, L) token ids, padded with `pad_id`.

        Returns:
            logits (B, C).
        """
        padding = tokens.eq(self.pad_id)
        hidden = self.encoder(self.embed(tokens, self.positions(tokens.size(1))), padding)  # (B, L, D), 0 at padding
        if self.pooling == "first":
            pooled = hidden[:, 0]
        else:
            pooled = hidden.sum(1) / (~padding).sum(1, keepdim=True).clamp(min=1)
        return self.head(pooled)
