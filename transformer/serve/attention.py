"""A translation's attention weights as the server sends them: every layer and head of the encoder's
self-attention, the decoder's self-attention and the cross-attention, with the pieces on both axes.

As `transformer-attention` draws them: the sentence is translated with the model's settings, then
the model runs teacher-forced on (source, BOS + translation) with `Transformer.attention_maps`.
Rows are the attending (query) positions, columns the attended (key) positions. The target
positions are the decoder's inputs, BOS first (`target_pieces`); position t is the step that chose
the translation's piece t, EOS at the last (`output_pieces`), which is how a reader names the rows
of the cross-attention: the weights with which the decoder looked at the source to choose that piece.
"""

from __future__ import annotations

import torch

from transformer.config import DecodeConfig
from transformer.data.tokenizer import BOS_ID, EOS_ID
from transformer.decoding.engine import Engine
from transformer.model import Transformer
from transformer.serve.requests import RequestError

DECIMALS = 6  # weights are sent rounded to this many decimals: far finer than a heatmap shows


def translation_attention(
    engine: Engine, model: Transformer, source: list[int], settings: DecodeConfig, max_pieces: int
) -> dict:
    """Translate one sentence and read every attention map of the pair.

    Args:
        engine: the engine that translates (the served one, so that the translation is /translate's).
        model: the `Transformer` it runs.
        source: the sentence's source ids, EOS included.
        settings: the decode settings.
        max_pieces: most target pieces (BOS included) an answer may hold.

    Returns:
        {"translation", "source_pieces" (S), "target_pieces" (T, BOS first), "output_pieces" (T, the
        piece each target position chose, EOS last), "attention": {"encoder": [layer][head][S][S],
        "decoder": [layer][head][T][T], "cross": [layer][head][T][S]}}.

    Raises:
        RequestError: 413 for a translation of more than `max_pieces` pieces with BOS.
    """
    output = engine.search([source], settings)[0][0].tokens
    target = [BOS_ID] + output
    if len(target) > max_pieces:
        raise RequestError(413, f"the translation has {len(target)} pieces with BOS, more than the {max_pieces} an "
                                "attention answer may hold")
    device = next(model.parameters()).device
    maps = model.attention_maps(torch.tensor([source], device=device), torch.tensor([target], device=device))
    return {
        "translation": engine.tgt_tokenizer.decode(output),
        "source_pieces": [engine.src_tokenizer.id_to_piece(i) for i in source],
        "target_pieces": [engine.tgt_tokenizer.id_to_piece(i) for i in target],
        "output_pieces": [engine.tgt_tokenizer.id_to_piece(i) for i in output + [EOS_ID]],
        "attention": {kind: [layer[0].double().cpu().round(decimals=DECIMALS).tolist() for layer in layers]
                      for kind, layers in maps.items()},
    }
