"""Curves from metrics logs: validation BLEU per run, and the side-by-side comparison script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from transformer.training.plot import plot_validation_bleu, validation_bleu

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_curves.py"


def write_run(folder: Path, validations: list[tuple[int, float, float]]) -> Path:
    """A run folder whose metrics.jsonl has training rows and the given (step, minutes, BLEU) validations."""
    folder.mkdir()
    rows = []
    for step, minutes, bleu in validations:
        rows.append({"step": step, "loss": 3.0, "minutes": minutes})
        rows.append({"step": step, "minutes": minutes, "valid_loss": 2.0, "valid_bleu": bleu})
    rows.append(rows[-1])  # a validation logged twice (a resumed run) counts once
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_validation_bleu_keeps_validations_only_in_step_order(tmp_path):
    run = write_run(tmp_path / "a", [(300, 2.0, 13.4), (600, 4.1, 24.7)])
    assert validation_bleu(run / "metrics.jsonl") == [(2.0, 300, 13.4), (4.1, 600, 24.7)]
    plot_validation_bleu({"a": run / "metrics.jsonl"}, tmp_path / "a.png", target=40)
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")


def test_compare_curves_reports_the_first_minute_at_the_target_per_run(tmp_path):
    fast = write_run(tmp_path / "fast", [(300, 2.0, 35.0), (600, 4.0, 40.5), (900, 6.0, 41.0)])
    slow = write_run(tmp_path / "slow", [(300, 3.0, 30.0), (600, 6.0, 39.9)])
    result = subprocess.run([sys.executable, str(SCRIPT), "--run", f"fast={fast}", "--run", f"slow={slow}",
                             "--target", "40", "--output", str(tmp_path / "c.png")],
                            capture_output=True, text=True, check=True)
    assert "fast: first at 40 BLEU after 4.0 minutes" in result.stdout
    assert "slow: never at 40 BLEU" in result.stdout
    assert "| validation BLEU | 35.0 | 40.5 | 41.0 |" in result.stdout
    assert (tmp_path / "c.png").is_file()


def test_compare_curves_names_a_run_folder_without_metrics(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--run", f"x={tmp_path}", "--output", str(tmp_path / "c.png")],
                            capture_output=True, text=True)
    assert result.returncode != 0 and result.stderr.strip().startswith("error: --run")
    assert "metrics.jsonl does not exist" in result.stderr and "Traceback" not in result.stderr
