"""Draw every attention map of one translation: `transformer-attention --checkpoint CKPT --sentence "..."`.

The sentence is translated, then the model is run teacher-forced on (source, BOS + translation)
and each head's attention weights are drawn as a heatmap: one row of panels per layer of encoder
self-attention, then decoder self-attention, then encoder-decoder (cross) attention; one column
per head. Axes are labelled with the SentencePiece pieces; rows of a panel are the attending
(query) positions, columns the attended (key) positions.

A figure of every head of every layer grows with the square of the sentence length, so the source
and the translation are each limited to `--max-tokens` pieces (100 by default; a one-line error
above that), and the figure to `MAX_FIGURE_INCHES` on its longer side: panels shrink to fit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from transformer.atomic import check_not_an_input
from transformer.commands.options import add_model_arguments, load_for_decoding, model_inputs, prepare
from transformer.config import bounded_int
from transformer.data.tokenizer import BOS_ID
from transformer.decoding.translator import TorchEngine, source_ids

logger = logging.getLogger(__name__)

KINDS = (("encoder", "encoder self"), ("decoder", "decoder self"), ("cross", "cross"))
DEFAULT_MAX_TOKENS = 100
MAX_FIGURE_INCHES = 120.0  # the longer side: 12,000 pixels at the 100 dpi used, about 0.5 GB of RGBA at worst


def plot_attention(
    maps: dict[str, list[Tensor]], src_pieces: Sequence[str], tgt_pieces: Sequence[str], output: str | Path
) -> None:
    """Save a grid of heatmaps of the maps of one sentence pair as an image (PNG, PDF, SVG...).

    One row of panels per layer of each kind (encoder self, decoder self, cross), one column per head.

    Args:
        maps: from `Transformer.attention_maps` for a batch of one: "encoder" [(1, H, S, S)],
            "decoder" [(1, H, T, T)], "cross" [(1, H, T, S)], one tensor per layer.
        src_pieces: the S source pieces.
        tgt_pieces: the T decoder-input pieces (BOS first).
        output: image path; its suffix selects the format.
    """
    panels = [(kind, title, layer, weights) for kind, title in KINDS for layer, weights in enumerate(maps[kind])]
    n_heads = panels[0][3].size(1)
    labels = {"encoder": (src_pieces, src_pieces), "decoder": (tgt_pieces, tgt_pieces),
              "cross": (tgt_pieces, src_pieces)}
    longest = max(len(src_pieces), len(tgt_pieces))
    size = max(2.5, 0.18 * longest)  # inches per panel; room for one tick label per piece
    size = min(size, MAX_FIGURE_INCHES / max(n_heads, len(panels)))
    fontsize = max(4.0, min(9.0, 200.0 / longest))
    figure = Figure(figsize=(size * n_heads, size * len(panels)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), n_heads, squeeze=False)
    for row, (kind, title, layer, weights) in enumerate(panels):
        queries, keys = labels[kind]
        for head in range(n_heads):
            ax = axes[row, head]
            ax.imshow(weights[0, head].float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"{title}, layer {layer + 1}, head {head + 1}", fontsize=fontsize + 1)
            ax.set_xticks(range(len(keys)), keys, rotation=90, fontsize=fontsize)
            ax.set_yticks(range(len(queries)), queries, fontsize=fontsize)
    figure.savefig(output, dpi=100)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transformer-attention", description="Translate a sentence and draw all its attention maps."
    )
    add_model_arguments(parser, batch_tokens=False)
    parser.add_argument("--sentence", required=True, help="source sentence")
    parser.add_argument("--max-tokens", type=bounded_int("attention.max_tokens"), default=DEFAULT_MAX_TOKENS,
                        help=f"most pieces drawn for the source and for the translation, each (default: {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--output", type=Path, default=Path("attention.png"),
                        help="image file; its suffix picks the format (default: attention.png)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point of `transformer-attention`."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.max_tokens < 2:
        parser.error("--max-tokens must be >= 2")
    if args.engine == "ctranslate2":
        parser.error("--engine ctranslate2 cannot be drawn: CTranslate2 returns cross-attention only, not the "
                     "encoder and decoder self-attention maps drawn here; give the checkpoint with --engine torch")
    device = prepare(parser, args)
    try:
        check_not_an_input("--output", args.output, model_inputs(args))
        loaded, decode = load_for_decoding(args, device)
        source = source_ids(loaded.src_tokenizer, [args.sentence], None)[0]
        if not source:
            raise ValueError("--sentence is empty")
        if len(source) > min(args.max_tokens, loaded.config.model.max_len):
            raise ValueError(f"--sentence has {len(source)} pieces with EOS, more than the "
                             f"{min(args.max_tokens, loaded.config.model.max_len)} that can be drawn (--max-tokens)")
        output_ids = TorchEngine(loaded.model, device=device).search([source], decode)[0][0].tokens
        target = [BOS_ID] + output_ids
        if len(target) > args.max_tokens:
            raise ValueError(f"the translation has {len(target)} pieces with BOS, more than the {args.max_tokens} "
                             "that can be drawn (--max-tokens)")
        maps = loaded.model.attention_maps(torch.tensor([source], device=device), torch.tensor([target], device=device))
        plot_attention(maps, [loaded.src_tokenizer.id_to_piece(i) for i in source],
                       [loaded.tgt_tokenizer.id_to_piece(i) for i in target], args.output)
    except (ValueError, OSError) as e:  # CheckpointError is a ValueError; so is an unknown image format
        sys.exit(f"error: {e}")
    print(loaded.tgt_tokenizer.decode(output_ids))
    logger.info("wrote %s", args.output)


if __name__ == "__main__":
    main()
