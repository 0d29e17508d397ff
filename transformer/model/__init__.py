"""Reusable Transformer modules. Batch-first tensors; boolean masks with True marking padding.

    from transformer.model import Transformer
    model = Transformer(src_vocab_size=8000, tgt_vocab_size=8000, d_model=256, n_heads=4, d_ff=1024)
    logits = model(src, tgt_in)            # (B, S), (B, T) -> (B, T, V)
"""

from .attention import MultiHeadAttention, scaled_dot_product_attention
from .cache import AttentionCache, DecoderCache
from .dropout import Dropout
from .layers import DecoderLayer, EncoderLayer, FeedForward
from .masks import attention_mask, causal_mask
from .packing import TokenLayout
from .positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding, sinusoidal_table
from .transformer import Decoder, Encoder, Transformer

__all__ = [
    "AttentionCache", "Decoder", "DecoderCache", "DecoderLayer", "Dropout", "Encoder", "EncoderLayer", "FeedForward",
    "LearnedPositionalEmbedding", "MultiHeadAttention", "SinusoidalPositionalEncoding", "TokenLayout", "Transformer",
    "attention_mask", "causal_mask", "scaled_dot_product_attention", "sinusoidal_table",
]
