"""Translate text: `transformer-translate --checkpoint CKPT < input.de > output.en`.

Reads one sentence per line from standard input (or `--input`) and writes one translation per
line, in input order; an empty line gives an empty line. Piped input is read and translated in
chunks, so that large files stream; at an interactive terminal every line is translated as soon
as it is entered. Lines longer than the model's positions are truncated with a warning.

Input must be UTF-8. A line that is not stops the command with a one-line error naming its number,
after every line before it has been translated and written: the output never gets out of step with
the input, and nothing is guessed for a line that cannot be read.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

from transformer.atomic import check_not_an_input
from transformer.checkpoint import CheckpointError
from transformer.commands.options import add_model_arguments, add_rerank_arguments, load_engine, model_inputs, prepare
from transformer.config import DecodeConfig
from transformer.decoding.engine import Engine, best

logger = logging.getLogger(__name__)

CHUNK_LINES = 256  # lines translated together when the input is not a terminal


class InputError(ValueError):
    """An input line that cannot be read as text; the message names the file and line."""


def read_chunks(stream: BinaryIO, name: str, size: int) -> Iterator[list[str]]:
    """Yield the lines of `stream` as stripped UTF-8 strings, `size` at a time.

    Lines are split on "\\n" only, as the training data is, so that a stray Unicode line separator
    inside a sentence cannot shift the output against the input.

    Args:
        stream: binary input.
        name: its name for error messages.
        size: lines per chunk (the last chunk may be shorter).

    Raises:
        InputError: a line that is not valid UTF-8, once the lines before it have been yielded.
    """
    lines = iter(stream)
    number = 0
    while chunk := list(itertools.islice(lines, size)):
        texts = []
        for raw in chunk:
            number += 1
            try:
                texts.append(raw.decode("utf-8").strip())
            except UnicodeDecodeError as e:
                if texts:
                    yield texts
                raise InputError(f"{name}:{number}: invalid UTF-8 byte {raw[e.start:e.start + 1]!r}; "
                                 f"the {number - 1} lines before it were translated") from None
        yield texts


def translate(engine: Engine, sentences: Sequence[str], settings: DecodeConfig, first_line: int = 1) -> list[str]:
    """The best translation of each sentence, in input order; `first_line` numbers `sentences[0]` in warnings."""
    return best(engine.translate(sentences, settings, first_line))


def _descriptor(stream: object) -> int:
    """The file descriptor of a standard stream; -1 where it has none (replaced by an in-memory one)."""
    try:
        return stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return -1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transformer-translate", description="Translate one sentence per line from stdin or a file."
    )
    add_model_arguments(parser)
    add_rerank_arguments(parser)
    parser.add_argument("--input", type=Path,
                        help="UTF-8 input file (default: standard input); a line that is not UTF-8 stops the "
                             "command with an error naming it, after the lines before it are written")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point of `transformer-translate`."""
    parser = _parser()
    args = parser.parse_args(argv)
    device = prepare(parser, args)
    try:
        check_not_an_input("standard output", _descriptor(sys.stdout), model_inputs(args) + (
            [("the --input file", args.input)] if args.input is not None else [("standard input", _descriptor(sys.stdin))]))
        engine, _, decode = load_engine(args, device)
        if args.input is None:
            stream, name, interactive = sys.stdin.buffer, "<stdin>", sys.stdin.isatty()
        else:
            stream, name, interactive = open(args.input, "rb"), str(args.input), False
        with stream:
            first_line = 1
            for texts in read_chunks(stream, name, 1 if interactive else CHUNK_LINES):
                outputs = translate(engine, texts, decode, first_line)
                sys.stdout.buffer.write("".join(out + "\n" for out in outputs).encode("utf-8"))
                sys.stdout.buffer.flush()
                first_line += len(texts)
    except (CheckpointError, InputError, OSError) as e:
        if isinstance(e, BrokenPipeError):
            # The reader went away (e.g. `| head`): stop quietly, and keep Python from failing
            # again when it flushes stdout at exit.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
