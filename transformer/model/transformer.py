"""Encoder and decoder stacks and the full encoder-decoder Transformer (paper section 3, Figure 1)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .cache import DecoderCache
from .dropout import Dropout
from .layers import DecoderLayer, EncoderLayer
from .packing import TokenLayout
from .positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding

if TYPE_CHECKING:
    from ..config import ModelConfig


class Encoder(nn.Module):
    """A stack of `EncoderLayer`s, with the final LayerNorm that pre-LN needs.

    Args:
        n_layers: number of layers N.
        Other arguments: as for `EncoderLayer`.
    """

    def __init__(
        self, n_layers: int, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1,
        attention_dropout: float = 0.0, norm_first: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, d_ff, dropout, attention_dropout, norm_first) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model) if norm_first else None

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, layout: TokenLayout | None = None
    ) -> Tensor:
        """(B, S, D) -> (B, S, D); `key_padding_mask` (B, S) bool, True marks padding.

        With padding, the layers run on the real tokens only (see `TokenLayout`), and the output is
        zero at padding positions. The layout is found from the mask, which reads the mask on the
        host (a wait for a GPU), unless the caller gives it: `layout`, the real tokens of this
        mask, as training's batches carry it from the host.
        """
        if layout is None and key_padding_mask is not None and bool(key_padding_mask.any()):
            layout = TokenLayout.from_padding_mask(key_padding_mask)
        if layout is not None:
            x = layout.pack(x)
        for layer in self.layers:
            x = layer(x, key_padding_mask, layout)
        if self.norm is not None:
            x = self.norm(x)
        return x if layout is None else layout.unpack(x)


class Decoder(nn.Module):
    """A stack of `DecoderLayer`s, with the final LayerNorm that pre-LN needs.

    Args: as for `Encoder`.
    """

    def __init__(
        self, n_layers: int, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1,
        attention_dropout: float = 0.0, norm_first: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, n_heads, d_ff, dropout, attention_dropout, norm_first) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model) if norm_first else None

    def forward(
        self, x: Tensor, memory: Tensor, memory_key_padding_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        """Args:
            x: (B, T, D) target positions (only the new ones when decoding with a cache).
            memory: (B, S, D) encoder output.
            memory_key_padding_mask: (B, S) bool, True marks source padding.
            cache: incremental decoding state, updated in place; or None.

        Returns:
            (B, T, D).
        """
        for i, layer in enumerate(self.layers):
            self_cache = None if cache is None else cache.self_attn[i]
            cross_cache = None if cache is None else cache.cross_attn[i]
            x = layer(x, memory, memory_key_padding_mask, self_cache, cross_cache)[0]
        return x if self.norm is None else self.norm(x)


class Transformer(nn.Module):
    """The encoder-decoder Transformer for sequence-to-sequence tasks such as translation.

    Token embeddings are multiplied by sqrt(d_model) and summed with positional encodings, then
    dropout is applied (section 3.4, 5.4). Target positions attend causally; padding (`pad_id`) is
    masked out of every attention over the source. Targets are assumed right-padded, so causal
    masking alone keeps real target positions from seeing target padding.

    Args:
        src_vocab_size: source vocabulary size.
        tgt_vocab_size: target vocabulary size V.
        d_model: model width D.
        n_heads: attention heads H.
        d_ff: feed-forward inner width.
        n_encoder_layers, n_decoder_layers: stack depths N.
        dropout: P_drop, on sub-layer outputs and on embedding + position sums.
        attention_dropout: dropout on attention weights.
        norm_first: pre-LN instead of the paper's post-LN.
        positional: "sinusoidal" (paper) or "learned" (Table 3, row E).
        max_len: positions precomputed (sinusoidal) or learned.
        share_embeddings: one embedding matrix for source and target (requires equal vocabularies).
        tie_output: the pre-softmax projection shares the target embedding matrix (section 3.4).
        pad_id: the padding token id.
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        d_model: int = 512,
        n_heads: int = 8,
        d_ff: int = 2048,
        n_encoder_layers: int = 6,
        n_decoder_layers: int = 6,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
        norm_first: bool = False,
        positional: str = "sinusoidal",
        max_len: int = 1024,
        share_embeddings: bool = False,
        tie_output: bool = True,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        if share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError(
                f"share_embeddings needs one vocabulary, got source {src_vocab_size} and target {tgt_vocab_size}"
            )
        self.d_model, self.pad_id = d_model, pad_id
        self.src_embed = nn.Embedding(src_vocab_size, d_model, padding_idx=pad_id)
        self.tgt_embed = self.src_embed if share_embeddings else nn.Embedding(tgt_vocab_size, d_model, padding_idx=pad_id)
        for embedding in {self.src_embed, self.tgt_embed}:
            # Unit variance after the sqrt(d_model) scaling; the padding row stays zero.
            nn.init.normal_(embedding.weight, std=d_model**-0.5)
            with torch.no_grad():
                embedding.weight[pad_id].zero_()
        if positional == "sinusoidal":
            self.positions: nn.Module = SinusoidalPositionalEncoding(d_model, max_len)
        elif positional == "learned":
            self.positions = LearnedPositionalEmbedding(d_model, max_len)
        else:
            raise ValueError(f"positional must be 'sinusoidal' or 'learned', got {positional!r}")
        self.dropout = Dropout(dropout)
        self.encoder = Encoder(n_encoder_layers, d_model, n_heads, d_ff, dropout, attention_dropout, norm_first)
        self.decoder = Decoder(n_decoder_layers, d_model, n_heads, d_ff, dropout, attention_dropout, norm_first)
        self.output_projection = nn.Linear(d_model, tgt_vocab_size, bias=False)
        if tie_output:
            self.output_projection.weight = self.tgt_embed.weight
        else:
            nn.init.normal_(self.output_projection.weight, std=d_model**-0.5)

    @classmethod
    def from_config(
        cls, cfg: "ModelConfig", src_vocab_size: int, tgt_vocab_size: int, pad_id: int = 0
    ) -> "Transformer":
        """Build a model from a `transformer.config.ModelConfig` and the vocabulary sizes."""
        return cls(
            src_vocab_size, tgt_vocab_size, d_model=cfg.d_model, n_heads=cfg.n_heads, d_ff=cfg.d_ff,
            n_encoder_layers=cfg.n_encoder_layers, n_decoder_layers=cfg.n_decoder_layers, dropout=cfg.dropout,
            attention_dropout=cfg.attention_dropout, norm_first=cfg.norm_first, positional=cfg.positional,
            max_len=cfg.max_len, share_embeddings=cfg.share_embeddings, tie_output=cfg.tie_output, pad_id=pad_id,
        )

    @classmethod
    def base(cls, vocab_size: int, **overrides: object) -> "Transformer":
        """The paper's base model (Table 3): N=6, D=512, d_ff=2048, H=8, P_drop=0.1, shared vocabulary."""
        kwargs = dict(d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6, dropout=0.1,
                      share_embeddings=True, tie_output=True)
        return cls(vocab_size, vocab_size, **{**kwargs, **overrides})

    @classmethod
    def big(cls, vocab_size: int, **overrides: object) -> "Transformer":
        """The paper's big model (Table 3): N=6, D=1024, d_ff=4096, H=16, P_drop=0.3, shared vocabulary."""
        kwargs = dict(d_model=1024, n_heads=16, d_ff=4096, n_encoder_layers=6, n_decoder_layers=6, dropout=0.3,
                      share_embeddings=True, tie_output=True)
        return cls(vocab_size, vocab_size, **{**kwargs, **overrides})

    def padding_mask(self, tokens: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L) bool, True at padding."""
        return tokens.eq(self.pad_id)

    def new_cache(self) -> DecoderCache:
        """An empty key/value cache for incremental decoding with `decode`."""
        return DecoderCache.empty(len(self.decoder.layers))

    def _embed(self, embedding: nn.Embedding, tokens: Tensor, offset: int = 0) -> Tensor:
        """(B, L) ids -> (B, L, D): Dropout(Embedding * sqrt(D) + PE)."""
        x = embedding(tokens) * math.sqrt(self.d_model) + self.positions(tokens.size(1), offset)
        return self.dropout(x)

    def encode(self, src: Tensor, layout: TokenLayout | None = None) -> Tensor:
        """Run the encoder.

        Args:
            src: (B, S) source token ids, padded with `pad_id`.
            layout: optional, where the real (non-pad) tokens of `src` are, if known without reading
                `src` (see `Encoder.forward`); None finds them from `src`.

        Returns:
            memory (B, S, D), zero at padding. Pass `padding_mask(src)` along with it to `decode`.
        """
        return self.encoder(self._embed(self.src_embed, src), self.padding_mask(src), layout)

    def decode_hidden(
        self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        """The decoder's final states, before the output projection (see `decode`).

        Returns:
            (B, T, D).
        """
        offset = 0 if cache is None else cache.length
        return self.decoder(self._embed(self.tgt_embed, tgt, offset), memory, memory_key_padding_mask, cache)

    def project(self, hidden: Tensor) -> Tensor:
        """Pre-softmax linear projection: (..., D) -> (..., V) logits."""
        return self.output_projection(hidden)

    def decode(
        self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        """Run the decoder and the output projection.

        Args:
            tgt: (B, T) target ids: the whole shifted-right target, or with a cache only the T new
                positions after the `cache.length` already decoded.
            memory: (B, S, D) from `encode`.
            memory_key_padding_mask: (B, S) bool, True marks source padding (`padding_mask(src)`).
            cache: from `new_cache()`, updated in place; or None to decode without one.

        Returns:
            logits (B, T, V).
        """
        return self.project(self.decode_hidden(tgt, memory, memory_key_padding_mask, cache))

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """Teacher-forced logits.

        Args:
            src: (B, S) source ids, padded with `pad_id`.
            tgt: (B, T) target ids shifted right (starting with BOS), right-padded with `pad_id`.

        Returns:
            logits (B, T, V) for the next token at every target position.
        """
        memory = self.encode(src)
        return self.decode(tgt, memory, self.padding_mask(src))

    @torch.no_grad()
    def attention_maps(self, src: Tensor, tgt: Tensor) -> dict[str, list[Tensor]]:
        """Every attention distribution for one teacher-forced pass, for visualisation.

        Args:
            src: (B, S) source ids.
            tgt: (B, T) shifted-right target ids.

        Returns:
            {"encoder": [(B, H, S, S)] per layer, "decoder": [(B, H, T, T)] per layer,
             "cross": [(B, H, T, S)] per layer}.
        """
        src_mask = self.padding_mask(src)
        maps: dict[str, list[Tensor]] = {"encoder": [], "decoder": [], "cross": []}
        x = self._embed(self.src_embed, src)
        for layer in self.encoder.layers:
            source = layer.norm1(x) if layer.norm_first else x
            maps["encoder"].append(layer.self_attn(source, key_padding_mask=src_mask, need_weights=True)[1])
            x = layer(x, src_mask)
        memory = x if self.encoder.norm is None else self.encoder.norm(x)
        y = self._embed(self.tgt_embed, tgt)
        for layer in self.decoder.layers:
            y, self_weights, cross_weights = layer(y, memory, src_mask, need_weights=True)
            maps["decoder"].append(self_weights)
            maps["cross"].append(cross_weights)
        return maps
