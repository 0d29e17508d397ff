"""Average checkpoints: `transformer-average --inputs A.pt B.pt --output avg.pt`.

The paper evaluates the average of the last 5 (base) or 20 (big) checkpoints. `--run-dir DIR
--last N` picks the N most recent step checkpoints of a training run. The result is a checkpoint
that `transformer-evaluate` and `transformer-translate` load like any other; `--format safetensors`
writes only what inference needs (weights, tokenizers, config), in a format read without unpickling.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from transformer.checkpoint import CheckpointError, run_checkpoints, save_averaged

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transformer-average", description="Average the parameters of several checkpoints into one."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--inputs", nargs="+", type=Path, metavar="CKPT", help="checkpoints to average")
    source.add_argument("--run-dir", type=Path, help="training run whose last step checkpoints are averaged")
    parser.add_argument("--last", type=int, default=5, help="with --run-dir: how many checkpoints (default: 5)")
    parser.add_argument("--output", type=Path, required=True, help="averaged checkpoint to write")
    parser.add_argument("--format", choices=("checkpoint", "safetensors"), default="checkpoint",
                        help="checkpoint (torch file, default) or safetensors (weights, tokenizers and config "
                             "for inference and sharing; read without unpickling)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point of `transformer-average`."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.last < 1:
        parser.error("--last must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        if args.run_dir is not None:
            found = run_checkpoints(args.run_dir)
            if len(found) < args.last:
                raise CheckpointError(
                    f"{args.run_dir}: {len(found)} step checkpoints in checkpoints/, fewer than --last {args.last}"
                )
            paths = found[-args.last:]
        else:
            paths = args.inputs
        save_averaged(paths, args.output, args.format)
    except ImportError:
        sys.exit("error: --format safetensors needs the safetensors package: pip install 'transformer[export]'")
    except (CheckpointError, OSError) as e:
        sys.exit(f"error: {e}")
    logger.info("averaged %d checkpoints (%s) into %s", len(paths), ", ".join(p.name for p in paths), args.output)


if __name__ == "__main__":
    main()
