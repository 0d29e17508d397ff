"""What the commands that load a checkpoint share: their arguments, checks and decode settings."""

from __future__ import annotations

import argparse
import dataclasses
import logging

import torch

from .checkpoint import LoadedModel, load_model
from .config import DecodeConfig
from .runtime import PRECISION_DTYPES, bound_onednn_caches, keep_freed_memory, resolve_device, resolve_precision


def add_model_arguments(parser: argparse.ArgumentParser, batch_tokens: bool = True) -> None:
    """--checkpoint (several are averaged), --beam, --alpha, optionally --batch-tokens, --precision and --device."""
    parser.add_argument("--checkpoint", action="extend", nargs="+", required=True, metavar="CKPT",
                        help="checkpoint file; several are averaged")
    parser.add_argument("--beam", type=int, help="beam size; 1 = greedy (default: the checkpoint's)")
    parser.add_argument("--alpha", type=float, help="length penalty alpha (default: the checkpoint's)")
    if batch_tokens:
        parser.add_argument("--batch-tokens", type=int, help="source tokens per batch (default: the checkpoint's)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "auto"),
                        help="run the model in float32 or bfloat16 (log-probabilities stay float32); auto: bf16 "
                             "where the device has native bf16 instructions (default: the checkpoint's)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def prepare(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """Check the shared arguments (a usage error otherwise), set up logging and the allocator.

    Returns:
        The device to run on.
    """
    for name in ("beam", "batch_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.alpha is not None and args.alpha < 0:
        parser.error("--alpha must be >= 0")
    keep_freed_memory()
    bound_onednn_caches()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        return resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))


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
    loaded = load_model(args.checkpoint, device)
    decode = decode_settings(loaded.config.decode, args)
    decode = dataclasses.replace(decode, precision=resolve_precision(decode.precision, device))
    loaded.model.to(PRECISION_DTYPES[decode.precision])  # log-probabilities stay float32 either way
    return loaded, decode
