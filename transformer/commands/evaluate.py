"""Score a checkpoint with sacreBLEU: `transformer-evaluate --checkpoint CKPT [--split test]`.

Several `--checkpoint`s are averaged parameter by parameter first (as the paper does with its last
5 or 20). The source side of a split from the checkpoint's data config (or of `--src`) is
translated, the detokenized hypotheses are written to a file, and BLEU and chrF are computed
against the references with sacreBLEU, whose signatures make the scores reproducible.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from sacrebleu.metrics import BLEU, CHRF

from transformer.atomic import check_not_an_input
from transformer.bleu import FLAVOUR_LABELS, STANDARD_LABEL, moses, tokenized_bleu
from transformer.checkpoint import CheckpointError
from transformer.commands.options import add_model_arguments, add_rerank_arguments, load_engine, model_inputs, prepare
from transformer.config import DecodeConfig
from transformer.data.batches import DataError, load_split, local_split_files, read_lines
from transformer.decoding.engine import best

if TYPE_CHECKING:
    from transformer.decoding.engine import Engine

logger = logging.getLogger(__name__)

# sacreBLEU tokenizers that need no extra packages or downloads.
TOKENIZERS = ("13a", "intl", "none", "zh", "char")


def evaluate(
    engine: Engine, src_texts: Sequence[str], ref_texts: Sequence[str], settings: DecodeConfig | None = None,
    tokenize: str = "13a", lowercase: bool = False,
) -> dict[str, Any]:
    """Translate `src_texts` and score the translations against `ref_texts`.

    Args:
        engine: what translates, e.g. `transformer.decoding.translator.TorchEngine` or `transformer.commands.options.load_engine`'s.
        src_texts: source sentences.
        ref_texts: one reference translation per source sentence.
        settings: the decode settings (None: the defaults); the best of each n-best list is scored.
        tokenize: sacreBLEU tokenizer for BLEU (one of `TOKENIZERS`).
        lowercase: case-insensitive scores.

    Returns:
        {"bleu", "chrf": corpus scores; "signatures": {"bleu", "chrf"}: sacreBLEU signatures;
        "bleu_details": sacreBLEU's BLEU line (n-gram precisions, brevity penalty); "n_sentences";
        "beam"; "seconds": translation time; "sentences_per_second"; "hypotheses": the translations}.

    Raises:
        DataError: if sources and references differ in number, or there are none.
    """
    if len(src_texts) != len(ref_texts):
        raise DataError(f"{len(src_texts)} source sentences but {len(ref_texts)} references")
    if not src_texts:  # sacreBLEU fails on an empty corpus with an IndexError
        raise DataError("no sentences to evaluate")
    settings = DecodeConfig() if settings is None else settings
    start = time.perf_counter()
    hypotheses = best(engine.translate(src_texts, settings))
    seconds = time.perf_counter() - start
    bleu, chrf = BLEU(tokenize=tokenize, lowercase=lowercase), CHRF(lowercase=lowercase)
    bleu_score = bleu.corpus_score(hypotheses, [list(ref_texts)])
    chrf_score = chrf.corpus_score(hypotheses, [list(ref_texts)])
    return {
        "bleu": bleu_score.score,
        "chrf": chrf_score.score,
        "signatures": {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())},
        "bleu_details": str(bleu_score),
        "n_sentences": len(src_texts),
        "beam": settings.beam_size,
        "seconds": seconds,
        "sentences_per_second": len(src_texts) / seconds if seconds > 0 else 0.0,
        "hypotheses": hypotheses,
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transformer-evaluate", description="Translate a test set and report sacreBLEU BLEU and chrF."
    )
    add_model_arguments(parser)
    add_rerank_arguments(parser)
    parser.add_argument("--split", choices=("test", "valid"), default="test",
                        help="split of the checkpoint's data config (default: test)")
    parser.add_argument("--src", type=Path, help="source file, one sentence per line (instead of --split)")
    parser.add_argument("--ref", type=Path, help="reference file aligned with --src")
    parser.add_argument("--output", type=Path,
                        help="hypothesis file (default: hyp.SPLIT.txt next to the last checkpoint)")
    parser.add_argument("--tokenize", choices=TOKENIZERS, default="13a", help="sacreBLEU tokenizer for BLEU")
    parser.add_argument("--lowercase", action="store_true", help="case-insensitive scores")
    parser.add_argument("--bleu", choices=("sacrebleu", "paper", "multi30k"), default="sacrebleu",
                        help="paper: also print BLEU as the paper's WMT14 numbers were computed (Moses-tokenized, "
                             "compounds split, multi-bleu counting); multi30k: also print BLEU as Multi30k papers "
                             "report it (lowercased, punctuation-normalised, Moses-tokenized); both next to "
                             "sacreBLEU's")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--no-cache", action="store_true",
                        help="recompute the whole prefix at every step instead of using the key/value cache")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point of `transformer-evaluate`."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.src is None) != (args.ref is None):
        parser.error("--src and --ref go together")
    device = prepare(parser, args)
    try:
        if args.bleu != "sacrebleu":
            moses()  # before any decoding: the flavour's tokenizer is installed
        data_files = [("the --src file", args.src), ("the --ref file", args.ref)] if args.src is not None else []
        if args.output is not None:  # refused before anything is loaded; the split's files are checked below
            check_not_an_input("--output", args.output, model_inputs(args) + data_files)
        engine, config, decode = load_engine(args, device)
        if args.src is not None:
            src_texts, ref_texts, name = read_lines(args.src), read_lines(args.ref), args.src.name
        else:
            src_texts, ref_texts = load_split(config.data, args.split)
            name = args.split
            data_files = [(f"a file of the {args.split} split", path)
                          for path in local_split_files(config.data, [args.split])]
        output = args.output or Path(args.checkpoint[-1]).parent / f"hyp.{name}.txt"
        check_not_an_input("--output" if args.output else "the hypothesis file (--output)", output,
                           model_inputs(args, decode) + data_files)
        if not src_texts:
            data = config.data
            origin = data.local_dir if data.local_dir and Path(data.local_dir).is_dir() else data.hub_name
            where = args.src if args.src is not None else f"the {args.split} split of {origin}"
            raise DataError(f"{where}: no sentences to evaluate")
        result = evaluate(engine, src_texts, ref_texts, decode, args.tokenize, args.lowercase)
        result["precision"] = decode.precision
        if decode.rerank_with is not None:
            result["rerank_weight"] = decode.rerank_weight
        if args.bleu != "sacrebleu":
            result[f"{args.bleu}_bleu"], result[f"{args.bleu}_bleu_details"] = tokenized_bleu(
                result["hypotheses"], ref_texts, config.data.tgt_lang, args.bleu)
        output.write_text("".join(h + "\n" for h in result.pop("hypotheses")), encoding="utf-8")
    except (CheckpointError, DataError, ImportError, OSError) as e:
        sys.exit(f"error: {e}")
    logger.info("wrote %d hypotheses to %s", result["n_sentences"], output)
    if args.json:
        print(json.dumps(result))
    else:
        label = f"{STANDARD_LABEL}: " if args.bleu != "sacrebleu" else ""
        print(f"{label}{result['bleu_details']}\n  {result['signatures']['bleu']}")
        if args.bleu != "sacrebleu":
            print(f"{FLAVOUR_LABELS[args.bleu]}: {result[f'{args.bleu}_bleu_details']}")
        print(f"chrF2 = {result['chrf']:.2f}\n  {result['signatures']['chrf']}")
        reranked = f", reranked (weight {decode.rerank_weight:g})" if decode.rerank_with is not None else ""
        print(f"{result['n_sentences']} sentences, beam {result['beam']}{reranked}, {result['precision']}, "
              f"{result['seconds']:.1f} s "
              f"({result['sentences_per_second']:.1f} sentences/s)")


if __name__ == "__main__":
    main()
