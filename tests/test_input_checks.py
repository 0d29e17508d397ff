"""Values and files that must be refused with one line naming what is wrong, before they give a wrong
result or a traceback: checkpoints of another language pair, non-finite weights, options and
exported files with values out of range, tensors of the wrong shape, an empty test set."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import one_line_error

from transformer.bleu import tokenized_bleu
from transformer import checkpoint
from transformer.checkpoint import elements_bound, load_checkpoint, load_model, save_checkpoint, save_safetensors
from transformer.commands import attention, average, evaluate, export, generate, options, translate
from transformer.config import ConfigError, ModelConfig, load_config
from transformer.data.batches import DataError

pytestmark = pytest.mark.usefixtures("one_thread")


def usage_error(exit: pytest.ExceptionInfo, capsys: pytest.CaptureFixture, *fragments: str) -> str:
    """argparse's refusal: exit status 2, and after its usage line one error line holding `fragments`."""
    assert exit.value.code == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    assert ": error: " in line and all(f in line for f in fragments), err
    return line


def never(*args, **kwargs):
    raise AssertionError("called after a refused argument")


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
        "attention": (attention.main, ["--checkpoint", str(bad), "--sentence", "ein hund",
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


def test_a_small_file_whose_config_asks_for_a_huge_model_is_refused_before_the_model_is_built(tiny_run, tmp_path):
    """Each size within its limit, together about 30 GB of parameters: refused by the shapes of the
    file's own small tensors, in a process that could not allocate such a model."""
    path = variant(tiny_run / "checkpoints" / "step_1.pt", tmp_path / "huge.pt",
                   lambda state: state["config"]["model"].update(d_model=16384, d_ff=65536))
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
              "from transformer.checkpoint import CheckpointError, load_model\n"
              "try:\n    load_model([sys.argv[1]])\nexcept CheckpointError as e:\n    sys.exit(f'refused: {e}')")
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("refused: ") and "has shape" in done.stderr, done.stderr[-500:]


@pytest.mark.parametrize("sizes", [
    {}, {"share_embeddings": True}, {"tie_output": False}, {"positional": "learned"}, {"norm_first": True},
    {"n_encoder_layers": 1, "n_decoder_layers": 3, "d_ff": 24, "max_len": 7},
])
def test_the_element_bound_is_above_every_built_model(sizes):
    """`load_model` trusts the bound to tell a file that holds what its config asks for (built at
    once) from one that asks for more (shapes checked without storage first): it must never be
    below what a model really allocates."""
    config = ModelConfig(**{"d_model": 16, "n_heads": 2, "d_ff": 40, "n_encoder_layers": 2, "n_decoder_layers": 2,
                            "max_len": 50, **sizes})
    src_vocab, tgt_vocab = (37, 37) if config.share_embeddings else (37, 29)
    model = checkpoint.Transformer.from_config(config, src_vocab, tgt_vocab, 0)
    built = sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())
    assert built <= elements_bound(config, src_vocab, tgt_vocab) <= 2 * built


def test_an_honest_checkpoint_is_built_at_once_and_a_huge_config_first_without_storage(tiny_run, tmp_path, monkeypatch):
    checked = []
    check_weights = checkpoint.check_weights

    def watched(model, weights, path):
        checked.append(next(model.parameters()).is_meta)
        return check_weights(model, weights, path)

    monkeypatch.setattr(checkpoint, "check_weights", watched)
    load_model([tiny_run / "checkpoints" / "step_1.pt"])
    assert checked == [False]
    checked.clear()
    huge = variant(tiny_run / "checkpoints" / "step_1.pt", tmp_path / "huge.pt",
                   lambda state: state["config"]["model"].update(d_model=16384, d_ff=65536))
    with pytest.raises(checkpoint.CheckpointError, match="has shape"):
        load_model([huge])
    assert checked == [True]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_export_refuses_a_non_finite_length_penalty_before_loading(value, tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "load_model", never)
    for fmt in ("hf", "ctranslate2"):
        with pytest.raises(SystemExit) as exit:
            export.main(["--checkpoint", str(tiny_run / "checkpoints" / "step_1.pt"), "--format", fmt,
                         f"--length-penalty={value}", "--output", str(tmp_path / "out")])
        usage_error(exit, capsys, "--length-penalty", "finite", value)
    assert list(tmp_path.iterdir()) == []


def test_export_never_writes_a_non_finite_number_into_its_json(tiny_run, tmp_path):
    with pytest.raises(export.ExportError, match="length penalty"):
        export.export([tiny_run / "checkpoints" / "step_1.pt"], tmp_path / "out", "hf", length_penalty=float("nan"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value", [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
    ("--top-p", "nan"), ("--top-p", "inf"), ("--top-p", "0"), ("--top-p", "1.5"),
    ("--top-k", "-1"), ("--seed", str(2**64)), ("--seed", "-1"),
])
def test_generate_refuses_non_finite_or_out_of_range_sampling_values(option, value, tiny_lm, capsys, monkeypatch):
    monkeypatch.setattr(generate, "load_lm", never)
    with pytest.raises(SystemExit) as exit:
        generate.main([str(tiny_lm), "--prompt", "ein", option, value])
    usage_error(exit, capsys, option)


@pytest.mark.parametrize("command", [evaluate, translate, attention])
@pytest.mark.parametrize("option, value", [("--alpha", "nan"), ("--alpha", "inf"), ("--alpha", "-1")])
def test_decoding_commands_refuse_a_non_finite_length_penalty(command, option, value, tiny_run, capsys, monkeypatch):
    monkeypatch.setattr(options, "load_model", never)
    argv = ["--checkpoint", str(tiny_run / "checkpoints" / "step_1.pt"), "--device", "cpu", option, value]
    if command is attention:
        argv += ["--sentence", "ein hund"]
    with pytest.raises(SystemExit) as exit:
        command.main(argv)
    usage_error(exit, capsys, option)


@pytest.mark.parametrize("override", ["decode.length_penalty=.inf", "train.lr_scale=.nan", "model.dropout=.nan",
                                      "train.clip_norm=-.inf",
                                      pytest.param("train.max_minutes=1" + "0" * 400, id="an int beyond float")])
def test_config_floats_must_be_finite(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_attention_refuses_the_ctranslate2_engine_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(attention, "load_for_decoding", never)
    with pytest.raises(SystemExit) as exit:
        attention.main(["--checkpoint", str(tmp_path / "ct2"), "--engine", "ctranslate2",
                             "--sentence", "ein hund", "--output", str(tmp_path / "a.png")])
    usage_error(exit, capsys, "--engine ctranslate2", "cross-attention")
    assert list(tmp_path.iterdir()) == []


DAMAGED_EXPORTS = {  # file -> (content, what the error says)
    "bad YAML": ("training_config.yaml", "model: [d_model: 16\n", "invalid YAML"),
    "bad value": ("training_config.yaml", "model:\n  d_model: -16\n", "model.d_model must be > 0"),
    "unknown key": ("training_config.yaml", "model:\n  d_modle: 16\n", "d_modle"),
    "YAML list": ("training_config.yaml", "- model\n", "mapping"),
    "YAML not UTF-8": ("training_config.yaml", b"model:\n  activation: r\xffelu\n", "UTF-8"),
    "truncated JSON": ("generation_config.json", '{"length_penalty": 1.0, "num_be', "not valid JSON"),
    "JSON list": ("generation_config.json", "[1.0, 2.0]", "a JSON object"),
    "JSON NaN": ("generation_config.json", '{"length_penalty": NaN}', "length_penalty"),
    "JSON string": ("generation_config.json", '{"length_penalty": "long"}', "length_penalty"),
    "JSON huge int": ("generation_config.json", '{"length_penalty": 1' + "0" * 400 + "}", "length_penalty"),
}


@pytest.mark.parametrize("damage", DAMAGED_EXPORTS)
@pytest.mark.parametrize("command", [evaluate, translate])
def test_a_damaged_ctranslate2_export_is_a_one_line_error_naming_the_file(damage, command, tiny_ctranslate2, tiny_run,
                                                                          tmp_path):
    folder = tmp_path / "ct2"
    shutil.copytree(tiny_ctranslate2, folder)
    name, content, reason = DAMAGED_EXPORTS[damage]
    if isinstance(content, bytes):
        (folder / name).write_bytes(content)
    else:
        (folder / name).write_text(content, encoding="utf-8")
    argv = ["--checkpoint", str(folder), "--engine", "ctranslate2", "--device", "cpu"]
    if command is evaluate:
        argv += ["--output", str(tmp_path / "hyp.txt")]
    else:
        argv += ["--input", str(tiny_run / "data" / "test.de")]
    with pytest.raises(SystemExit) as exit:
        command.main(argv)
    one_line_error(exit, str(folder / name), reason)
    assert not (tmp_path / "hyp.txt").exists()


@pytest.mark.parametrize("flavour", ["sacrebleu", "paper", "multi30k"])
def test_an_empty_test_set_is_refused_for_every_bleu_flavour(flavour, tiny_run, tmp_path):
    src, ref = tmp_path / "empty.de", tmp_path / "empty.en"
    src.write_text("")
    ref.write_text("")
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--checkpoint", str(tiny_run / "checkpoints" / "step_1.pt"), "--src", str(src), "--ref", str(ref),
                       "--bleu", flavour, "--output", str(tmp_path / "hyp.txt"), "--device", "cpu"])
    one_line_error(exit, str(src), "no sentences")
    assert not (tmp_path / "hyp.txt").exists()

    # An empty split of the checkpoint's data folder, too.
    data = tmp_path / "data"
    data.mkdir()
    for lang in ("de", "en"):
        (data / f"test.{lang}").write_text("")
    checkpoint = variant(tiny_run / "checkpoints" / "step_1.pt", tmp_path / "ckpt.pt",
                         lambda state: state["config"]["data"].update(local_dir=str(data)))
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--checkpoint", str(checkpoint), "--bleu", flavour, "--device", "cpu"])
    one_line_error(exit, "test split", str(data), "no sentences")
    assert not (tmp_path / "hyp.test.txt").exists()


def test_scoring_functions_refuse_an_empty_test_set(tiny_run):
    for flavour in ("paper", "multi30k"):
        with pytest.raises(ValueError, match="no sentences"):
            tokenized_bleu([], [], "en", flavour)
    with pytest.raises(DataError, match="no sentences"):
        evaluate.evaluate(load_model([tiny_run / "checkpoints" / "step_1.pt"]), [], [])
