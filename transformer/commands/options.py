"""What the commands that load a checkpoint share: their arguments, checks, decode settings and engine.

`decode_settings` builds the one `DecodeConfig` of a command, the checkpoint's with the command
line's options over it; `load_engine` loads the engine that `--engine` names. The commands pass
both on, whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path

import torch

from transformer.checkpoint import CheckpointError, LoadedModel, load_model
from transformer.config import Config, DecodeConfig, bounded_int, finite_float
from transformer.decoding.engine import Engine
from transformer.decoding.quantize import quantize_int8
from transformer.decoding.rerank import ChannelReranker
from transformer.decoding.translator import RerankingEngine, TorchEngine
from transformer.precision import ProbeShape, choose_precision
from transformer.runtime import PRECISION_DTYPES, resolve_device, tune_process_for, use_tf32

log = logging.getLogger(__name__)


def add_model_arguments(parser: argparse.ArgumentParser, batch_tokens: bool = True) -> None:
    """--checkpoint (several are averaged), --engine, --beam, --alpha, optionally --batch-tokens, --precision, --device."""
    parser.add_argument("--checkpoint", action="extend", nargs="+", required=True, metavar="CKPT",
                        help="checkpoint file; several are averaged (with --engine ctranslate2: the exported folder)")
    parser.add_argument("--engine", choices=("torch", "ctranslate2"), default=DecodeConfig.engine,
                        help="decode with this package (torch) or with a model exported by transformer-export "
                             f"--format ctranslate2 (default: {DecodeConfig.engine})")
    parser.add_argument("--beam", type=bounded_int("decode.beam_size"),
                        help="beam size; 1 = greedy (default: the checkpoint's)")
    parser.add_argument("--alpha", type=finite_float, help="length penalty alpha (default: the checkpoint's; with "
                        "ctranslate2 the export's, in its form log p / length^alpha)")
    if batch_tokens:
        parser.add_argument("--batch-tokens", type=bounded_int("decode.batch_tokens"),
                            help="source tokens per batch (default: the checkpoint's)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "int8", "auto"),
                        help="run the model in float32, bfloat16 or int8 (int8: CPU, every linear layer dynamically "
                             "quantized; log-probabilities stay float32); auto: bf16 where it measures clearly faster "
                             "than float32 on this device (default: the checkpoint's; with ctranslate2 the export's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def add_rerank_arguments(parser: argparse.ArgumentParser) -> None:
    """--rerank-with (a reverse-direction checkpoint; several are averaged) and --rerank-weight."""
    parser.add_argument("--rerank-with", action="extend", nargs="+", metavar="CKPT",
                        help="rescore the beam's candidates with this model of the reverse direction (noisy-channel "
                             "reranking; several checkpoints are averaged); it must share the vocabulary")
    parser.add_argument("--rerank-weight", type=float,
                        help=f"weight of the reverse model's log-probability per source token "
                             f"(default: the checkpoint's, {DecodeConfig.rerank_weight} unless set)")


def prepare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """Check the shared arguments (a usage error otherwise), set up logging and, on the CPU, the allocator.

    Returns:
        The device to run on.
    """
    for name in ("beam", "batch_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.alpha is not None and args.alpha < 0:
        parser.error("--alpha must be >= 0")
    if args.engine == "ctranslate2" and len(args.checkpoint) > 1:
        parser.error("--engine ctranslate2 takes one exported folder (average checkpoints before exporting)")
    if getattr(args, "rerank_with", None) is not None:
        if args.engine != "torch":
            parser.error("--rerank-with needs --engine torch")
        if args.beam is not None and args.beam < 2:
            parser.error("--rerank-with needs --beam >= 2")
    if getattr(args, "rerank_weight", None) is not None:
        if args.rerank_with is None:
            parser.error("--rerank-weight needs --rerank-with")
        if not (math.isfinite(args.rerank_weight) and args.rerank_weight >= 0):
            parser.error("--rerank-weight must be a finite number >= 0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    name = args.device
    if name == "auto" and args.precision == "int8" and args.engine == "torch":
        name = "cpu"  # this package's int8 decoding is the CPU's (CTranslate2 has its own on GPUs)
        log.info("--precision int8 runs on the CPU: --device auto takes the CPU")
    try:
        device = resolve_device(name)
    except ValueError as e:
        parser.error(str(e))
    tune_process_for(device)
    use_tf32(device, True)  # float32 decoding on a GPU uses TF32 tensor cores, as training does by default
    return device


def decode_settings(decode: DecodeConfig, args: argparse.Namespace) -> DecodeConfig:
    """The checkpoint's decode settings with the ones given on the command line put over them.

    Raises:
        CheckpointError: settings that do not go together, e.g. a --beam below the checkpoint's
            decode.n_best.
    """
    given = {"engine": args.engine, "beam_size": args.beam, "length_penalty": args.alpha,
             "batch_tokens": getattr(args, "batch_tokens", None), "precision": args.precision,
             "use_cache": False if getattr(args, "no_cache", False) else None,
             "rerank_with": getattr(args, "rerank_with", None), "rerank_weight": getattr(args, "rerank_weight", None)}
    settings = dataclasses.replace(decode, **{k: v for k, v in given.items() if v is not None})
    if problems := settings.errors():
        raise CheckpointError(f"{args.checkpoint[-1]}: its decode settings with the command line's options: "
                              f"{problems[0]}")
    return settings


def model_inputs(args: argparse.Namespace, decode: DecodeConfig | None = None) -> list[tuple[str, Path]]:
    """The files (or exported folder) that `--checkpoint` and `--rerank-with` name, as
    `atomic.check_not_an_input` takes them: an output must be none of these. Given the decode
    settings, the reranking checkpoints are theirs, which a checkpoint's config may name."""
    inputs = [("the --checkpoint", Path(path)) for path in args.checkpoint]
    rerank_with = getattr(args, "rerank_with", None) if decode is None else decode.rerank_with
    return inputs + [("the --rerank-with checkpoint", Path(path)) for path in rerank_with or []]


def load_engine(args: argparse.Namespace, device: torch.device) -> tuple[Engine, Config, DecodeConfig]:
    """The engine `--engine` names, loaded from `--checkpoint`, in the decode precision.

    Returns:
        The engine (reranking when the settings name reverse checkpoints), the config the model
        was trained with, and the decode settings (`decode_settings`, precision resolved).

    Raises:
        CheckpointError: a checkpoint or export that is missing, unreadable or not one of this
            project's, or settings that do not go together.
    """
    if args.engine == "ctranslate2":
        return _load_ctranslate2(args, device)
    loaded, decode = load_for_decoding(args, device)
    reranker = load_reranker(args, loaded, decode, device)
    parts = (loaded.src_tokenizer, loaded.tgt_tokenizer, loaded.config.model.max_len, device)
    engine = (TorchEngine(loaded.model, *parts) if reranker is None
              else RerankingEngine(loaded.model, reranker.model, *parts))
    return engine, loaded.config, decode


def load_for_decoding(args: argparse.Namespace, device: torch.device) -> tuple[LoadedModel, DecodeConfig]:
    """Load `--checkpoint` (averaged if several) and put it in the decode precision.

    Returns:
        The model with its tokenizers and config, and the decode settings to use, whose
        `precision` is resolved ("auto" becomes "bf16" or "fp32" for `device`).

    Raises:
        CheckpointError: a checkpoint that is missing, unreadable or not one of this project's.
    """
    loaded = load_model(args.checkpoint, device)
    decode = decode_settings(loaded.config.decode, args)
    decode = dataclasses.replace(decode, precision=decode_precision(loaded, decode, device))
    loaded.model = _in_precision(loaded.model, decode.precision, device)
    return loaded, decode


def decode_precision(loaded: LoadedModel, decode: DecodeConfig, device: torch.device) -> str:
    """The decode precision resolved for `device`: "auto" measures float32 against bfloat16 on the
    model's shapes (`precision.choose_precision`) and logs the figure."""
    model = loaded.config.model
    vocab = loaded.model.output_projection.out_features
    shape = ProbeShape.of(model.d_model, model.d_ff, vocab, decode.batch_tokens, training=False)
    choice = choose_precision(decode.precision, device, shape)
    if decode.precision == "auto":
        log.info("precision: %s", choice.describe())
    return choice.precision


def _in_precision(model: torch.nn.Module, precision: str, device: torch.device) -> torch.nn.Module:
    """The model in a resolved decode precision: int8 (CPU only), or cast to bf16 / fp32."""
    if precision == "int8":
        if device.type != "cpu":
            raise CheckpointError(f"precision int8 runs on the CPU only, not on {device}: decode with --device cpu, "
                                  "or give --precision fp32 or bf16 to decode on the GPU")
        return quantize_int8(model)
    return model.to(PRECISION_DTYPES[precision])  # log-probabilities stay float32 either way


def load_reranker(
    args: argparse.Namespace, loaded: LoadedModel, decode: DecodeConfig, device: torch.device
) -> ChannelReranker | None:
    """The reverse model that `decode.rerank_with` names (`--rerank-with`, or the checkpoint's config),
    in the decode precision, checked against the forward model, with its weight; None without one.

    Raises:
        CheckpointError: an unreadable checkpoint, one whose tokenizers are not the forward model's
            with the sides swapped, one of the wrong languages, or a beam of 1.
    """
    if decode.rerank_with is None:
        return None
    path = decode.rerank_with[-1]
    if decode.beam_size < 2:
        raise CheckpointError(f"--rerank-with needs a beam of 2 or more; {args.checkpoint[-1]} decodes with beam "
                              f"{decode.beam_size} (give --beam)")
    reverse = load_model(decode.rerank_with, device)
    forward_data, reverse_data = loaded.config.data, reverse.config.data
    if (reverse_data.src_lang, reverse_data.tgt_lang) != (forward_data.tgt_lang, forward_data.src_lang):
        raise CheckpointError(f"{path} translates {reverse_data.src_lang}->{reverse_data.tgt_lang}; reranking "
                              f"{forward_data.src_lang}->{forward_data.tgt_lang} needs a "
                              f"{forward_data.tgt_lang}->{forward_data.src_lang} model")
    if (reverse.src_tokenizer.to_bytes() != loaded.tgt_tokenizer.to_bytes()
            or reverse.tgt_tokenizer.to_bytes() != loaded.src_tokenizer.to_bytes()):
        raise CheckpointError(f"{path}: its vocabulary is not {args.checkpoint[-1]}'s with the sides swapped, so it "
                              "cannot score that model's outputs")
    return ChannelReranker(_in_precision(reverse.model, decode.precision, device), decode.rerank_weight)


def _load_ctranslate2(args: argparse.Namespace, device: torch.device) -> tuple[Engine, Config, DecodeConfig]:
    """Load an exported CTranslate2 folder on `device`; its length penalty is the export's unless --alpha is given."""
    try:
        from transformer.decoding.ctranslate2_engine import load_ctranslate2
    except ImportError:
        raise CheckpointError("--engine ctranslate2 needs the ctranslate2 package: pip install 'transformer[export]'") from None
    model, config, length_penalty = load_ctranslate2(args.checkpoint[-1], args.precision, device)
    exported = dataclasses.replace(config.decode, engine="ctranslate2", length_penalty=length_penalty,
                                   length_penalty_form="length")
    decode = decode_settings(exported, args)
    if decode.rerank_with is not None:
        raise CheckpointError(f"{args.checkpoint[-1]}: its config names reranking checkpoints (decode.rerank_with), "
                              "and reranking needs --engine torch")
    return model, config, dataclasses.replace(decode, precision=args.precision or "as exported")
