"""Values and files that must be refused with one line naming what is wrong, before they give a wrong
result or a traceback: checkpoints of another language pair, non-finite weights, options and
exported files with values out of range, tensors of the wrong shape, an empty test set."""

from pathlib import Path

import pytest
import torch

from transformer import attention_plot, average, evaluate, export, generate, translate
from transformer.checkpoint import load_checkpoint, save_checkpoint, save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line_error(exit: pytest.ExceptionInfo, *fragments: str) -> str:
    message = exit.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    assert all(f in message for f in fragments), message
    return message


def variant(source: Path, path: Path, change) -> Path:
    """A copy of the checkpoint `source` at `path`, with `change(state)` applied."""
    state = load_checkpoint(source)
    state.pop("format")
    change(state)
    save_checkpoint(state, path)
    return path


def test_average_refuses_checkpoints_of_another_language_pair(tiny_run, tmp_path):
    first = tiny_run / "checkpoints" / "step_1.pt"

    def reverse(state):  # the same shapes and the same joint vocabulary, the other direction
        state["config"]["data"].update(src_lang="en", tgt_lang="de")

    en_de = variant(tiny_run / "checkpoints" / "step_2.pt", tmp_path / "en_de.pt", reverse)
    output = tmp_path / "avg.pt"
    with pytest.raises(SystemExit) as exit:
        average.main(["--inputs", str(first), str(en_de), "--output", str(output)])
    one_line_error(exit, str(en_de), "en->de", str(first), "de->en")
    assert not output.exists()


WEIGHT = "decoder.layers.0.ff.linear1.weight"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("command", ["evaluate", "translate", "attention", "export", "average", "rerank"])
def test_non_finite_weights_are_refused_where_a_checkpoint_is_loaded(command, value, tiny_run, tmp_path):
    good = tiny_run / "checkpoints" / "step_1.pt"

    def spoil(state):
        state["model"][WEIGHT][3, 5] = value

    bad = variant(good, tmp_path / "bad.pt", spoil)
    common = ["--device", "cpu"]
    argv = {
        "evaluate": (evaluate.main, ["--checkpoint", str(bad), "--output", str(tmp_path / "hyp.txt"), *common]),
        "translate": (translate.main, ["--checkpoint", str(bad), "--input", str(tiny_run / "data" / "test.de"),
                                       *common]),
        "attention": (attention_plot.main, ["--checkpoint", str(bad), "--sentence", "ein hund",
                                            "--output", str(tmp_path / "a.png"), *common]),
        "export": (export.main, ["--checkpoint", str(bad), "--format", "hf", "--output", str(tmp_path / "hf")]),
        "average": (average.main, ["--inputs", str(good), str(bad), "--output", str(tmp_path / "avg.pt")]),
        "rerank": (evaluate.main, ["--checkpoint", str(good), "--rerank-with", str(bad), "--beam", "2",
                                   "--output", str(tmp_path / "hyp.txt"), *common]),
    }
    main, args = argv[command]
    with pytest.raises(SystemExit) as exit:
        main(args)
    one_line_error(exit, str(bad), WEIGHT, "not finite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]  # nothing written


def test_generate_refuses_non_finite_weights(tiny_lm, tmp_path, capsys):
    state = torch.load(tiny_lm, weights_only=True)
    name = next(name for name, tensor in state["model"].items() if tensor.dim() == 2 and "embed" not in name)
    state["model"][name][0, 0] = float("nan")
    bad = tmp_path / "lm.pt"
    torch.save(state, bad)
    with pytest.raises(SystemExit) as exit:
        generate.main([str(bad), "--prompt", "ein"])
    assert exit.value.code != 0
    err = capsys.readouterr()
    assert err.out == "" and len(err.err.strip().splitlines()) == 1, err
    assert str(bad) in err.err and name in err.err and "not finite" in err.err


def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(tiny_run, tmp_path):
    state = load_checkpoint(tiny_run / "checkpoints" / "step_1.pt")
    state["model"][WEIGHT] = state["model"][WEIGHT].t().contiguous()  # (16, 32) where (32, 16) belongs
    for path in (tmp_path / "bad.safetensors", tmp_path / "bad.pt"):
        if path.suffix == ".safetensors":
            save_safetensors(state, path)
        else:
            save_checkpoint({k: v for k, v in state.items() if k != "format"}, path)
        with pytest.raises(SystemExit) as exit:
            evaluate.main(["--checkpoint", str(path), "--output", str(tmp_path / "hyp.txt"), "--device", "cpu"])
        one_line_error(exit, str(path), WEIGHT, "(16, 32)", "(32, 16)")
        with pytest.raises(SystemExit) as exit:
            average.main(["--inputs", str(tiny_run / "checkpoints" / "step_1.pt"), str(path),
                          "--output", str(tmp_path / "avg.pt")])
        one_line_error(exit, str(path), WEIGHT, "(16, 32)", "(32, 16)")
    # A tensor missing or one too many is named too.
    del state["model"][WEIGHT]
    save_safetensors(state, tmp_path / "missing.safetensors")
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--checkpoint", str(tmp_path / "missing.safetensors"), "--device", "cpu"])
    one_line_error(exit, "missing.safetensors", WEIGHT)
    assert not (tmp_path / "hyp.txt").exists()
