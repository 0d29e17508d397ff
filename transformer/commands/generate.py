"""Sample text from a language model: `transformer-generate CKPT --prompt "A dog" --num 3 --top-p 0.9`.

Reads a checkpoint written by examples/language_model.py: a file holding the `TransformerLM`
constructor settings ("settings"), its weights ("model") and the SentencePiece model as bytes
("tokenizer"). Loading runs no code from the file (`torch.load(weights_only=True)`). Each prompt
is continued `--num` times, in one batch; each line printed is a prompt with its continuation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import sentencepiece as spm
import torch

from transformer.checkpoint import CheckpointError, check_weights, load_torch_file
from transformer.config import ConfigError, bounded_int, finite_float, size_error
from transformer.model import TransformerLM

# `TransformerLM` settings that size memory -> the config key whose limit bounds them.
LM_SIZES = {"vocab_size": "tokenizer.vocab_size", "d_model": "model.d_model", "n_heads": "model.n_heads",
            "d_ff": "model.d_ff", "n_layers": "model.n_decoder_layers", "max_len": "model.max_len"}


class LMCheckpointError(ValueError):
    """A file that is not a readable language-model checkpoint; the message names the file."""


def load_lm(path: Path) -> tuple[TransformerLM, spm.SentencePieceProcessor]:
    """The model (in eval mode) and tokenizer stored in `path`."""
    if not path.is_file():
        raise LMCheckpointError(f"{path}: no such file")
    try:
        state = load_torch_file(path)
    except CheckpointError as e:  # refused for carrying code, truncated, or not a torch file at all
        raise LMCheckpointError(str(e)) from None
    missing = [key for key in ("settings", "model", "tokenizer") if not isinstance(state, dict) or key not in state]
    if missing:
        raise LMCheckpointError(f"{path}: not a language-model checkpoint (missing {', '.join(missing)})")
    for name, key in LM_SIZES.items():  # before the model is built: its sizes come from the file
        value = state["settings"].get(name) if isinstance(state["settings"], dict) else None
        try:
            message = size_error(key, value, f"settings {name}") if type(value) is int else None
        except ConfigError as e:
            raise LMCheckpointError(str(e)) from None
        if message is not None:
            raise LMCheckpointError(f"{path}: {message}")
    try:
        with torch.device("meta"):  # shapes checked before anything of the file's size is allocated
            check_weights(TransformerLM(**state["settings"]), state["model"], path)
        model = TransformerLM(**state["settings"])
        model.load_state_dict(state["model"])
        tokenizer = spm.SentencePieceProcessor(model_proto=state["tokenizer"].numpy().tobytes())
    except CheckpointError as e:  # a tensor missing, of the wrong shape, or not finite
        raise LMCheckpointError(str(e)) from None
    except (TypeError, RuntimeError, ValueError) as e:
        raise LMCheckpointError(f"{path}: inconsistent checkpoint ({str(e).splitlines()[0][:200]})") from None
    return model.eval(), tokenizer


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transformer-generate", description="Continue prompts with a language model checkpoint."
    )
    parser.add_argument("checkpoint", type=Path, help="file written by examples/language_model.py")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text to continue; repeat for several (default: start from nothing)")
    parser.add_argument("--num", type=bounded_int("generate.num"), default=1,
                        help="continuations per prompt (default: 1)")
    parser.add_argument("--max-new-tokens", type=bounded_int("generate.max_new_tokens"), default=40,
                        help="most tokens added (default: 40)")
    parser.add_argument("--temperature", type=finite_float, default=1.0, help="0 = greedy (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most probable tokens (0: all)")
    parser.add_argument("--top-p", type=finite_float, default=1.0, help="sample within the nucleus of mass p (1: all)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the sampling (default: 1)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.num < 1 or args.max_new_tokens < 1:
        parser.error("--num and --max-new-tokens must be >= 1")
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0 (0: greedy), not {args.temperature}")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0 (0: all tokens), not {args.top_k}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1] (1: all tokens), not {args.top_p}")
    if not 0 <= args.seed < 2**64:  # what torch's generator takes
        parser.error(f"--seed must be in [0, 2^64), not {args.seed}")
    try:
        model, tokenizer = load_lm(args.checkpoint)
    except LMCheckpointError as e:
        parser.exit(1, f"transformer-generate: error: {e}\n")
    generator = torch.Generator().manual_seed(args.seed)
    for text in args.prompt or [""]:
        prompt = torch.tensor([[tokenizer.bos_id(), *tokenizer.encode(text)]]).expand(args.num, -1)
        out = model.generate(prompt, args.max_new_tokens, tokenizer.eos_id(), args.temperature, args.top_k,
                             args.top_p, generator)
        for row in out.tolist():
            ids = row[1:]
            if tokenizer.eos_id() in ids:
                ids = ids[: ids.index(tokenizer.eos_id())]
            print(tokenizer.decode(ids))


if __name__ == "__main__":
    main()
