"""A decoder-only language model built from the same modules as the Transformer (GPT-style)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import DecoderCache
from .embedding import TokenEmbedding
from .positional import LearnedPositionalEmbedding, positional_encoding
from .sampling import next_token
from .transformer import Decoder


class TransformerLM(nn.Module):
    """Next-token prediction with a stack of causal self-attention layers and no encoder.

    The Transformer's decoder without cross-attention (`Decoder(cross_attention=False)`), fed by
    the same `TokenEmbedding` front end, with the pre-softmax projection tied to the token
    embedding (section 3.4). Sequences are right-padded with `pad_id`: causal attention keeps real
    positions from seeing the padding after them.

    Args:
        vocab_size: number of token ids V.
        d_model: model width D.
        n_heads: attention heads H.
        d_ff: feed-forward inner width.
        n_layers: number of layers N.
        dropout: P_drop, on sub-layer outputs and on embedding + position sums.
        attention_dropout: dropout on attention weights.
        norm_first: pre-LN (as GPT-2) instead of the paper's post-LN.
        activation: the feed-forward non-linearity, "relu" (paper) or "gelu" (GPT).
        positional: "sinusoidal" (paper) or "learned".
        max_len: positions precomputed (sinusoidal) or learned.
        pad_id: the padding token id.
    """

    def __init__(
        self,
        vocab_size: int,
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
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        self.pad_id = pad_id
        self.embed = TokenEmbedding(vocab_size, d_model, dropout, pad_id)
        self.positions = positional_encoding(positional, d_model, max_len)
        self.decoder = Decoder(n_layers, d_model, n_heads, d_ff, dropout, attention_dropout, norm_first, activation,
                               cross_attention=False)

    def new_cache(self) -> DecoderCache:
        """An empty key/value cache (self-attention only) for incremental decoding with `forward`."""
        return self.decoder.new_cache()

    def forward(self, tokens: Tensor, cache: DecoderCache | None = None) -> Tensor:
        """Logits for the next token at every position.

        Args:
            tokens: (B, T) token ids: a whole sequence (teacher forcing), or with a cache only the
                T new positions after the `cache.length` already decoded.
            cache: from `new_cache()`, updated in place; or None.

        Returns:
            logits (B, T, V).
        """
        offset = 0 if cache is None else cache.length
        hidden = self.decoder(self.embed(tokens, self.positions(tokens.size(1), offset)), cache=cache)
        return F.linear(hidden, self.embed.weight)  # tied pre-softmax projection

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        eos_id: int | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Continue each prompt row, one token at a time (see `sampling.next_token`).

        A row stops at its first `eos_id` (which is kept), and its later positions are `pad_id`;
        generation ends when every row has stopped or after `max_new_tokens`.

        Args:
            prompt: (B, P) token ids, P >= 1, e.g. a column of BOS; every row of the same length.
            max_new_tokens: the most tokens added to a row.
            eos_id: the token that ends a row; None: rows end only at `max_new_tokens`.
            temperature: 0 for greedy decoding, else the sampling temperature.
            top_k, top_p: restrict sampling to the k most probable tokens / the nucleus of mass p.
            generator: random source for reproducible sampling; None: torch's global one.
            use_cache: keep keys and values between steps (the same tokens as without, faster).

        Returns:
            (B, P + n) ids, the prompt and n <= max_new_tokens new tokens.
        """
        if prompt.dim() != 2 or prompt.size(1) == 0:
            raise ValueError(f"prompt must be (B, P) with P >= 1, got shape {tuple(prompt.shape)}")
        if isinstance(self.positions, LearnedPositionalEmbedding):
            limit = self.positions.embedding.num_embeddings
            if prompt.size(1) + max_new_tokens > limit:
                raise ValueError(
                    f"{prompt.size(1)} prompt + {max_new_tokens} new tokens exceed the {limit} learned positions"
                )
        cache = self.new_cache() if use_cache else None
        tokens, feed = prompt, prompt
        finished = torch.zeros(prompt.size(0), dtype=torch.bool, device=prompt.device)
        for _ in range(max_new_tokens):
            logits = self(feed, cache)[:, -1]
            token = next_token(logits, temperature, top_k, top_p, generator)
            token = token.masked_fill(finished, self.pad_id)
            tokens = torch.cat([tokens, token.unsqueeze(1)], 1)
            if eos_id is not None:
                finished |= token.eq(eos_id)
                if bool(finished.all()):
                    break
            feed = token.unsqueeze(1) if use_cache else tokens
        return tokens
