"""What an install on a GPU machine needs: the PyTorch versions declared are the ones the code works
with (a CUDA build already installed in that range is kept), and the optional packages are imported
only where they are used, so that training and decoding run without `datasets`, `sacremoses` and
`transformers`. (DDP's older constructor is tested in tests/test_gpu_paths.py.)"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from helpers import ROOT, TIMEOUT, one_line_error
from packaging.requirements import Requirement

from transformer.commands import evaluate

# Run in a fresh interpreter in which importing any of BLOCKED fails, as on a machine without them.
WITHOUT_OPTIONAL = """
import sys
BLOCKED = ("datasets", "sacremoses", "transformers")
for name in BLOCKED:
    sys.modules[name] = None  # `import name` raises ImportError
import transformer.train, transformer.commands.evaluate, transformer.commands.translate
import transformer.decoding.ctranslate2_engine
from transformer.bleu import tokenized_bleu
try:
    tokenized_bleu(["a b"], ["a b"], "en", "paper")
except ImportError as e:
    print(e)
"""


def test_training_and_decoding_import_without_the_optional_packages():
    pytest.importorskip("ctranslate2")  # the engine itself needs it
    done = subprocess.run([sys.executable, "-c", WITHOUT_OPTIONAL], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == ("the paper's and Multi30k's BLEU flavours need sacremoses (Moses tokenization): "
                                   "pip install sacremoses")


def test_a_tokenized_bleu_flavour_without_sacremoses_is_one_line_before_any_decoding(tiny_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "sacremoses", None)
    output = tiny_run / "hyp.flavour.txt"
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--checkpoint", str(tiny_run / "checkpoints" / "step_1.pt"), "--device", "cpu", "--bleu", "paper",
                       "--output", str(output)])
    one_line_error(exit, "need sacremoses", "pip install sacremoses")
    assert not output.exists()


def test_the_declared_pytorch_versions_keep_an_installed_211_212_or_213():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    torch = Requirement(re.search(r'^\s*"(torch[<>=!~,.\d\s]*)"', pyproject, flags=re.M).group(1))
    assert all(torch.specifier.contains(v) for v in ("2.11.0", "2.12.1", "2.13.0"))
    assert "pip install torch==2.13.0" in (ROOT / "README.md").read_text(encoding="utf-8")  # what a CPU machine gets
    gpu = (ROOT / "docs" / "gpu.md").read_text(encoding="utf-8")
    assert "pip install --no-deps --no-build-isolation -e ." in gpu
