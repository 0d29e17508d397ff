"""Reusable Transformer modules. Batch-first tensors; boolean masks with True marking padding.

    from transformer.model import Transformer
    model = Transformer(src_vocab_size=8000, tgt_vocab_size=8000, d_model=256, n_heads=4, d_ff=1024)
    logits = model(src, tgt_in)            # (B, S), (B, T) -> (B, T, V)

The same layers build a decoder-only language model (`TransformerLM`) and an encoder classifier
(`EncoderClassifier`); see examples/.
"""

from .attention import MultiHeadAttention, scaled_dot_product_attention
from .cache import AttentionCache, DecoderCache
from .classifier import EncoderClassifier
from .dropout import Dropout
from .embedding import TokenEmbedding
from .layers import ACTIVATIONS, DecoderLayer, EncoderLayer, FeedForward
from .lm import TransformerLM
from .masks import attention_mask, causal_mask
from .packing import TokenLayout
from .positional import LearnedPositionalEmbedding, SinusoidalPositionalEncoding, positional_encoding, sinusoidal_table
from .sampling import filter_logits, next_token
from .transformer import Decoder, Encoder, Transformer

__all__ = [
    "ACTIVATIONS", "AttentionCache", "Decoder", "DecoderCache", "DecoderLayer", "Dropout", "Encoder",
    "EncoderClassifier", "EncoderLayer", "FeedForward", "LearnedPositionalEmbedding", "MultiHeadAttention",
    "SinusoidalPositionalEncoding", "TokenEmbedding", "TokenLayout", "Transformer", "TransformerLM",
    "attention_mask", "causal_mask", "filter_logits", "next_token", "positional_encoding",
    "scaled_dot_product_attention", "sinusoidal_table",
]
