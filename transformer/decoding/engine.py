"""The decoding engine interface: sentences or ids in, n-best lists with scores out.

Every way this package decodes (this package's search in `transformer.decoding.translator.TorchEngine`,
noisy-channel reranking in `transformer.decoding.rerank.RerankingEngine`, CTranslate2 in
`transformer.decoding.ctranslate2_engine.CTranslate2Model`) is an `Engine`, and its callers (the decoding
commands, validation during training, attention plots) call `translate` or `search` with one
`DecodeConfig` and never ask which engine they hold. An engine holds what it was built with (a
model, its tokenizers, a device); the settings of a call travel whole in the `DecodeConfig`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

from transformer.config import DecodeConfig
from transformer.data.tokenizer import EOS_ID, Tokenizer
from transformer.decoding.search import Hypothesis

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One entry of an n-best list of translations.

    Attributes:
        text: the detokenized output.
        score: the engine's score of the output (higher is better; see `Engine.search`), or None
            where the search computes none.
    """

    text: str
    score: float | None


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


class Engine(ABC):
    """Translates with the settings of each call; subclasses implement `search`.

    Args:
        src_tokenizer, tgt_tokenizer: the SentencePiece models of the two sides (None for an engine
            used through `search` alone).
        max_src_len: longest source in tokens, EOS included; longer ones are truncated with a
            warning. None: no limit.
    """

    def __init__(
        self, src_tokenizer: Tokenizer | None, tgt_tokenizer: Tokenizer | None, max_src_len: int | None = None
    ) -> None:
        self.src_tokenizer, self.tgt_tokenizer, self.max_src_len = src_tokenizer, tgt_tokenizer, max_src_len

    @abstractmethod
    def search(self, sources: Sequence[Sequence[int]], settings: DecodeConfig) -> list[list[Hypothesis]]:
        """The n-best outputs of each source, in batches of `settings.batch_tokens` source tokens.

        Args:
            sources: source ids per sentence, each ending with EOS (as `source_ids` makes them).
            settings: beam size, n-best, length penalty, maximum lengths, batch size, cache.

        Returns:
            Per source, in input order, at most `settings.n_best` hypotheses sorted best first:
            target ids without BOS and EOS, and the engine's score (None where its search computes
            none). An empty source gets one empty hypothesis scored None.
        """

    def translate(self, sentences: Sequence[str], settings: DecodeConfig, first_line: int = 1) -> list[list[Candidate]]:
        """The n-best translations of each sentence, in input order (see `search`).

        Args:
            sentences: source sentences; an empty or blank one gets the one candidate "".
            settings: as for `search`.
            first_line: line number of `sentences[0]` in warnings (for callers that stream a file).
        """
        sources = source_ids(self.src_tokenizer, sentences, self.max_src_len, first_line)
        return self.candidates(self.search(sources, settings))

    def candidates(self, found: Sequence[Sequence[Hypothesis]]) -> list[list[Candidate]]:
        """The n-best lists of `search` as text: each hypothesis detokenized, with its score."""
        return [[Candidate(self.tgt_tokenizer.decode(h.tokens), h.score) for h in hypotheses] for hypotheses in found]


def best(candidates: Sequence[Sequence[Candidate]]) -> list[str]:
    """The first (best) text of each n-best list."""
    return [found[0].text for found in candidates]
