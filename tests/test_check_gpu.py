"""scripts/check_gpu.py in its --cpu mode: every stage but `devices` (this suite runs
tests/test_devices.py itself) on a tiny corpus named as Multi30k's files are, and a stage that
outlives its timeout stopped and named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, TIMEOUT, write_corpus

SCRIPT = ROOT / "scripts" / "check_gpu.py"


def multi30k_named(folder: Path) -> Path:
    """The tiny corpus under Multi30k's split names (train, val, test_2016_flickr)."""
    folder.mkdir()
    write_corpus(folder)
    for split, name in (("valid", "val"), ("test", "test_2016_flickr")):
        for lang in ("de", "en"):
            (folder / f"{split}.{lang}").rename(folder / f"{name}.{lang}")
    return folder


def stage_results(stdout: str) -> dict[str, tuple[str, object]]:
    """{"train fp32": ("ok", {...}), ...} from the script's lines `NAME: STATUS (N s) JSON`."""
    found = {}
    for line in stdout.splitlines():
        name, sep, rest = line.partition(": ")
        if sep and " (" in rest and ") " in rest:
            status, _, result = rest.partition(" (")
            found[name] = (status, json.loads(result.split(") ", 1)[1]))
    return found


def test_the_cpu_mode_trains_in_fp32_and_bf16_decodes_and_runs_two_gloo_ranks(tmp_path):
    data = multi30k_named(tmp_path / "multi30k")
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--data", str(data), "--out", str(tmp_path / "out"),
                           "--stage", "env,train,decode,ddp", "--steps", "12", "--sentences", "20"],
                          cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    results = stage_results(done.stdout)
    assert list(results) == ["env", "train fp32", "train bf16", "decode", "ddp"], done.stdout
    assert all(status == "ok" for status, _ in results.values()), done.stdout
    for precision in ("fp32", "bf16"):
        train = results[f"train {precision}"][1]
        assert train["precision"] == precision and train["steps"] == 12 and train["tokens/s"] > 0 and train["ms per step"] > 0
    decode = results["decode"][1]
    assert decode["sentences"] == 20 and all(decode[p]["sentences/s"] > 0 and 0 <= decode[p]["BLEU"] <= 100
                                             for p in ("fp32", "bf16"))
    ddp = results["ddp"][1]
    assert ddp["backend"] == "gloo"
    for rank in (0, 1):
        assert ddp[f"rank {rank}"]["reads per step"] == ['{"tolist": 1}']
        assert ddp[f"rank {rank}"]["collectives per step"] == ['{"all_gather": 1, "all_reduce": 1}']
    assert (tmp_path / "out" / "summary.md").read_text().count(": ok (") == 5


def test_a_stage_that_outlives_its_timeout_is_stopped_and_named(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--data", str(tmp_path), "--out", str(tmp_path / "out"),
                           "--stage", "env", "--timeout", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 1
    assert stage_results(done.stdout) == {"env": ("TIMEOUT", "stopped at the stage's timeout of 0.5 s")}, done.stdout
