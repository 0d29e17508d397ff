"""Validation BLEU against minutes for several runs: one PNG and one Markdown table.

    python scripts/compare_curves.py --run "new recipe=runs/multi30k_de_en" \
        --run "old recipe=runs/old" --target 40 --output docs/multi30k_de_en_curves.png

Each run's `metrics.jsonl` gives the greedy validation BLEU it logged at every validation and the
minutes of training by then (validation pauses excluded); the table adds the first minute at which
each run reached `--target`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transformer.training.plot import plot_validation_bleu, validation_bleu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=RUN_DIR",
                        help="a run folder (holding metrics.jsonl) and its label; repeat for each run")
    parser.add_argument("--target", type=float, default=40.0, help="BLEU level whose first crossing is reported")
    parser.add_argument("--output", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    runs = {}
    for item in args.run:
        label, sep, folder = item.partition("=")
        metrics = Path(folder) / "metrics.jsonl"
        if not sep or not label:
            sys.exit(f"error: --run {item!r}: expected LABEL=RUN_DIR")
        if not metrics.is_file():
            sys.exit(f"error: --run {item!r}: {metrics} does not exist")
        runs[label] = metrics
    plot_validation_bleu(runs, args.output, args.target)
    for label, metrics in runs.items():
        points = validation_bleu(metrics)
        reached = next((m for m, _, b in points if b >= args.target), None)
        when = f"first at {args.target:g} BLEU after {reached:.1f} minutes" if reached is not None \
            else f"never at {args.target:g} BLEU"
        print(f"\n{label}: {when}\n")
        print("| step | " + " | ".join(f"{s:,}" for _, s, _ in points) + " |")
        print("|---|" + "---|" * len(points))
        print("| minutes | " + " | ".join(f"{m:.1f}" for m, _, _ in points) + " |")
        print("| validation BLEU | " + " | ".join(f"{b:.1f}" for _, _, b in points) + " |")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
