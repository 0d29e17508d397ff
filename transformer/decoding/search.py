"""Greedy and beam search over `Transformer.decode` with the key/value cache (paper section 6.1).

Both searches decode a whole padded batch at once, run the encoder once, feed only the newest
token per step through the cache, and drop sentences from the batch as soon as they are finished
so that they stop costing work. `use_cache=False` recomputes the whole prefix at every step instead;
it gives the same outputs and exists for tests and benchmarks.

Conventions shared by both searches:

* The maximum output length of a sentence is L = floor(max_len_a * S + max_len_b) tokens before
  EOS, S being its non-pad source length (capped so that decoder positions stay within a learned
  positional table). After L tokens, EOS is forced: every other token is masked out, so the EOS is
  scored with its true log-probability and a hypothesis always ends with EOS.
* Padding and BOS are never generated: their log-probabilities are set to -inf (the others are not
  renormalised, so scores stay true model log-probabilities).
* Log-probabilities are computed in float32, or in the model's precision when that is higher.
* The model should be in eval mode; the searches run under `torch.inference_mode()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from transformer.config import DecodeConfig
from transformer.model import DecoderCache, LearnedPositionalEmbedding, Transformer


@dataclass
class Hypothesis:
    """One finished search output.

    Attributes:
        tokens: target ids without BOS and EOS.
        score: from `beam_search`, the length-normalised log-probability sum(log p) / lp(|Y|) (see
            `length_penalty_factor`); None from greedy search, which ranks raw logits and so
            computes no probability.
    """

    tokens: list[int]
    score: float | None


def length_penalty_factor(length: Tensor | float, alpha: float) -> Tensor | float:
    """GNMT's length penalty lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al. 2016, equation 14).

    A hypothesis Y scores sum_i log p(y_i | y_<i, x) / lp(Y); |Y| counts the final EOS. alpha = 0
    gives raw log-probabilities; larger alpha favours longer outputs.

    Args:
        length: |Y|, a number or a tensor of lengths.
        alpha: the exponent (`DecodeConfig.length_penalty`), >= 0.

    Returns:
        lp(Y), of the same kind as `length`.
    """
    return ((5.0 + length) / 6.0) ** alpha


def position_limit(model: Transformer) -> int | None:
    """Number of positions the model can embed: the learned table's size, or None if unbounded."""
    positions = getattr(model, "positions", None)
    return positions.embedding.num_embeddings if isinstance(positions, LearnedPositionalEmbedding) else None


def _max_output_lengths(model: Transformer, src_mask: Tensor, max_len_a: float, max_len_b: int) -> Tensor:
    """Per-sentence maximum number of tokens before EOS: floor(a * S + b), S the non-pad length.

    The decoder embeds positions 0 .. L (BOS, then L tokens), so L is capped at the positional
    table's size minus one for models with learned positions.

    Returns:
        (B,) LongTensor.
    """
    src_lengths = (~src_mask).sum(dim=1).double()
    lengths = torch.floor(max_len_a * src_lengths + max_len_b).long()
    limit = position_limit(model)
    return lengths if limit is None else lengths.clamp(max=limit - 1)


def _check_lengths(max_len_a: float, max_len_b: int) -> None:
    """Reject negative length settings, which would make every output empty or undefined."""
    if max_len_a < 0 or max_len_b < 0:
        raise ValueError(f"max_len_a and max_len_b must be >= 0, got {max_len_a} and {max_len_b}")


def top_k(x: Tensor, k: int, block: int = 64) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row and their column indices, best first, as `torch.topk`.

    Exact, and faster than `torch.topk` on wide rows such as a beam's log-probabilities over the
    vocabulary (docs/benchmarks.md): the columns are cut into blocks of `block`, and since each of
    a row's k largest entries lies in a block whose maximum is at least that large, all of them lie
    in the k blocks with the largest maxima. So one cheap pass takes every block's maximum, the k
    best blocks of each row are copied out as whole contiguous runs, and the full selection runs
    only over those (plus the columns after the last whole block). Among tied entries the choice
    of index may differ from `torch.topk`'s.

    Args:
        x: (R, V).
        k: entries per row, 1 <= k <= V.
        block: columns per block.

    Returns:
        values (R, k) and their column indices (R, k), each row sorted in descending order.
    """
    R, V = x.shape
    n_blocks = V // block
    if n_blocks <= k:
        return x.topk(k, dim=-1)
    x = x.contiguous()
    whole = n_blocks * block  # columns in whole blocks
    best = x[:, :whole].unflatten(1, (n_blocks, block)).amax(dim=-1).topk(k, dim=-1).indices  # (R, k)
    # Row i of `runs` is the `block` entries from flat position i: selecting rows copies whole blocks
    # (faster than `gather` with a block-wide index).
    runs = x.view(-1).unfold(0, block, 1)
    starts = best * block + torch.arange(0, R * V, V, device=x.device).unsqueeze(1)
    values = runs.index_select(0, starts.view(-1)).view(R, k * block)
    if whole < V:
        values = torch.cat([values, x[:, whole:]], dim=1)
    values, position = values.topk(k, dim=-1)
    in_blocks = best.gather(1, (position // block).clamp(max=k - 1)) * block + position % block
    return values, torch.where(position < k * block, in_blocks, position - k * block + whole)


def _never_generated(model: Transformer, bos_id: int, device: torch.device) -> Tensor:
    """(2,) the ids no search generates, padding and BOS, built once per search on its device: an
    index made from a Python list at every step would be a host-to-device copy at every step."""
    return torch.tensor([model.pad_id, bos_id], device=device)


def _best_next_tokens(
    model: Transformer, prefix: Tensor, memory: Tensor, src_mask: Tensor, cache: DecoderCache | None,
    forced_eos: Tensor | None, never: Tensor, eos_id: int, k: int, normalise: bool = True,
) -> tuple[Tensor, Tensor]:
    """The k most probable next tokens after each prefix, under the search's token constraints.

    The tokens in `never` are never allowed, and rows in `forced_eos` allow only EOS (their other
    entries are -inf). Log-probabilities are the model's own, log_softmax over all logits, not
    renormalised after the constraints; they are computed in float32, or in the model's dtype if
    wider.

    Args:
        prefix: (R, t) every row's tokens so far, BOS first.
        memory: (R', S, D) encoder output: one row per prefix row, or one per sentence shared by
            R / R' consecutive rows (beam search's hypotheses).
        src_mask: (R', S) True at source padding.
        cache: a `DecoderCache` holding positions 0 .. t-2 (only the last token is fed), or None to
            decode the whole prefix.
        forced_eos: (R,) bool, rows at their maximum length, for which only EOS is allowed; None
            when the caller knows that no row is (most steps), which spares finding them.
        never: (2,) from `_never_generated`.
        k: tokens wanted per row; min(k, V) are returned.
        normalise: False skips the softmax normalisation and returns constrained logits instead of
            log-probabilities (enough to rank the tokens of one row, as greedy search does).

    Returns:
        log-probabilities (R, min(k, V)), best first, and their token ids (R, min(k, V)).
    """
    tokens = prefix if cache is None else prefix[:, -1:]
    hidden = model.decode_hidden(tokens, memory, src_mask, cache)[:, -1]  # (R, D)
    logits = model.project(hidden)  # (R, V)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    if normalise:
        # One fused pass that also widens bfloat16 logits; faster than logsumexp alone,
        # which PyTorch runs as several passes. Logits already in the scores' dtype are
        # overwritten (nothing else reads them), which spares a (R, V) buffer per step.
        if logits.dtype == dtype:
            scores = torch.log_softmax(logits, dim=-1, out=logits)
        else:
            scores = logits.log_softmax(dim=-1, dtype=dtype)
    else:
        scores = logits.to(dtype)
    scores.index_fill_(1, never, -math.inf)
    if forced_eos is not None:  # rare: only rows at their length limit, so touch just those rows
        rows = forced_eos.nonzero().squeeze(1)
        eos = scores[rows, eos_id]
        scores[rows] = -math.inf
        scores[rows, eos_id] = eos
    return top_k(scores, min(k, scores.size(-1)))


@torch.inference_mode()
def greedy_search(
    model: Transformer, src: Tensor, max_len_a: float = DecodeConfig.max_len_a, max_len_b: int = DecodeConfig.max_len_b,
    bos_id: int = 2, eos_id: int = 3, use_cache: bool = DecodeConfig.use_cache,
) -> list[list[int]]:
    """Pick the most probable next token at every step until EOS or the maximum length.

    Args:
        model: the translation model, in eval mode.
        src: (B, S) source ids, right-padded with `model.pad_id`.
        max_len_a, max_len_b: maximum output length floor(a * S + b) tokens before EOS, S being each
            sentence's non-pad length.
        bos_id, eos_id: begin- and end-of-sentence ids.
        use_cache: feed one token per step through the key/value cache (False: recompute the prefix).

    Returns:
        B lists of target ids, without BOS and EOS.
    """
    _check_lengths(max_len_a, max_len_b)
    memory, src_mask = model.encode(src), model.padding_mask(src)
    max_lengths = _max_output_lengths(model, src_mask, max_len_a, max_len_b)
    limits = max_lengths.tolist()  # on the host too: which steps force an EOS is known without a device read
    never = _never_generated(model, bos_id, src.device)
    sentences = list(range(src.size(0)))  # original index of each active row
    prefix = torch.full((src.size(0), 1), bos_id, dtype=torch.long, device=src.device)
    cache = model.new_cache() if use_cache else None
    outputs: list[list[int]] = [[] for _ in range(src.size(0))]
    step = 0
    while sentences:
        forced_eos = max_lengths == step if step in limits else None
        _, best = _best_next_tokens(model, prefix, memory, src_mask, cache, forced_eos, never, eos_id, k=1,
                                    normalise=False)
        prefix = torch.cat([prefix, best], dim=1)
        finished = prefix[:, -1] == eos_id
        if finished.any():
            for i, row in zip(finished.nonzero().squeeze(1).tolist(), prefix[finished, 1:-1].tolist()):
                outputs[sentences[i]] = row
            keep = (~finished).nonzero().squeeze(1)
            kept = keep.tolist()
            sentences, limits = [sentences[i] for i in kept], [limits[i] for i in kept]
            prefix, max_lengths = prefix[keep], max_lengths[keep]
            memory, src_mask = memory.index_select(0, keep), src_mask.index_select(0, keep)
            if cache is not None:
                cache.select(keep)
        step += 1
    return outputs


@torch.inference_mode()
def beam_search(
    model: Transformer, src: Tensor, beam_size: int = DecodeConfig.beam_size,
    length_penalty: float = DecodeConfig.length_penalty, max_len_a: float = DecodeConfig.max_len_a,
    max_len_b: int = DecodeConfig.max_len_b, n_best: int = DecodeConfig.n_best, bos_id: int = 2, eos_id: int = 3,
    use_cache: bool = DecodeConfig.use_cache,
) -> list[list[Hypothesis]]:
    """Batched beam search with GNMT length normalisation.

    Each sentence keeps K = `beam_size` active hypotheses in K rows of the batch. At every step the
    K * V one-token extensions of a sentence are ranked by their summed log-probability (all have
    the same length, so this is also the order of their normalised scores) and the best 2K are
    taken. An EOS extension ranked among the first K is finished, scored sum(log p) / lp(|Y|) with
    lp(Y) = ((5 + |Y|) / 6)^alpha and |Y| counting the EOS; the best K non-EOS extensions become the
    next beam. (So beam_size=1 is exactly greedy search.)

    A sentence stops as soon as one of these holds:

    1. K hypotheses have finished (the usual rule: the beam is used up);
    2. its maximum length L was reached: EOS was forced, which finishes every active hypothesis;
    3. no active hypothesis can still enter the n-best list. A hypothesis with summed log-prob
       s <= 0 ends with a sum s' <= s and a length |Y| <= L + 1, and lp grows with length for
       alpha >= 0, so its final score is at most s / lp(L + 1). When that bound for the best active
       hypothesis is no higher than the n_best-th finished score, continuing cannot change the
       result, so this rule only saves work.

    Args:
        model: the translation model, in eval mode.
        src: (B, S) source ids, right-padded with `model.pad_id`.
        beam_size: hypotheses kept per sentence, K >= 1.
        length_penalty: alpha >= 0 of the length penalty (0.6 in the paper).
        max_len_a, max_len_b: maximum output length floor(a * S + b) tokens before EOS, S being each
            sentence's non-pad length.
        n_best: hypotheses returned per sentence, 1 <= n_best <= beam_size.
        bos_id, eos_id: begin- and end-of-sentence ids.
        use_cache: feed one token per step through the key/value cache (False: recompute the prefix).

    Returns:
        B lists of hypotheses sorted best first: n_best of them, or fewer if the search finished
        fewer (possible only when a short maximum length leaves fewer possible outputs).
    """
    if beam_size < 1 or not 1 <= n_best <= beam_size:
        raise ValueError(f"need beam_size >= 1 and 1 <= n_best <= beam_size, got {beam_size} and {n_best}")
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
    _check_lengths(max_len_a, max_len_b)
    K, device = beam_size, src.device
    memory, src_mask = model.encode(src), model.padding_mask(src)
    max_lengths = _max_output_lengths(model, src_mask, max_len_a, max_len_b)
    limits = max_lengths.tolist()  # on the host too: which steps force an EOS is known without a device read
    never = _never_generated(model, bos_id, device)
    # K rows per sentence, adjacent: row n * K + k is hypothesis k of sentence n. The K rows share
    # the sentence's one row of `memory` (see `MultiHeadAttention`), which is never repeated.
    sentences = list(range(src.size(0)))  # original index of each active sentence
    prefix = torch.full((src.size(0) * K, 1), bos_id, dtype=torch.long, device=device)
    dtype = torch.promote_types(memory.dtype, torch.float32)  # that of the log-probs
    # Summed log-probs (N, K). All K rows start as the same BOS prefix; only the first may extend
    # it, or the beam would fill with copies of one hypothesis.
    scores = torch.full((src.size(0), K), -math.inf, dtype=dtype, device=device)
    scores[:, 0] = 0.0
    n_finished = torch.zeros(src.size(0), dtype=torch.long, device=device)
    # The n_best best finished scores per active sentence, best first (-inf while fewer have
    # finished), kept on the device so that the stopping test needs no host read.
    best_finished = torch.full((src.size(0), n_best), -math.inf, dtype=dtype, device=device)
    cache = model.new_cache() if use_cache else None
    finished: list[list[Hypothesis]] = [[] for _ in range(src.size(0))]
    step = 0
    while sentences:
        N = len(sentences)
        # At the first step the K rows of a sentence are the same BOS prefix: decode one of them
        # and give its result to all K (only the first can extend it, by its score).
        g = K if step == 0 else 1  # rows per decoded row
        forced_eos = (max_lengths == step).repeat_interleave(K // g) if step in limits else None
        # The best 2K of a sentence's K * V extensions are among the best 2K of each row, so rank
        # only those: (N * K, W) per row, then (N, K * W) per sentence, W = min(2K, V).
        row_log_probs, row_tokens = _best_next_tokens(model, prefix[::g], memory, src_mask, cache, forced_eos, never,
                                                      eos_id, k=2 * K)
        if g > 1:
            row_log_probs, row_tokens = row_log_probs.repeat_interleave(g, 0), row_tokens.repeat_interleave(g, 0)
        W = row_log_probs.size(1)
        candidates = (scores.view(N * K, 1) + row_log_probs).view(N, K * W)
        top_scores, top_index = candidates.topk(2 * K, dim=1)  # (N, 2K), best first
        beams, tokens = top_index // W, row_tokens.view(N, K * W).gather(1, top_index)
        is_eos = tokens == eos_id
        rows = torch.arange(N, device=device).unsqueeze(1) * K + beams  # (N, 2K) rows in the batch

        new_finished = is_eos & torch.isfinite(top_scores)
        new_finished[:, K:] = False
        n_finished += new_finished.sum(dim=1)
        normalised = top_scores / length_penalty_factor(step + 1, length_penalty)
        best_finished = torch.cat([best_finished, normalised.masked_fill(~new_finished, -math.inf)], dim=1)
        best_finished = best_finished.topk(n_best, dim=1).values

        # The K best non-EOS extensions, in rank order (a stable sort moves EOS behind them; at most
        # K of the 2K are EOS, one per beam).
        keep = is_eos.to(torch.uint8).argsort(dim=1, stable=True)[:, :K]
        next_scores = top_scores.gather(1, keep)
        beam_rows = rows.gather(1, keep).view(-1)
        next_prefix = torch.cat([prefix[beam_rows], tokens.gather(1, keep).view(-1, 1)], dim=1)
        cache_rows = beam_rows // g  # the decoded row each new hypothesis extends

        bound = next_scores[:, 0] / length_penalty_factor(max_lengths + 1, length_penalty)
        done = (n_finished >= K) | (max_lengths == step) | (bound <= best_finished[:, -1])
        # The step's one host read: did a hypothesis finish, did a sentence end.
        any_finished, any_done = torch.stack([new_finished.any(), done.any()]).tolist()
        if any_finished:
            n, j = new_finished.nonzero(as_tuple=True)
            for i, row, score in zip(n.tolist(), prefix[rows[n, j], 1:].tolist(), normalised[n, j].tolist()):
                finished[sentences[i]].append(Hypothesis(row, score))
        scores, prefix = next_scores, next_prefix
        if any_done:
            active = (~done).nonzero().squeeze(1)
            active_rows = (active.unsqueeze(1) * K + torch.arange(K, device=device)).view(-1)
            kept = active.tolist()
            sentences, limits = [sentences[i] for i in kept], [limits[i] for i in kept]
            max_lengths, scores = max_lengths[active], scores[active]
            best_finished, n_finished = best_finished[active], n_finished[active]
            prefix = prefix[active_rows]
            memory, src_mask = memory.index_select(0, active), src_mask.index_select(0, active)
            if cache is not None:
                # One copy of the self-attention entries for both the beam reordering and the
                # dropping of finished sentences.
                cache.select(cache_rows[active_rows], memory_index=active)
        elif cache is not None:
            cache.reorder_beams(cache_rows)  # also spreads the first step's one row to K
        step += 1
    return [sorted(hypotheses, key=lambda h: -h.score)[:n_best] for hypotheses in finished]

