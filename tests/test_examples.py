"""The examples, shortened to seconds: each learns on the real Multi30k text, beyond a bound measured
once with these settings, and the language model's checkpoint works with `transformer-generate`."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from transformer.commands import generate

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"
TINY = ["--d-model", "64", "--n-heads", "4", "--d-ff", "128", "--n-layers", "1", "--threads", "1",
        "--data-dir", str(MULTI30K)]
# Measured once with these settings: validation loss 4.59 (ln V = 6.21) after 150 steps.
LM_LOSS_BOUND = 4.9


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *TINY, *args], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_language_model_learns_and_generates(tmp_path: Path, capsys: pytest.CaptureFixture):
    checkpoint = tmp_path / "lm.pt"
    out = run_example("language_model.py", "--train-sentences", "4000", "--vocab-size", "500", "--steps", "150",
                      "--warmup", "20", "--samples", "2", "--output", str(checkpoint))
    vocab = int(re.search(r"vocabulary (\d+)", out).group(1))
    before, after = map(float, re.search(r"valid perplexity\s+([\d.]+) ->\s+([\d.]+)", out).groups())
    # Untrained, about uniform over the vocabulary (ln V, a little above: random logits are not flat).
    assert abs(math.log(before) - math.log(vocab)) < 1.0, out
    assert math.log(after) < LM_LOSS_BOUND, out
    assert len(re.findall(r"^sampled: ", out, re.MULTILINE)) == 2

    generate.main([str(checkpoint), "--prompt", "A man", "--prompt", "Two dogs", "--num", "2", "--top-p", "0.9",
                   "--temperature", "0.8"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("A man") for line in lines[:2]), lines
    assert all(line.startswith("Two dogs") for line in lines[2:]), lines


def test_generate_refuses_a_file_that_is_not_a_language_model(tmp_path: Path, capsys: pytest.CaptureFixture):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_info:
        generate.main([str(bad)])
    assert exit_info.value.code == 1
    assert f"{bad}: not a readable checkpoint" in capsys.readouterr().err


def test_pair_classifier_runs_and_the_baseline_learns():
    """Shortened to 400 steps, the bag of embeddings learns (74.6% measured) but the encoder
    classifier of this size is still on the plateau at chance that it leaves after ~500 steps (see
    docs/examples.md); that attention learns is asserted in tests/test_classifier.py."""
    out = run_example("classify_pairs.py", "--train-sentences", "8000", "--vocab-size", "1000", "--steps", "400",
                      "--warmup", "40", "--lr", "2e-3")
    accuracy = {name: float(value) / 100 for name, value in
                re.findall(r"^(encoder classifier|bag of embeddings)\s+accuracy: valid [\d.]+%, test ([\d.]+)%",
                           out, re.MULTILINE)}
    assert len(accuracy) == 2 and 0.0 <= accuracy["encoder classifier"] <= 1.0, out
    assert accuracy["bag of embeddings"] > 0.70, out
    assert "points of test accuracy" in out
