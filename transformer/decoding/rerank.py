"""Noisy-channel reranking: rescore a beam's candidates with a model of the reverse direction.

A forward model p(y | x) can prefer a fluent output that drops or adds content. A model trained in
the other direction, p(x | y), asks how well each candidate explains the source, which penalises
exactly those outputs (Yee et al., 2019, "Simple and Effective Noisy Channel Modeling for Neural
Machine Translation", which adds a target language model as well; none is used here). Each of the
beam's K finished candidates gets

    score(y) = log p(y | x) / lp(|y|) + weight * log p(x | y) / |x|

the first term being the beam's own length-normalised score (`transformer.decoding.search`; |y| counts the
EOS), the second the reverse model's teacher-forced log-probability of the source ids (EOS
included) given the candidate, per source token; the best is kept. The reverse model must
tokenize as the forward model does, with the sides swapped; the two directions' models of one
training set share one joint vocabulary, so for them this holds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from transformer.config import DecodeConfig
from transformer.data.batches import ParallelData, collate, make_batches
from transformer.data.tokenizer import EOS_ID, PAD_ID
from transformer.decoding.search import Hypothesis, position_limit
from transformer.model import Transformer

logger = logging.getLogger(__name__)


@dataclass
class ChannelReranker:
    """A reverse-direction model and the weight of its score.

    Attributes:
        model: reads target-language ids, scores source-language ids; in eval mode.
        weight: lambda >= 0 of its per-source-token log-probability; 0 keeps the beam's best.
    """

    model: Transformer
    weight: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"the reranking weight must be finite and >= 0, got {self.weight}")


@torch.inference_mode()
def channel_log_probs(
    model: Transformer, sources: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
    batch_tokens: int = DecodeConfig.batch_tokens,
) -> list[float]:
    """log p(source | output) under a reverse model, for each (source, output) pair.

    Args:
        model: the reverse model, in eval mode.
        sources: source ids of the forward direction, each ending with EOS; the reverse model's targets.
        outputs: forward outputs without BOS or EOS (as `Hypothesis.tokens`); EOS is appended to make
            the reverse model's source, as training does.
        batch_tokens: padded tokens per side per batch.

    Returns:
        The summed log-probabilities of every source token (its EOS included), in float32 or the
        model's precision when higher.
    """
    if len(sources) != len(outputs):
        raise ValueError(f"{len(sources)} sources but {len(outputs)} outputs")
    device = next(model.parameters()).device
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    # The reverse direction's pairs: each output with EOS is a source, each source without its EOS
    # a target (`collate` adds BOS and EOS to targets, as in training).
    pairs = ParallelData(src=[list(y) + [EOS_ID] for y in outputs], tgt=[list(x[:-1]) for x in sources],
                         indices=list(range(len(sources))))
    scores = [0.0] * len(sources)
    for indices in make_batches(pairs.src_lens, pairs.tgt_lens, batch_tokens):
        batch = collate(indices, pairs)
        tgt_out = batch.tgt_out.to(device)
        logits = model(batch.src.to(device), batch.tgt_in.to(device)).to(dtype)  # (B, T, V); no copy in float32
        picked = logits.gather(2, tgt_out.unsqueeze(2)).squeeze(2) - logits.logsumexp(dim=-1)
        for i, value in zip(indices, picked.masked_fill(tgt_out == PAD_ID, 0.0).sum(dim=1).tolist()):
            scores[i] = value
    return scores


def rerank(
    reranker: ChannelReranker, sources: Sequence[Sequence[int]], candidates: Sequence[Sequence[Hypothesis]],
    batch_tokens: int = DecodeConfig.batch_tokens,
) -> list[list[int]]:
    """The best candidate of each source by the noisy-channel score: the first of `rerank_candidates`.

    Returns:
        The chosen output ids per source; [] for a source with no candidate.
    """
    return [list(ranked[0].tokens) if ranked else [] for ranked in
            rerank_candidates(reranker, sources, candidates, batch_tokens)]


def rerank_candidates(
    reranker: ChannelReranker, sources: Sequence[Sequence[int]], candidates: Sequence[Sequence[Hypothesis]],
    batch_tokens: int = DecodeConfig.batch_tokens,
) -> list[list[Hypothesis]]:
    """Each source's candidates ranked by the noisy-channel score (see the module docstring).

    Args:
        reranker: the reverse model and its weight.
        sources: source ids, each ending with EOS.
        candidates: each source's finished hypotheses (as `beam_search` returns them with n_best = K).
        batch_tokens: padded tokens per side per batch of the reverse model.

    Returns:
        Per source, its candidates sorted by the noisy-channel score, best first (the beam's order
        among equal scores), each with that score. A source whose source or a candidate is longer
        than the reverse model's learned positions keeps the beam's order and scores, with a warning.
    """
    limit = position_limit(reranker.model)

    def too_long(i: int) -> str | None:
        """Why sentence i does not fit the reverse model's learned positions, or None."""
        if limit is None:
            return None
        if len(sources[i]) > limit:
            return f"its {len(sources[i])} source tokens are more than the reranking model's {limit} positions"
        longest = max(len(h.tokens) for h in candidates[i]) + 1  # the reverse model reads it with EOS
        if longest > limit:
            return f"an output of {longest} tokens is longer than the reranking model's {limit} positions"
        return None

    scored = []
    for i in range(len(sources)):
        if candidates[i]:
            reason = too_long(i)
            if reason is None:
                scored.append(i)
            else:
                logger.warning("a sentence was not reranked (%s): kept the beam's best", reason)
    pairs = [(i, k) for i in scored for k in range(len(candidates[i]))]
    channel = channel_log_probs(reranker.model, [sources[i] for i, _ in pairs],
                                [candidates[i][k].tokens for i, k in pairs], batch_tokens)
    ranked: list[list[Hypothesis]] = [list(hypotheses) for hypotheses in candidates]
    for i in scored:
        ranked[i] = []
    for (i, k), log_p in zip(pairs, channel):
        score = candidates[i][k].score + reranker.weight * log_p / len(sources[i])
        ranked[i].append(Hypothesis(list(candidates[i][k].tokens), score))
    for i in scored:
        ranked[i].sort(key=lambda h: -h.score)  # stable: among equal scores the beam's order
    return ranked
