"""Where the matrix products of translating one sentence go: an analytic count of FLOPs by component.

The count follows what `transformer.decoding.search` runs for one sentence on its own (no padding):
the encoder reads the S source pieces once, in one pass per layer whose matrix products have S
rows; the decoder then takes n steps one after another. With the key/value cache a step feeds one
new position per hypothesis row: one row at the first step (the K hypotheses of a beam are then
the same BOS prefix), K rows at every later step (a beam of K; greedy search is K = 1). Its
self-attention reads the t + 1 positions decoded so far, its cross-attention the S source
positions, whose keys and values are projected once, at the first step. Without the cache, step t
feeds the whole prefix of t + 1 positions and projects the source's keys and values again. The
output projection runs on the newest position of each row only.

FLOPs are counted as `torch.utils.flop_counter.FlopCounterMode` counts them, two per multiply-add
of a matrix product; softmax, layer normalisation, the search's top-k and other element-wise work
are not matrix products and count nothing here (their time is still measured by the server's
"where the work goes" panel).

With D = d_model, F = d_ff, V the target vocabulary, R rows and L fed positions per row:

| component | encoder, per layer | decoder, per layer and step |
|---|---|---|
| embedding and output projection | 0 (a table lookup) | 2 R D V (once per step, not per layer) |
| Q/K/V and output projections | 8 S D² | 8 R L D² (self) + 4 R L D² (cross queries and output) + 4 S D² (source keys, values) |
| attention scores and weighted sums | 4 S² D | 4 R L (t + 1) D (self) + 4 R L S D (cross) |
| feed-forward | 4 S D F | 4 R L D F |
"""

from __future__ import annotations

from dataclasses import dataclass

from transformer.config import ModelConfig

SIDES = ("encoder", "decoder")
# The components of decoding whose matrix products are counted, by key, with the words people read.
COMPONENTS = {
    "embedding": "embedding and output projection",
    "projections": "Q/K/V and output projections",
    "attention": "attention scores and weighted sums",
    "feed_forward": "feed-forward",
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a `Transformer` that its FLOPs depend on.

    Attributes:
        d_model: model width D.
        d_ff: feed-forward inner width F.
        n_encoder_layers, n_decoder_layers: stack depths.
        vocab_size: target vocabulary V (the output projection's width).
    """

    d_model: int
    d_ff: int
    n_encoder_layers: int
    n_decoder_layers: int
    vocab_size: int

    @classmethod
    def of(cls, config: ModelConfig, tgt_vocab_size: int) -> "ModelShape":
        """The shape of a model built from `config` with a target vocabulary of `tgt_vocab_size`."""
        return cls(config.d_model, config.d_ff, config.n_encoder_layers, config.n_decoder_layers, tgt_vocab_size)


def decoding_flops(
    shape: ModelShape, source_length: int, steps: int, beam_size: int, use_cache: bool = True
) -> dict[tuple[str, str], int]:
    """The FLOPs of the matrix products that translating one sentence runs, by side and component.

    Args:
        shape: the model's sizes.
        source_length: S, the source pieces the encoder reads (EOS included).
        steps: n, the decoder calls of the search: one per output position, the final EOS included,
            until the search stopped.
        beam_size: K hypotheses per step after the first; 1 for greedy search.
        use_cache: whether the search decoded with the key/value cache.

    Returns:
        {(side, component): FLOPs} for side in `SIDES` and component in `COMPONENTS`.
    """
    if source_length < 1 or steps < 0 or beam_size < 1:
        raise ValueError(f"need source_length >= 1, steps >= 0 and beam_size >= 1, got {source_length}, {steps} "
                         f"and {beam_size}")
    D, F, V, S = shape.d_model, shape.d_ff, shape.vocab_size, source_length
    flops = {(side, component): 0 for side in SIDES for component in COMPONENTS}
    flops["encoder", "projections"] = shape.n_encoder_layers * 8 * S * D * D
    flops["encoder", "attention"] = shape.n_encoder_layers * 4 * S * S * D
    flops["encoder", "feed_forward"] = shape.n_encoder_layers * 4 * S * D * F
    for t in range(steps):
        R = 1 if t == 0 else beam_size  # rows decoded: the first step's K hypotheses are one prefix
        L = 1 if use_cache else t + 1  # positions fed per row
        source_keys_values = 4 * S * D * D if t == 0 or not use_cache else 0
        flops["decoder", "embedding"] += 2 * R * D * V
        flops["decoder", "projections"] += shape.n_decoder_layers * (12 * R * L * D * D + source_keys_values)
        flops["decoder", "attention"] += shape.n_decoder_layers * 4 * R * L * (t + 1 + S) * D
        flops["decoder", "feed_forward"] += shape.n_decoder_layers * 4 * R * L * D * F
    return flops
