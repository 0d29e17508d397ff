"""Noisy-channel reranking: rescore a beam's candidates with a model of the reverse direction.

A forward model p(y | x) can prefer a fluent output that drops or adds content. A model trained in
the other direction, p(x | y), asks how well each candidate explains the source, which penalises
exactly those outputs (Yee et al., 2019, "Simple and Effective Noisy Channel Modeling for Neural
Machine Translation", which adds a target language model as well; none is used here). Each of the
beam's K finished candidates gets

    score(y) = log p(y | x) / lp(|y|) + weight * log p(x | y) / |x|

the first term being the beam's own length-normalised score (`transformer.search`), the second the
reverse model's teacher-forced log-probability of the source ids (EOS included) given the
candidate, per source token, and the best is kept. The reverse model must tokenize as the forward
model does, with the sides swapped; the two directions' models of one training set share one joint
vocabulary, so for them this holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from transformer.data import make_batches
from transformer.model import Transformer
from transformer.search import Hypothesis, position_limit
from transformer.tokenizer import BOS_ID, EOS_ID, PAD_ID

logger = logging.getLogger(__name__)


@dataclass
class ChannelReranker:
    """A reverse-direction model and the weight of its score.

    Attributes:
        model: reads target-language ids, scores source-language ids; in eval mode.
        weight: lambda >= 0 of its per-source-token log-probability; 0 keeps the beam's order.
    """

    model: Transformer
    weight: float

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"the reranking weight must be >= 0, got {self.weight}")


@torch.inference_mode()
def channel_log_probs(
    model: Transformer, sources: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], batch_tokens: int = 8000,
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
    reverse_src = [list(y) + [EOS_ID] for y in outputs]
    scores = [0.0] * len(sources)
    for batch in make_batches([len(y) for y in reverse_src], [len(x) for x in sources], batch_tokens):
        src = torch.full((len(batch), max(len(reverse_src[i]) for i in batch)), PAD_ID, dtype=torch.long)
        tgt_in = torch.full((len(batch), max(len(sources[i]) for i in batch)), PAD_ID, dtype=torch.long)
        tgt_out = torch.full_like(tgt_in, PAD_ID)
        for r, i in enumerate(batch):
            src[r, : len(reverse_src[i])] = torch.tensor(reverse_src[i])
            tgt_in[r, : len(sources[i])] = torch.tensor([BOS_ID, *sources[i][:-1]])
            tgt_out[r, : len(sources[i])] = torch.tensor(sources[i])
        src, tgt_in, tgt_out = src.to(device), tgt_in.to(device), tgt_out.to(device)
        log_probs = model(src, tgt_in).to(dtype).log_softmax(dim=-1)
        picked = log_probs.gather(2, tgt_out.unsqueeze(2)).squeeze(2).masked_fill(tgt_out == PAD_ID, 0.0)
        for i, value in zip(batch, picked.sum(dim=1).tolist()):
            scores[i] = value
    return scores


def rerank(
    reranker: ChannelReranker, sources: Sequence[Sequence[int]], candidates: Sequence[Sequence[Hypothesis]],
    batch_tokens: int = 8000,
) -> list[list[int]]:
    """The best candidate of each source by the noisy-channel score (see the module docstring).

    Args:
        reranker: the reverse model and its weight.
        sources: source ids, each ending with EOS.
        candidates: each source's finished hypotheses (as `beam_search` returns them with n_best = K).
        batch_tokens: padded tokens per side per batch of the reverse model.

    Returns:
        The chosen output ids per source. A source with no candidate gets []; one whose source or a
        candidate is longer than the reverse model's learned positions keeps the beam's best, with
        a warning.
    """
    limit = position_limit(reranker.model)

    def fits(i: int) -> bool:
        return limit is None or (len(sources[i]) <= limit and all(len(h.tokens) < limit for h in candidates[i]))

    scored = [i for i in range(len(sources)) if candidates[i] and fits(i)]
    for i in range(len(sources)):
        if candidates[i] and not fits(i):
            logger.warning("a sentence of %d source tokens has an output longer than the reranking model's %d "
                           "positions: kept the beam's best", len(sources[i]), limit)
    pairs = [(i, k) for i in scored for k in range(len(candidates[i]))]
    channel = channel_log_probs(reranker.model, [sources[i] for i, _ in pairs],
                                [candidates[i][k].tokens for i, k in pairs], batch_tokens)
    best: list[list[int]] = [list(hypotheses[0].tokens) if hypotheses else [] for hypotheses in candidates]
    best_score: dict[int, float] = {}
    for (i, k), log_p in zip(pairs, channel):
        score = candidates[i][k].score + reranker.weight * log_p / len(sources[i])
        if i not in best_score or score > best_score[i]:
            best_score[i], best[i] = score, list(candidates[i][k].tokens)
    return best
