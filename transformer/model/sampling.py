"""Choosing the next token from a model's logits: greedy, temperature, top-k and top-p sampling."""

from __future__ import annotations

import torch
from torch import Tensor


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf every logit outside the top-k tokens and outside the nucleus (top-p) of each row.

    Top-k keeps the k highest logits (Fan et al., 2018). Top-p keeps the smallest set of most
    probable tokens whose probabilities sum to at least p: the tokens sorted by probability are
    kept while the probability of those before them is below p (Holtzman et al., 2020). With both,
    top-k applies first and top-p to what it leaves. The most probable token is always kept.

    Args:
        logits: (B, V) unnormalised scores.
        top_k: keep this many tokens per row; 0 keeps all.
        top_p: nucleus mass in (0, 1]; 1.0 keeps all.

    Returns:
        (B, V) logits, -inf where filtered out.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if 0 < top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1, dtype=torch.float32)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token per row: the argmax for `temperature=0`, else a sample from softmax(logits / temperature)
    restricted by `filter_logits`.

    Args:
        logits: (B, V) scores for the next position.
        temperature: 0 for greedy decoding; below 1 sharpens, above 1 flattens the distribution.
        top_k, top_p: see `filter_logits`.
        generator: the random source of the sample, for reproducible sampling; None: torch's global one.

    Returns:
        (B,) token ids.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
