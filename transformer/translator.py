"""Translate sentences with a trained model: tokenize, batch by length, search, detokenize.

Sources are encoded as training encodes them (subword ids followed by EOS), sorted by length and
cut into batches under a token budget, so that little compute goes to padding; outputs come back
in input order. A beam of 1 uses greedy search. With a `ChannelReranker`, the beam's candidates are
rescored by a reverse-direction model (`transformer.rerank`).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from transformer.data import make_batches
from transformer.model import Transformer
from transformer.rerank import ChannelReranker, rerank
from transformer.search import beam_search, greedy_search, position_limit
from transformer.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

logger = logging.getLogger(__name__)


def source_ids(
    src_tokenizer: Tokenizer, sentences: Sequence[str], max_src_len: int | None = None, first_line: int = 1
) -> list[list[int]]:
    """Encode source sentences as the model saw them in training: subword ids, then EOS.

    Args:
        src_tokenizer: the source SentencePiece model.
        sentences: raw source sentences.
        max_src_len: longest source kept, EOS included; longer ones are cut (keeping the EOS) with
            a warning. None keeps everything.
        first_line: line number of `sentences[0]`, for the warning.

    Returns:
        One id list per sentence; empty (no EOS either) for an empty or blank sentence.
    """
    if max_src_len is not None and max_src_len < 2:
        raise ValueError(f"max_src_len must be >= 2 (a token and EOS), got {max_src_len}")
    encoded = []
    for i, ids in enumerate(src_tokenizer.encode_batch(sentences)):
        if not ids:
            encoded.append([])
            continue
        if max_src_len is not None and len(ids) + 1 > max_src_len:
            logger.warning("line %d: %d source tokens, truncated to the first %d",
                           first_line + i, len(ids), max_src_len - 1)
            ids = ids[: max_src_len - 1]
        encoded.append(ids + [EOS_ID])
    return encoded


def translate_ids(
    model: Transformer, sources: Sequence[Sequence[int]], beam_size: int = 4, length_penalty: float = 0.6,
    max_len_a: float = 1.0, max_len_b: int = 50, batch_tokens: int = 8000, device: torch.device | str | None = None,
    use_cache: bool = True, reranker: ChannelReranker | None = None,
) -> list[list[int]]:
    """Search the best output ids for each source, in batches of similar length.

    Args:
        model: the translation model, in eval mode; or another engine with this function's
            `translate_ids` (see `transformer.ctranslate2_engine.CTranslate2Model`), which then gets
            `sources` and the search settings.
        sources: source ids per sentence (e.g. from `source_ids`); an empty one gives an empty output.
        beam_size: hypotheses kept per sentence; 1 = greedy search.
        length_penalty: alpha of the length penalty (beam search only).
        max_len_a, max_len_b: maximum output length a * source length + b (see `transformer.search`).
        batch_tokens: padded source tokens per batch (a longer sentence gets a batch of its own).
        device: where to run; the model must be there already. None: the model's device.
        use_cache: decode incrementally with the key/value cache (False recomputes every prefix:
            the same outputs, slower; for checks and benchmarks).
        reranker: rescore all `beam_size` finished candidates of each sentence with a reverse model
            and keep the best by the noisy-channel score (needs beam_size >= 2 and a `Transformer`).

    Returns:
        Output ids per source, without BOS and EOS, in input order.
    """
    if reranker is not None and (beam_size < 2 or not isinstance(model, torch.nn.Module)):
        raise ValueError("reranking needs beam search (beam_size >= 2) with this package's model")
    if not isinstance(model, torch.nn.Module):  # another engine (`transformer.ctranslate2_engine.CTranslate2Model`)
        return model.translate_ids(sources, beam_size, length_penalty, max_len_a, max_len_b, batch_tokens)
    if device is None:
        device = next(model.parameters()).device
    outputs: list[list[int]] = [[] for _ in sources]
    nonempty = [i for i, ids in enumerate(sources) if ids]
    lengths = [len(sources[i]) for i in nonempty]
    for batch in make_batches(lengths, lengths, batch_tokens):
        rows = [sources[nonempty[j]] for j in batch]
        src = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)
        for r, ids in enumerate(rows):
            src[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        src = src.to(device)
        if beam_size == 1:
            found = greedy_search(model, src, max_len_a, max_len_b, bos_id=BOS_ID, eos_id=EOS_ID, use_cache=use_cache)
        else:
            n_best = 1 if reranker is None else beam_size  # the reranker weighs every finished candidate
            hypotheses = beam_search(model, src, beam_size, length_penalty, max_len_a, max_len_b, n_best=n_best,
                                     bos_id=BOS_ID, eos_id=EOS_ID, use_cache=use_cache)
            found = ([h[0].tokens for h in hypotheses] if reranker is None
                     else rerank(reranker, rows, hypotheses, batch_tokens))
        for j, ids in zip(batch, found):
            outputs[nonempty[j]] = ids
    return outputs


def translate(
    model: Transformer, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer, sentences: Sequence[str],
    beam_size: int = 4, length_penalty: float = 0.6, max_len_a: float = 1.0, max_len_b: int = 50,
    batch_tokens: int = 8000, device: torch.device | str | None = None, max_src_len: int | None = None,
    first_line: int = 1, use_cache: bool = True, reranker: ChannelReranker | None = None,
) -> list[str]:
    """Translate sentences to detokenized text, in input order.

    Args:
        model: the translation model, in eval mode.
        src_tokenizer, tgt_tokenizer: the SentencePiece models it was trained with.
        sentences: source sentences; an empty or blank one translates to "".
        beam_size, length_penalty, max_len_a, max_len_b, batch_tokens, device: see `translate_ids`.
        max_src_len: longest source in tokens, EOS included; longer ones are truncated with a
            warning. None: the model's number of learned positions, or no limit for sinusoidal ones.
        first_line: line number of `sentences[0]` in warnings (for callers that stream a file).
        use_cache, reranker: see `translate_ids`.

    Returns:
        One translation per sentence.
    """
    if max_src_len is None:
        max_src_len = position_limit(model)
    sources = source_ids(src_tokenizer, sentences, max_src_len, first_line)
    outputs = translate_ids(
        model, sources, beam_size, length_penalty, max_len_a, max_len_b, batch_tokens, device, use_cache, reranker
    )
    return [tgt_tokenizer.decode(ids) for ids in outputs]

