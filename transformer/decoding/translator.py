"""Translate with this package's models: the torch engines, and the functions of loose arguments over them.

`TorchEngine` tokenizes, sorts the sources by length and cuts them into batches under a token
budget, so that little compute goes to padding, searches each batch (greedy for a beam of 1, beam
search otherwise) and returns the n-best lists in input order. `RerankingEngine` is the same search
whose beam candidates a reverse-direction model rescores (`transformer.decoding.rerank`). Both are
`transformer.decoding.engine.Engine`s, called with one `DecodeConfig`; `translate_ids` and `translate` take
the settings as separate arguments and return the best output of each source.
"""

from __future__ import annotations

from typing import Sequence

import torch

from transformer.config import DecodeConfig
from transformer.data.batches import make_batches
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from transformer.decoding.engine import Engine, best, source_ids
from transformer.decoding.rerank import ChannelReranker, rerank_candidates
from transformer.decoding.search import Hypothesis, beam_search, greedy_search, position_limit
from transformer.model import Transformer

__all__ = ["RerankingEngine", "TorchEngine", "source_ids", "translate", "translate_ids"]


class TorchEngine(Engine):
    """This package's search (`transformer.decoding.search`) over a `Transformer` or its int8 copy.

    Args:
        model: the translation model, in eval mode, in the precision to decode in.
        src_tokenizer, tgt_tokenizer: the SentencePiece models it was trained with (None for an
            engine used through `search` alone).
        max_src_len: longest source in tokens, EOS included; longer ones are truncated with a
            warning. None: the model's number of learned positions, or no limit for sinusoidal ones.
        device: where the model is. None: where its parameters are.
    """

    def __init__(
        self, model: Transformer, src_tokenizer: Tokenizer | None = None, tgt_tokenizer: Tokenizer | None = None,
        max_src_len: int | None = None, device: torch.device | str | None = None,
    ) -> None:
        super().__init__(src_tokenizer, tgt_tokenizer, position_limit(model) if max_src_len is None else max_src_len)
        self.model = model
        self.device = next(model.parameters()).device if device is None else device

    def search(self, sources: Sequence[Sequence[int]], settings: DecodeConfig) -> list[list[Hypothesis]]:
        """See `Engine.search`. A beam of 1 runs greedy search, whose hypotheses are scored None;
        a wider beam scores each by sum(log p) / lp(|Y|), GNMT's length penalty (`beam_search`)."""
        self._check(settings)
        found: list[list[Hypothesis]] = [[Hypothesis([], None)] for _ in sources]
        nonempty = [i for i, ids in enumerate(sources) if ids]
        lengths = [len(sources[i]) for i in nonempty]
        for batch in make_batches(lengths, lengths, settings.batch_tokens):
            rows = [sources[nonempty[j]] for j in batch]
            src = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)
            for r, ids in enumerate(rows):
                src[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            src = src.to(self.device)
            if settings.beam_size == 1:
                outputs = [[Hypothesis(ids, None)] for ids in greedy_search(
                    self.model, src, settings.max_len_a, settings.max_len_b, bos_id=BOS_ID, eos_id=EOS_ID,
                    use_cache=settings.use_cache)]
            else:
                outputs = beam_search(
                    self.model, src, settings.beam_size, settings.length_penalty, settings.max_len_a,
                    settings.max_len_b, n_best=self._candidates(settings), bos_id=BOS_ID, eos_id=EOS_ID,
                    use_cache=settings.use_cache)
            for j, hypotheses in zip(batch, self._chosen(rows, outputs, settings)):
                found[nonempty[j]] = hypotheses
        return found

    def _check(self, settings: DecodeConfig) -> None:
        """Refuse settings this search cannot follow."""
        if settings.length_penalty_form != "gnmt":
            raise ValueError(f"this package's search takes the length penalty form 'gnmt', not "
                             f"{settings.length_penalty_form!r}")
        if settings.beam_size == 1 and settings.n_best != 1:
            raise ValueError(f"greedy search (beam_size 1) finds one output, not n_best={settings.n_best}")

    def _candidates(self, settings: DecodeConfig) -> int:
        """How many finished hypotheses the beam search returns per sentence."""
        return settings.n_best

    def _chosen(
        self, rows: Sequence[Sequence[int]], outputs: list[list[Hypothesis]], settings: DecodeConfig
    ) -> list[list[Hypothesis]]:
        """The n-best lists of one batch, from the search's `outputs` for its source `rows`."""
        return outputs


class RerankingEngine(TorchEngine):
    """`TorchEngine` whose beam keeps all `beam_size` finished candidates, which a reverse-direction
    model then ranks by the noisy-channel score (`transformer.decoding.rerank`, weight `settings.rerank_weight`).
    Each batch of the search is reranked as a whole, under the same token budget.

    Args:
        model: the forward model, in eval mode.
        reverse: the model of the reverse direction, in eval mode, on the same device, sharing the
            forward model's vocabulary with the sides swapped.
        src_tokenizer, tgt_tokenizer, max_src_len, device: see `TorchEngine`.
    """

    def __init__(
        self, model: Transformer, reverse: Transformer, src_tokenizer: Tokenizer | None = None,
        tgt_tokenizer: Tokenizer | None = None, max_src_len: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(model, src_tokenizer, tgt_tokenizer, max_src_len, device)
        self.reverse = reverse

    def _check(self, settings: DecodeConfig) -> None:
        if settings.beam_size < 2:
            raise ValueError("reranking needs beam search (beam_size >= 2) with this package's model")
        super()._check(settings)

    def _candidates(self, settings: DecodeConfig) -> int:
        return settings.beam_size  # the reranker weighs every finished candidate

    def _chosen(
        self, rows: Sequence[Sequence[int]], outputs: list[list[Hypothesis]], settings: DecodeConfig
    ) -> list[list[Hypothesis]]:
        reranker = ChannelReranker(self.reverse, settings.rerank_weight)
        ranked = rerank_candidates(reranker, rows, outputs, settings.batch_tokens)
        return [hypotheses[: settings.n_best] for hypotheses in ranked]


def _settings(
    beam_size: int, length_penalty: float, max_len_a: float, max_len_b: int, batch_tokens: int, use_cache: bool,
    reranker: ChannelReranker | None,
) -> DecodeConfig:
    """The settings object of the loose arguments of `translate_ids` and `translate`."""
    return DecodeConfig(beam_size=beam_size, length_penalty=length_penalty, max_len_a=max_len_a, max_len_b=max_len_b,
                        batch_tokens=batch_tokens, use_cache=use_cache,
                        rerank_weight=DecodeConfig.rerank_weight if reranker is None else reranker.weight)


def _engine(
    model: Transformer, src_tokenizer: Tokenizer | None, tgt_tokenizer: Tokenizer | None, max_src_len: int | None,
    device: torch.device | str | None, reranker: ChannelReranker | None,
) -> TorchEngine:
    """The engine for the arguments of `translate_ids` and `translate`."""
    if reranker is None:
        return TorchEngine(model, src_tokenizer, tgt_tokenizer, max_src_len, device)
    return RerankingEngine(model, reranker.model, src_tokenizer, tgt_tokenizer, max_src_len, device)


def translate_ids(
    model: Transformer, sources: Sequence[Sequence[int]], beam_size: int = DecodeConfig.beam_size,
    length_penalty: float = DecodeConfig.length_penalty, max_len_a: float = DecodeConfig.max_len_a,
    max_len_b: int = DecodeConfig.max_len_b, batch_tokens: int = DecodeConfig.batch_tokens,
    device: torch.device | str | None = None, use_cache: bool = DecodeConfig.use_cache,
    reranker: ChannelReranker | None = None,
) -> list[list[int]]:
    """Search the best output ids for each source, in batches of similar length (`TorchEngine.search`).

    Args:
        model: the translation model, in eval mode.
        sources: source ids per sentence (e.g. from `source_ids`); an empty one gives an empty output.
        beam_size: hypotheses kept per sentence; 1 = greedy search.
        length_penalty: alpha of the length penalty (beam search only).
        max_len_a, max_len_b: maximum output length a * source length + b (see `transformer.decoding.search`).
        batch_tokens: padded source tokens per batch (a longer sentence gets a batch of its own).
        device: where to run; the model must be there already. None: the model's device.
        use_cache: decode incrementally with the key/value cache (False recomputes every prefix:
            the same outputs, slower; for checks and benchmarks).
        reranker: rescore all `beam_size` finished candidates of each sentence with a reverse model
            and keep the best by the noisy-channel score (needs beam_size >= 2).

    Returns:
        Output ids per source, without BOS and EOS, in input order.
    """
    settings = _settings(beam_size, length_penalty, max_len_a, max_len_b, batch_tokens, use_cache, reranker)
    engine = _engine(model, None, None, None, device, reranker)
    return [found[0].tokens for found in engine.search(sources, settings)]


def translate(
    model: Transformer, src_tokenizer: Tokenizer, tgt_tokenizer: Tokenizer, sentences: Sequence[str],
    beam_size: int = DecodeConfig.beam_size, length_penalty: float = DecodeConfig.length_penalty,
    max_len_a: float = DecodeConfig.max_len_a, max_len_b: int = DecodeConfig.max_len_b,
    batch_tokens: int = DecodeConfig.batch_tokens, device: torch.device | str | None = None,
    max_src_len: int | None = None, first_line: int = 1, use_cache: bool = DecodeConfig.use_cache,
    reranker: ChannelReranker | None = None,
) -> list[str]:
    """Translate sentences to detokenized text, in input order (`TorchEngine.translate`, best of each).

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
    settings = _settings(beam_size, length_penalty, max_len_a, max_len_b, batch_tokens, use_cache, reranker)
    engine = _engine(model, src_tokenizer, tgt_tokenizer, max_src_len, device, reranker)
    return best(engine.translate(sentences, settings, first_line))
