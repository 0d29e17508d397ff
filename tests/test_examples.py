"""The examples, shortened to seconds: each learns on the real Multi30k text, beyond a bound measured
once with these settings, and the language model's checkpoint works with `transformer-generate`."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transformer.checkpoint import load_checkpoint, save_checkpoint
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
    out = run_example("classify_pairs.py", "--init-from", "none", "--train-sentences", "8000", "--vocab-size", "1000",
                      "--steps", "400", "--warmup", "40", "--lr", "2e-3")
    accuracy = {name: float(value) / 100 for name, value in
                re.findall(r"^(encoder classifier from scratch|bag of embeddings)\s+accuracy: valid [\d.]+%, test ([\d.]+)%",
                           out, re.MULTILINE)}
    assert len(accuracy) == 2 and 0.0 <= accuracy["encoder classifier from scratch"] <= 1.0, out
    assert accuracy["bag of embeddings"] > 0.70, out
    assert "points of test accuracy" in out


def load_example(name: str):
    """An example script as a module, its folder importable as it is when the script runs."""
    import importlib.util
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / "examples" / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return module


def test_pair_classifier_starts_from_the_translation_models_embedding_and_encoder(tiny_run, tmp_path):
    example = load_example("classify_pairs.py")
    checkpoint = tiny_run / "checkpoints" / "step_1.pt"
    asked = dict.fromkeys(example.ENCODER_SIZES)
    classifier, tokenizer, sizes = example.classifier_from_translation(checkpoint, 2, "first", 0.1, asked)
    weights = load_checkpoint(checkpoint)["model"]
    copied = {**{f"src_embed.{k}": v for k, v in classifier.embed.state_dict().items()},
              **{f"encoder.{k}": v for k, v in classifier.encoder.state_dict().items()}}
    assert len(copied) > 10 and all(torch.equal(tensor, weights[name]) for name, tensor in copied.items())
    assert sizes == {"d_model": 16, "n_heads": 2, "d_ff": 32, "n_layers": 1}
    assert tokenizer.serialized_model_proto() == bytes(load_checkpoint(checkpoint)["tokenizers"]["src"])
    assert classifier(torch.tensor([[2, 5, 3, 7, 3]])).shape == (1, 2)

    with pytest.raises(example.InitError, match=r"does not fit --d-model 64 \(the checkpoint's encoder has 16\)$"):
        example.classifier_from_translation(checkpoint, 2, "mean", 0.1, {**asked, "d_model": 64})
    state = load_checkpoint(checkpoint)
    state["config"]["tokenizer"]["joint"] = False
    state["config"]["model"]["share_embeddings"] = False
    separate = tmp_path / "separate.pt"
    save_checkpoint(state, separate)
    with pytest.raises(example.InitError, match="its tokenizer is not joint"):
        example.classifier_from_translation(separate, 2, "mean", 0.1, asked)

    # On the command line: one line that names the option and the file, no traceback.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "classify_pairs.py"), "--init-from", str(separate),
                           "--data-dir", str(MULTI30K), "--train-sentences", "50"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"classify_pairs.py: --init-from {separate}: its tokenizer is not joint")


def test_language_model_starts_from_the_translation_models_decoder(tiny_run):
    example = load_example("language_model.py")
    checkpoint = tiny_run / "checkpoints" / "step_2.pt"
    lm, tokenizer, settings = example.lm_from_translation(checkpoint, 0.1)
    weights = load_checkpoint(checkpoint)["model"]
    assert torch.equal(lm.embed.weight, weights["tgt_embed.weight"])
    expected = {"self_attn": "self_attn", "ff": "ff", "norm1": "norm1", "norm2": "norm3"}  # norm2 is cross-attention's
    for i, layer in enumerate(lm.decoder.layers):
        for mine, theirs in expected.items():
            for name, tensor in getattr(layer, mine).state_dict().items():
                assert torch.equal(tensor, weights[f"decoder.layers.{i}.{theirs}.{name}"]), (i, mine, name)
    assert settings["n_layers"] == len(lm.decoder.layers) == 1 and settings["vocab_size"] == tokenizer.get_piece_size()
    assert lm(torch.tensor([[2, 5, 6]])).shape == (1, 3, settings["vocab_size"])


def test_pair_classifier_gives_the_new_head_its_own_learning_rate():
    example = load_example("classify_pairs.py")
    model = example.EncoderClassifier(50, 2, 16, 2, 32, 1)
    rest, head = example.parameter_groups(model, 1e-3, 1e-2)
    assert head["lr"] == 1e-2 and [p.shape for p in head["params"]] == [(2, 16), (2,)]
    assert rest["lr"] == 1e-3 and len(rest["params"]) + 2 == len(list(model.parameters()))
    assert {id(p) for p in rest["params"]}.isdisjoint(id(p) for p in head["params"])
    (alone,) = example.parameter_groups(model, 1e-3, None)
    assert alone["lr"] == 1e-3 and len(alone["params"]) == len(list(model.parameters()))
