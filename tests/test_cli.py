"""The command-line tools on tiny checkpoints: evaluate, translate, average, attention plots."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import one_line_error

from transformer import precision, runtime
from transformer.checkpoint import load_checkpoint, load_model, save_checkpoint, tokenizer_state
from transformer.commands import attention, average, evaluate, options, translate
from transformer.config import ModelConfig, TokenizerConfig
from transformer.data.tokenizer import PAD_ID, train_tokenizer
from transformer.decoding.rerank import ChannelReranker
from transformer.decoding.translator import translate as translate_texts
from transformer.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bad_files(run) -> dict[str, Path]:
    """A missing file, a checkpoint cut in half, and a text file posing as a checkpoint."""
    good = (run / "checkpoints" / "step_1.pt").read_bytes()
    (run / "truncated.pt").write_bytes(good[: len(good) // 2])
    (run / "text.pt").write_text("not a checkpoint\n")
    return {"missing": run / "missing.pt", "truncated": run / "truncated.pt", "text": run / "text.pt"}


def test_evaluate_reports_scores_and_writes_hypotheses(run, capsys):
    ckpt = run / "checkpoints" / "step_1.pt"
    evaluate.main(["--checkpoint", str(ckpt), "--json", "--device", "cpu"])
    result = json.loads(capsys.readouterr().out)
    assert result["n_sentences"] == 8 and result["beam"] == 2
    assert 0.0 <= result["bleu"] <= 100.0 and 0.0 <= result["chrf"] <= 100.0
    assert "tok:13a" in result["signatures"]["bleu"] and "nrefs:1" in result["signatures"]["chrf"]
    assert result["seconds"] > 0 and result["sentences_per_second"] > 0
    hypotheses = (run / "checkpoints" / "hyp.test.txt").read_text(encoding="utf-8").split("\n")
    assert len(hypotheses) == 8 + 1 and hypotheses[-1] == ""

    # Files instead of a split, greedy, two checkpoints averaged, plain-text report.
    output = run / "hyp.custom.txt"
    evaluate.main(["--checkpoint", str(ckpt), str(run / "checkpoints" / "step_2.pt"), "--src",
                   str(run / "data" / "valid.de"), "--ref", str(run / "data" / "valid.en"), "--beam", "1",
                   "--output", str(output), "--tokenize", "intl", "--lowercase", "--device", "cpu"])
    report = capsys.readouterr().out
    assert report.startswith("BLEU = ") and "tok:intl" in report and "case:lc" in report and "chrF2" in report
    assert len(output.read_text(encoding="utf-8").splitlines()) == 6


@pytest.mark.parametrize("native", [True, False])
def test_precision_puts_the_model_in_bf16_and_auto_follows_the_measurement(native, run, capsys, caplog, monkeypatch):
    # The probe measures bf16 at 2x float32's speed, or at half of it.
    timings = {"fp32": 1.0, "bf16": 0.5 if native else 2.0}
    monkeypatch.setattr(precision, "measure_probe", lambda shape, name, repeats: timings[name])
    ckpt = str(run / "checkpoints" / "step_1.pt")
    parser = evaluate._parser()
    for flag, expected in ((None, "fp32"), ("bf16", "bf16"), ("fp32", "fp32"), ("auto", "bf16" if native else "fp32")):
        args = parser.parse_args(["--checkpoint", ckpt] + (["--precision", flag] if flag else []))
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            loaded, decode = options.load_for_decoding(args, torch.device("cpu"))
        assert decode.precision == expected
        assert {p.dtype for p in loaded.model.parameters()} == {runtime.PRECISION_DTYPES[expected]}
        # Asking for bf16 where it measures slower is allowed, with a warning that gives the figure.
        assert ("measured 0.50x float32's speed" in caplog.text) == (flag == "bf16" and not native)
    evaluate.main(["--checkpoint", ckpt, "--json", "--device", "cpu", "--precision", "bf16"])
    result = json.loads(capsys.readouterr().out)
    assert result["precision"] == "bf16" and result["n_sentences"] == 8 and 0.0 <= result["bleu"] <= 100.0


def test_evaluate_rejects_misaligned_references(run, tmp_path):
    short = tmp_path / "short.en"
    short.write_text("one line\n")
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--checkpoint", str(run / "checkpoints" / "step_1.pt"), "--src",
                       str(run / "data" / "valid.de"), "--ref", str(short), "--device", "cpu"])
    one_line_error(exit, "6 source sentences but 1 references")


@pytest.fixture(scope="module")
def reverse(run) -> dict[str, Path]:
    """English->German checkpoints for reranking the run's German->English model: one with the run's
    vocabulary, one with a vocabulary of its own."""
    state = load_checkpoint(run / "checkpoints" / "step_10.pt")
    state["config"]["data"].update(src_lang="en", tgt_lang="de")
    save_checkpoint(state, run / "reverse.pt")
    texts = (run / "data" / "train.en").read_text().split("\n")
    other = train_tokenizer(texts, TokenizerConfig(vocab_size=60), run / "spm_other")
    model = Transformer.from_config(ModelConfig(**state["config"]["model"]), other.vocab_size,
                                    other.vocab_size, PAD_ID)
    save_checkpoint(dict(state, model=model.state_dict(), tokenizers=tokenizer_state(other, other)),
                    run / "reverse_other_vocab.pt")
    return {"same": run / "reverse.pt", "other": run / "reverse_other_vocab.pt"}


def test_evaluate_and_translate_rerank_with_a_reverse_model(run, reverse, capsysbinary):
    ckpt = str(run / "checkpoints" / "step_10.pt")
    evaluate.main(["--checkpoint", ckpt, "--rerank-with", str(reverse["same"]), "--rerank-weight", "20",
                   "--beam", "3", "--json", "--device", "cpu", "--output", str(run / "hyp.reranked.txt")])
    result = json.loads(capsysbinary.readouterr().out)
    assert result["rerank_weight"] == 20.0 and result["beam"] == 3 and result["n_sentences"] == 8
    forward, backward = load_model([ckpt]), load_model([reverse["same"]])
    sources = (run / "data" / "test.de").read_text(encoding="utf-8").splitlines()
    expected = translate_texts(forward.model, forward.src_tokenizer, forward.tgt_tokenizer, sources, beam_size=3,
                               max_len_a=1.0, max_len_b=4, max_src_len=24,
                               reranker=ChannelReranker(backward.model, 20.0))
    assert (run / "hyp.reranked.txt").read_text(encoding="utf-8").splitlines() == expected
    plain = translate_texts(forward.model, forward.src_tokenizer, forward.tgt_tokenizer, sources, beam_size=3,
                            max_len_a=1.0, max_len_b=4, max_src_len=24)
    assert plain != expected  # the reverse model changed some choice, so the files show it was used
    translate.main(["--checkpoint", ckpt, "--rerank-with", str(reverse["same"]), "--rerank-weight", "20", "--beam", "3",
                    "--input", str(run / "data" / "test.de"), "--device", "cpu"])
    assert capsysbinary.readouterr().out.decode("utf-8").splitlines() == expected


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_the_reverse_model_decodes_in_the_forward_models_precision(precision, run, reverse, capsysbinary):
    ckpt = str(run / "checkpoints" / "step_10.pt")
    argv = ["--checkpoint", ckpt, "--rerank-with", str(reverse["same"]), "--precision", precision, "--device", "cpu"]
    args = evaluate._parser().parse_args(argv)
    loaded, decode = options.load_for_decoding(args, torch.device("cpu"))
    reranker = options.load_reranker(args, loaded, decode, torch.device("cpu"))
    layer_types = lambda model: sorted({type(m).__name__ for m in model.modules()})  # noqa: E731
    assert layer_types(reranker.model) == layer_types(loaded.model)
    assert {p.dtype for p in reranker.model.parameters()} == {p.dtype for p in loaded.model.parameters()}
    assert reranker.model is not loaded.model and reranker.weight == 0.5
    evaluate.main(argv + ["--json", "--output", str(run / f"hyp.{precision}.txt")])
    result = json.loads(capsysbinary.readouterr().out)
    assert result["precision"] == precision and result["rerank_weight"] == 0.5 and result["n_sentences"] == 8


def test_reranking_with_the_wrong_model_or_settings_is_a_clear_error(run, reverse, capsys, tmp_path):
    ckpt = str(run / "checkpoints" / "step_1.pt")
    greedy = load_checkpoint(ckpt)
    greedy["config"]["decode"]["beam_size"] = 1
    save_checkpoint(greedy, tmp_path / "greedy.pt")
    base = ["--checkpoint", ckpt, "--device", "cpu"]
    for extra, fragments in (
        (["--rerank-with", ckpt], ("translates de->en", "needs a en->de model")),
        (["--rerank-with", str(reverse["other"])], (str(reverse["other"]), "vocabulary is not")),
        (["--rerank-with", str(reverse["same"])], ("needs a beam of 2 or more", "greedy.pt decodes with beam 1")),
    ):
        with pytest.raises(SystemExit) as exit:
            evaluate.main((["--checkpoint", str(tmp_path / "greedy.pt"), "--device", "cpu"]
                           if "greedy.pt decodes with beam 1" in fragments else base) + extra)
        one_line_error(exit, *fragments)
    for extra, message in (
        (["--rerank-weight", "1"], "--rerank-weight needs --rerank-with"),
        (["--rerank-with", str(reverse["same"]), "--rerank-weight", "-1"], "--rerank-weight must be a finite number"),
        (["--rerank-with", str(reverse["same"]), "--rerank-weight", "nan"], "--rerank-weight must be a finite number"),
        (["--rerank-with", str(reverse["same"]), "--beam", "1"], "--rerank-with needs --beam >= 2"),
        (["--rerank-with", str(reverse["same"]), "--engine", "ctranslate2"], "--rerank-with needs --engine torch"),
    ):
        with pytest.raises(SystemExit) as exit:
            translate.main(base + extra)
        assert exit.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "truncated", "text"])
@pytest.mark.parametrize("tool", ["evaluate", "translate", "attention", "average"])
def test_bad_checkpoint_is_a_one_line_error(tool, kind, bad_files, run, tmp_path):
    path = str(bad_files[kind])
    argv = {
        "evaluate": (evaluate.main, ["--checkpoint", path, "--device", "cpu"]),
        "translate": (translate.main, ["--checkpoint", path, "--input", str(run / "data" / "test.de")]),
        "attention": (attention.main, ["--checkpoint", path, "--sentence", "ein hund",
                                            "--output", str(tmp_path / "a.png")]),
        "average": (average.main, ["--inputs", str(run / "checkpoints" / "step_1.pt"), path,
                                   "--output", str(tmp_path / "avg.pt")]),
    }
    main, args = argv[tool]
    with pytest.raises(SystemExit) as exit:
        main(args)
    one_line_error(exit, path)


def test_translate_keeps_order_and_empty_lines_and_truncates(run, tmp_path, capsysbinary, caplog):
    long_line = " ".join(["hund"] * 40)  # more tokens than the model's 24 positions
    lines = ["ein mann spielt", "", "eine frau läuft im park", "   ", "kind", long_line, "der hund"]
    path = tmp_path / "input.de"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        translate.main(["--checkpoint", str(run / "checkpoints" / "step_1.pt"), "--input", str(path),
                        "--device", "cpu"])
    outputs = capsysbinary.readouterr().out.decode("utf-8").split("\n")
    assert len(outputs) == len(lines) + 1 and outputs[-1] == ""
    loaded = load_model([run / "checkpoints" / "step_1.pt"])
    for line, output in zip(lines, outputs):
        alone = translate_texts(loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, [line], beam_size=2,
                                max_len_a=1.0, max_len_b=4, max_src_len=24)[0]
        assert output == alone
        assert (output == "") == (line.strip() == "")
    assert any("line 6" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)


def test_translate_rejects_invalid_utf8_with_its_line(run, tmp_path):
    path = tmp_path / "bad.de"
    path.write_bytes(b"ein hund\nein \xff mann\n")
    with pytest.raises(SystemExit) as exit:
        translate.main(["--checkpoint", str(run / "checkpoints" / "step_1.pt"), "--input", str(path),
                        "--device", "cpu"])
    one_line_error(exit, f"{path}:2", "UTF-8")


def test_translate_streams_stdin_and_fails_cleanly_as_a_process(run, bad_files):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "transformer.commands.translate", "--checkpoint"]
    good = subprocess.run(command + [str(run / "checkpoints" / "step_2.pt"), "--device", "cpu", "--beam", "1"],
                          input="ein hund\n\neine frau\n".encode(), capture_output=True, env=env, timeout=120)
    assert good.returncode == 0, good.stderr.decode()
    loaded = load_model([run / "checkpoints" / "step_2.pt"])
    expected = translate_texts(loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer, ["ein hund", "eine frau"],
                               beam_size=1, max_len_a=1.0, max_len_b=4)
    assert good.stdout.decode("utf-8").split("\n") == [expected[0], "", expected[1], ""]
    bad = subprocess.run(command + [str(bad_files["truncated"])], capture_output=True, env=env, timeout=120)
    stderr = bad.stderr.decode()
    assert bad.returncode != 0 and "Traceback" not in stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1


def test_average_is_the_mean_of_the_tensors(run, tmp_path):
    a, b = run / "checkpoints" / "step_1.pt", run / "checkpoints" / "step_2.pt"
    average.main(["--inputs", str(a), str(b), "--output", str(tmp_path / "avg.pt")])
    averaged = load_checkpoint(tmp_path / "avg.pt")["model"]
    first, second = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert averaged.keys() == first.keys()
    for name, tensor in averaged.items():
        torch.testing.assert_close(tensor, (first[name] + second[name]) / 2, rtol=0, atol=1e-7)
    assert not torch.equal(first["src_embed.weight"], second["src_embed.weight"])

    # The last N step checkpoints of a run, in step order (step_10 after step_2).
    average.main(["--run-dir", str(run), "--last", "2", "--output", str(tmp_path / "last2.pt")])
    last2 = load_checkpoint(tmp_path / "last2.pt")["model"]
    tenth = load_checkpoint(run / "checkpoints" / "step_10.pt")["model"]
    torch.testing.assert_close(last2["src_embed.weight"], (second["src_embed.weight"] + tenth["src_embed.weight"]) / 2)
    with pytest.raises(SystemExit) as exit:
        average.main(["--run-dir", str(run), "--last", "5", "--output", str(tmp_path / "last5.pt")])
    one_line_error(exit, "fewer than --last 5")


def test_attention_plot_writes_an_image(run, tmp_path, capsys):
    output = tmp_path / "attention.png"
    attention.main(["--checkpoint", str(run / "checkpoints" / "step_1.pt"), "--sentence",
                         "ein mann spielt mit einem ball", "--output", str(output), "--device", "cpu"])
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = load_model([run / "checkpoints" / "step_1.pt"])
    expected = translate_texts(loaded.model, loaded.src_tokenizer, loaded.tgt_tokenizer,
                               ["ein mann spielt mit einem ball"], beam_size=2, max_len_a=1.0, max_len_b=4)
    assert capsys.readouterr().out == expected[0] + "\n"
