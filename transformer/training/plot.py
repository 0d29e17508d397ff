"""A PNG of the training and validation curves from a run's metrics log."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON lines of a metrics log, one dict per line, in step order.

    A step logged twice counts once, with its latest row, so that curves never double back. (A
    resumed run drops the rows of the steps it replays; a log that still repeats steps, copied
    together by hand say, is drawn correctly too.)
    """
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    latest = {(row["step"], "valid_loss" in row): row for row in rows}
    return sorted(latest.values(), key=lambda row: (row["step"], "valid_loss" in row))


def plot_metrics(metrics_path: str | Path, output: str | Path) -> None:
    """Plot training and validation loss against the step, and validation BLEU against minutes.

    Args:
        metrics_path: JSON lines with "step", "minutes" and any of "loss", "valid_loss", "valid_bleu".
        output: the PNG to write.
    """
    rows = read_metrics(metrics_path)
    series = {key: [(r["step"], r[key]) for r in rows if key in r] for key in ("loss", "valid_loss")}
    fig, (ax_loss, ax_bleu) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("loss", "training loss"), ("valid_loss", "validation loss")):
        if series[key]:
            ax_loss.plot(*zip(*series[key]), label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("label-smoothed cross entropy (nats/token)")
    ax_loss.legend()
    bleu = [(r["minutes"], r["valid_bleu"]) for r in rows if "valid_bleu" in r]
    if bleu:
        ax_bleu.plot(*zip(*bleu), marker="o")
    ax_bleu.set_xlabel("minutes of training (validation pauses excluded)")
    ax_bleu.set_ylabel("validation BLEU")
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)


def validation_bleu(metrics_path: str | Path) -> list[tuple[float, int, float]]:
    """(minutes, step, validation BLEU) at each validation of a run, in step order."""
    return [(r["minutes"], r["step"], r["valid_bleu"]) for r in read_metrics(metrics_path) if "valid_bleu" in r]


def plot_validation_bleu(runs: dict[str, str | Path], output: str | Path, target: float | None = None) -> None:
    """Plot several runs' validation BLEU against minutes of training, one line per run.

    Args:
        runs: label -> metrics log (JSON lines as `plot_metrics` reads).
        output: the PNG to write.
        target: a BLEU level to draw as a horizontal line (e.g. 40, to see each run's time to reach it).
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, path in runs.items():
        points = validation_bleu(path)
        if points:
            ax.plot([m for m, _, _ in points], [b for _, _, b in points], marker="o", label=label)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("minutes of training (validation pauses excluded)")
    ax.set_ylabel("validation BLEU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)
