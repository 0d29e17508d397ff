"""What the commands that load a checkpoint share: their arguments, checks and decode settings."""

from __future__ import annotations

import argparse
import dataclasses
import logging

import torch

from .checkpoint import CheckpointError, LoadedModel, load_model
from .config import DecodeConfig
from .quantize import quantize_int8
from .runtime import PRECISION_DTYPES, resolve_device, resolve_precision, tune_process_for


def add_model_arguments(parser: argparse.ArgumentParser, batch_tokens: bool = True) -> None:
    """--checkpoint (several are averaged), --engine, --beam, --alpha, optionally --batch-tokens, --precision, --device."""
    parser.add_argument("--checkpoint", action="extend", nargs="+", required=True, metavar="CKPT",
                        help="checkpoint file; several are averaged (with --engine ctranslate2: the exported folder)")
    parser.add_argument("--engine", choices=("torch", "ctranslate2"), default="torch",
                        help="decode with this package (torch) or with a model exported by transformer-export "
                             "--format ctranslate2 (default: torch)")
    parser.add_argument("--beam", type=int, help="beam size; 1 = greedy (default: the checkpoint's)")
    parser.add_argument("--alpha", type=float, help="length penalty alpha (default: the checkpoint's; with "
                        "ctranslate2 the export's, in its form log p / length^alpha)")
    if batch_tokens:
        parser.add_argument("--batch-tokens", type=int, help="source tokens per batch (default: the checkpoint's)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "int8", "auto"),
                        help="run the model in float32, bfloat16 or int8 (int8: CPU, every linear layer dynamically "
                             "quantized; log-probabilities stay float32); auto: bf16 where the device has native "
                             "bf16 instructions (default: the checkpoint's; with ctranslate2 the export's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    tune_process_for(device)
    return device


def decode_settings(decode: DecodeConfig, args: argparse.Namespace) -> DecodeConfig:
    """The checkpoint's decode settings with the ones given on the command line put over them."""
    given = {"beam_size": args.beam, "length_penalty": args.alpha, "batch_tokens": getattr(args, "batch_tokens", None),
             "precision": args.precision}
    return dataclasses.replace(decode, **{k: v for k, v in given.items() if v is not None})


def load_for_decoding(args: argparse.Namespace, device: torch.device) -> tuple[LoadedModel, DecodeConfig]:
    """Load `--checkpoint` (averaged if several) and put it in the decode precision.

    Returns:
        The model with its tokenizers and config, and the decode settings to use, whose
        `precision` is resolved ("auto" becomes "bf16" or "fp32" for `device`).

    Raises:
        CheckpointError: a checkpoint that is missing, unreadable or not one of this project's.
    """
    if args.engine == "ctranslate2":
        return _load_ctranslate2(args)
    loaded = load_model(args.checkpoint, device)
    decode = decode_settings(loaded.config.decode, args)
    decode = dataclasses.replace(decode, precision=resolve_precision(decode.precision, device))
    if decode.precision == "int8":
        if device.type != "cpu":
            raise CheckpointError(f"--precision int8 runs on the CPU only, not on {device}")
        loaded.model = quantize_int8(loaded.model)
    else:
        loaded.model.to(PRECISION_DTYPES[decode.precision])  # log-probabilities stay float32 either way
    return loaded, decode


def _load_ctranslate2(args: argparse.Namespace) -> tuple[LoadedModel, DecodeConfig]:
    """Load an exported CTranslate2 folder; its length penalty is the export's unless --alpha is given."""
    try:
        from .ctranslate2_engine import load_ctranslate2
    except ImportError:
        raise CheckpointError("--engine ctranslate2 needs the ctranslate2 package: pip install 'transformer[export]'") from None
    model, config, length_penalty = load_ctranslate2(args.checkpoint[-1], args.precision)
    decode = decode_settings(dataclasses.replace(config.decode, length_penalty=length_penalty), args)
    decode = dataclasses.replace(decode, precision=args.precision or "as exported")
    return LoadedModel(model, config, model.tokenizer, model.tokenizer), decode
