"""Encoder and decoder stacks and the full encoder-decoder Transformer (paper section 3, Figure 1)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .cache import DecoderCache
from .embedding import TokenEmbedding
from .layers import DecoderLayer, EncoderLayer
from .packing import TokenLayout
from .positional import positional_encoding

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
        attention_dropout: float = 0.0, norm_first: bool = False, activation: str = "relu",
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, d_ff, dropout, attention_dropout, norm_first, activation)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model) if norm_first else None

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, layout: TokenLayout | None = None,
        weights: list[Tensor] | None = None,
    ) -> Tensor:
        """(B, S, D) -> (B, S, D); `key_padding_mask` (B, S) bool, True marks padding.

        With padding, the layers run on the real tokens only (see `TokenLayout`), and the output is
        zero at padding positions. The layout is found from the mask, which reads the mask on the
        host (a wait for a GPU), unless the caller gives it: `layout`, the real tokens of this
        mask, as training's batches carry it from the host (a dense one for a batch without
        padding, which then runs unpacked). If `weights` is a list, each layer's self-attention
        weights (B, H, S, S) are appended to it.
        """
        if layout is None and key_padding_mask is not None and bool(key_padding_mask.any()):
            layout = TokenLayout.from_padding_mask(key_padding_mask)
        if layout is not None and layout.is_dense:
            layout = None
        if layout is not None:
            x = layout.pack(x)
        for layer in self.layers:
            x, layer_weights = layer(x, key_padding_mask, layout, need_weights=weights is not None)
            if weights is not None:
                weights.append(layer_weights)
        if self.norm is not None:
            x = self.norm(x)
        return x if layout is None else layout.unpack(x)


class Decoder(nn.Module):
    """A stack of `DecoderLayer`s, with the final LayerNorm that pre-LN needs.

    With `cross_attention=False` it is the stack of a decoder-only language model: `memory` is
    then None and the cache holds self-attention entries only (`new_cache`).

    Args:
        cross_attention: whether the layers attend over an encoder output.
        Other arguments: as for `Encoder`.
    """

    def __init__(
        self, n_layers: int, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1,
        attention_dropout: float = 0.0, norm_first: bool = False, activation: str = "relu",
        cross_attention: bool = True,
    ) -> None:
        super().__init__()
        self.cross_attention = cross_attention
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, n_heads, d_ff, dropout, attention_dropout, norm_first, activation, cross_attention)
            for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model) if norm_first else None

    def new_cache(self) -> DecoderCache:
        """An empty key/value cache for incremental decoding through this stack."""
        return DecoderCache.empty(len(self.layers), self.cross_attention)

    def forward(
        self, x: Tensor, memory: Tensor | None = None, memory_key_padding_mask: Tensor | None = None,
        cache: DecoderCache | None = None, self_weights: list[Tensor] | None = None,
        cross_weights: list[Tensor] | None = None,
    ) -> Tensor:
        """Args:
            x: (B, T, D) target positions (only the new ones when decoding with a cache).
            memory: (B, S, D) encoder output; None without cross-attention.
            memory_key_padding_mask: (B, S) bool, True marks source padding.
            cache: incremental decoding state, updated in place; or None.
            self_weights, cross_weights: if lists, each layer's self-attention weights (B, H, T, L)
                and cross-attention weights (B, H, T, S) are appended to them.

        Returns:
            (B, T, D).
        """
        need_weights = self_weights is not None or cross_weights is not None
        for i, layer in enumerate(self.layers):
            self_cache = None if cache is None else cache.self_attn[i]
            cross_cache = None if cache is None or not self.cross_attention else cache.cross_attn[i]
            x, layer_self, layer_cross = layer(
                x, memory, memory_key_padding_mask, self_cache, cross_cache, need_weights
            )
            if self_weights is not None:
                self_weights.append(layer_self)
            if cross_weights is not None and layer_cross is not None:
                cross_weights.append(layer_cross)
        return x if self.norm is None else self.norm(x)


class Transformer(nn.Module):
    """The encoder-decoder Transformer for sequence-to-sequence tasks such as translation.

    Token embeddings are multiplied by sqrt(d_model) and summed with positional encodings, then
    dropout is applied (section 3.4, 5.4; `TokenEmbedding`). Target positions attend causally;
    padding (`pad_id`) is masked out of every attention over the source. Targets are assumed
    right-padded, so causal masking alone keeps real target positions from seeing target padding.

    The keyword defaults are those of `transformer.config.ModelConfig` (the paper's base model,
    with separate embeddings, since a model cannot assume one vocabulary for both sides), and
    `from_config` passes every field of it by name.

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
        activation: the feed-forward non-linearity, "relu" (paper) or "gelu".
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
        activation: str = "relu",
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
        self.src_embed = TokenEmbedding(src_vocab_size, d_model, dropout, pad_id)
        self.tgt_embed = (
            self.src_embed if share_embeddings else TokenEmbedding(tgt_vocab_size, d_model, dropout, pad_id)
        )
        self.positions = positional_encoding(positional, d_model, max_len)  # one module for both sides
        self.encoder = Encoder(n_encoder_layers, d_model, n_heads, d_ff, dropout, attention_dropout, norm_first,
                               activation)
        self.decoder = Decoder(n_decoder_layers, d_model, n_heads, d_ff, dropout, attention_dropout, norm_first,
                               activation)
        self.output_projection = nn.Linear(d_model, tgt_vocab_size, bias=False)
        if tie_output:
            self.output_projection.weight = self.tgt_embed.weight
        else:
            nn.init.normal_(self.output_projection.weight, std=d_model**-0.5)

    @classmethod
    def from_config(
        cls, cfg: "ModelConfig", src_vocab_size: int, tgt_vocab_size: int, pad_id: int = 0
    ) -> "Transformer":
        """Build a model from a `transformer.config.ModelConfig` (each field is a keyword of the constructor)."""
        return cls(src_vocab_size, tgt_vocab_size, pad_id=pad_id, **dataclasses.asdict(cfg))

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
        return self.decoder.new_cache()

    def encode(self, src: Tensor, layout: TokenLayout | None = None) -> Tensor:
        """Run the encoder.

        Args:
            src: (B, S) source token ids, padded with `pad_id`.
            layout: optional, where the real (non-pad) tokens of `src` are, if known without reading
                `src` (see `Encoder.forward`); None finds them from `src`.

        Returns:
            memory (B, S, D), zero at padding. Pass `padding_mask(src)` along with it to `decode`.
        """
        return self.encoder(self.src_embed(src, self.positions(src.size(1))), self.padding_mask(src), layout)

    def decode_hidden(
        self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> Tensor:
        """The decoder's final states, before the output projection (see `decode`).

        Returns:
            (B, T, D).
        """
        offset = 0 if cache is None else cache.length
        x = self.tgt_embed(tgt, self.positions(tgt.size(1), offset))
        return self.decoder(x, memory, memory_key_padding_mask, cache)

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
        maps: dict[str, list[Tensor]] = {"encoder": [], "decoder": [], "cross": []}
        src_mask = self.padding_mask(src)
        memory = self.encoder(self.src_embed(src, self.positions(src.size(1))), src_mask, weights=maps["encoder"])
        self.decoder(self.tgt_embed(tgt, self.positions(tgt.size(1))), memory, src_mask,
                     self_weights=maps["decoder"], cross_weights=maps["cross"])
        return maps
