"""Hostile input to the tools that read checkpoints: averaging checkpoints that do not belong
together or over one of its inputs, undecodable lines in the middle of a translation, and sentences
too long to draw. Files that carry code: test_untrusted_files.py."""

import struct
from pathlib import Path

import pytest
import torch
from helpers import TINY_WORDS, one_line_error, tiny_sentences

from transformer.checkpoint import load_checkpoint, load_model, save_checkpoint, tokenizer_state
from transformer.commands import attention, average, evaluate, translate
from transformer.config import TokenizerConfig, config_to_dict
from transformer.data.tokenizer import train_tokenizer
from transformer.decoding.translator import translate as translate_texts

pytestmark = pytest.mark.usefixtures("one_thread")


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def variant(run: Path, tmp_path: Path, name: str, change) -> Path:
    """A copy of step_1.pt with `change(state)` applied."""
    state = load_checkpoint(run / "checkpoints" / "step_1.pt")
    state.pop("format")
    change(state)
    save_checkpoint(state, tmp_path / name)
    return tmp_path / name


def test_average_refuses_checkpoints_of_another_vocabulary_or_tokenizer_or_model(run, tmp_path):
    first = run / "checkpoints" / "step_1.pt"
    output = tmp_path / "avg.pt"

    # Another vocabulary: different embedding shapes (a traceback before).
    other_texts = tiny_sentences(TINY_WORDS["de"], 200, 7)
    bigger = train_tokenizer(other_texts, TokenizerConfig(vocab_size=120), tmp_path / "bigger")

    def other_vocabulary(state):
        state["tokenizers"] = tokenizer_state(bigger, bigger)
        for name in ("src_embed.weight", "output_projection.weight"):
            state["model"][name] = torch.zeros(bigger.vocab_size, state["model"][name].size(1))
    with pytest.raises(SystemExit) as exit:
        average.main(["--inputs", str(first), str(variant(run, tmp_path, "vocab.pt", other_vocabulary)),
                      "--output", str(output)])
    one_line_error(exit, "vocab.pt", "tokenizer differs", str(first))

    # The same shapes, another tokenizer: averaged silently into a meaningless model before.
    same_size = train_tokenizer(tiny_sentences(TINY_WORDS["de"], 200, 8), TokenizerConfig(vocab_size=100), tmp_path / "same")
    original = load_model([first]).src_tokenizer
    assert same_size.vocab_size == original.vocab_size and same_size.to_bytes() != original.to_bytes()
    tokenizer = variant(run, tmp_path, "tokenizer.pt",
                        lambda state: state.update(tokenizers=tokenizer_state(same_size, same_size)))
    with pytest.raises(SystemExit) as exit:
        average.main(["--inputs", str(first), str(tokenizer), "--output", str(output)])
    one_line_error(exit, "tokenizer.pt", "src tokenizer differs")

    # Another model setting with the same parameter shapes.
    model = variant(run, tmp_path, "model.pt", lambda state: state["config"]["model"].update(norm_first=True))
    with pytest.raises(SystemExit) as exit:
        average.main(["--inputs", str(first), str(model), "--output", str(output)])
    one_line_error(exit, "model.pt", "model.norm_first is True", "False")
    assert not output.exists() and not temp_files(tmp_path)
    # Evaluating several checkpoints averages them: the same checks.
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--checkpoint", str(first), str(tokenizer), "--device", "cpu"])
    one_line_error(exit, "tokenizer.pt", "src tokenizer differs")


def test_average_refuses_to_write_over_an_input_or_into_a_folder(run, tmp_path, monkeypatch):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes((run / "checkpoints" / "step_1.pt").read_bytes())
    b.write_bytes((run / "checkpoints" / "step_2.pt").read_bytes())
    before = b.read_bytes()
    with pytest.raises(SystemExit) as exit:
        average.main(["--inputs", str(a), str(b), "--output", str(b)])
    one_line_error(exit, str(b), "one of the checkpoints to average")
    assert b.read_bytes() == before
    monkeypatch.chdir(tmp_path)  # the same file named another way
    with pytest.raises(SystemExit) as exit:
        average.main(["--inputs", str(a), "b.pt", "--output", str(tmp_path / "." / "b.pt")])
    one_line_error(exit, "one of the checkpoints to average")

    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(SystemExit) as exit:
        average.main(["--inputs", str(a), str(b), "--output", str(folder)])
    one_line_error(exit, str(folder), "folder")
    assert not temp_files(tmp_path), temp_files(tmp_path)


def test_translate_writes_the_lines_before_an_undecodable_one(run, tmp_path, capsysbinary):
    good = ["ein hund", "eine frau läuft", "kind"]
    path = tmp_path / "input.de"
    path.write_bytes(("\n".join(good) + "\n").encode() + b"ein \xff mann\nder hund\n")
    with pytest.raises(SystemExit) as exit:
        translate.main(["--checkpoint", str(run / "checkpoints" / "step_1.pt"), "--input", str(path),
                        "--device", "cpu"])
    loaded = load_model([run / "checkpoints" / "step_1.pt"])
    expected = translate_texts(loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, good, beam_size=2,
                               max_len_a=1.0, max_len_b=4, max_src_len=24)
    assert capsysbinary.readouterr().out.decode("utf-8") == "".join(line + "\n" for line in expected)
    one_line_error(exit, f"{path}:4: invalid UTF-8 byte", "the 3 lines before it were translated")
    assert "UTF-8" in translate._parser().format_help()  # the behaviour is documented in --help


def png_size(path: Path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


def test_attention_refuses_sentences_too_long_to_draw(run, tmp_path, capsys):
    output = tmp_path / "a.png"
    sentence = " ".join(["hund"] * 150)
    with pytest.raises(SystemExit) as exit:
        attention.main(["--checkpoint", str(run / "checkpoints" / "step_1.pt"), "--sentence", sentence,
                             "--output", str(output), "--device", "cpu", "--max-tokens", "20"])
    pieces = len(load_model([run / "checkpoints" / "step_1.pt"]).src_tokenizer.encode(sentence)) + 1
    one_line_error(exit, f"--sentence has {pieces} pieces with EOS, more than the 20", "--max-tokens")
    assert not output.exists()


def test_the_attention_figure_stays_within_its_size_bound(monkeypatch, tmp_path):
    monkeypatch.setattr(attention, "MAX_FIGURE_INCHES", 20.0)
    pieces = [f"w{i}" for i in range(40)]  # 0.18 inch per piece: 7.2-inch panels, four rows of them
    maps = {kind: [torch.full((1, 2, 40, 40), 1 / 40)] for kind in ("encoder", "cross")}
    maps["decoder"] = [torch.full((1, 2, 40, 40), 1 / 40)] * 2
    output = tmp_path / "big.png"
    attention.plot_attention(maps, pieces, pieces, output)
    width, height = png_size(output)
    assert max(width, height) <= 20 * 100 and height == 2000  # 4 rows shrunk to 5 inches, at 100 dpi

