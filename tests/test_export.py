"""Export to Hugging Face Marian and CTranslate2: exact logits, identical decoding, same token ids, bad input."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import one_line_error
from transformers import AutoTokenizer, MarianMTModel
from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

from transformer.atomic import staging_folder
from transformer.bleu import MULTI30K_LABEL, multi30k_bleu
from transformer.checkpoint import load_model, save_checkpoint, tokenizer_state
from transformer.commands import average, evaluate, export
from transformer.config import Config, DataConfig, DecodeConfig, ModelConfig, TokenizerConfig, config_to_dict
from transformer.data.batches import load_split
from transformer.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, train_tokenizer
from transformer.decoding.ctranslate2_engine import CTranslate2Model, convert_marian
from transformer.decoding.search import greedy_search
from transformer.decoding.translator import source_ids, translate_ids
from transformer.model import Transformer, sinusoidal_table

# shared/ lies beside the repository, in development and in CI.
MULTI30K = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k")
MAX_TOKENS = 10  # output tokens before EOS, the same limit for every engine


def random_model(cfg: Config, vocab_size: int, seed: int = 0) -> Transformer:
    """A random model whose greedy outputs vary from sentence to sentence and end at varied lengths.

    As initialised for training, a model's outputs are near-uniform and repeat one token; larger
    weights, and a last-layer LayerNorm bias pointing along the EOS embedding, make the decoders'
    choices, and so the comparisons, informative.
    """
    torch.manual_seed(seed)
    model = Transformer.from_config(cfg.model, vocab_size, vocab_size, PAD_ID)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
        model.src_embed.weight[PAD_ID].zero_()
        eos = model.src_embed.weight[EOS_ID]
        model.decoder.layers[-1].norm3.bias += 4.5 * eos / eos.norm()
    return model.eval()


@pytest.fixture(scope="module")
def multi30k():
    valid_de, valid_en = load_split(DataConfig(local_dir=MULTI30K), "valid")
    train_de, train_en = load_split(DataConfig(local_dir=MULTI30K), "train")
    return {"train": train_de[:3000] + train_en[:3000], "de": valid_de[:400], "en": valid_en[:400]}


@pytest.fixture(scope="module")
def run(tmp_path_factory, multi30k) -> dict:
    """A run folder with a random model's checkpoint and a metrics.jsonl, and its tokenizer."""
    root = tmp_path_factory.mktemp("export")
    tokenizer = train_tokenizer(multi30k["train"], TokenizerConfig(vocab_size=600), root / "spm")
    cfg = Config(
        model=ModelConfig(d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0,
                          max_len=64, share_embeddings=True),
        data=DataConfig(local_dir=MULTI30K, max_len=20),
        decode=DecodeConfig(beam_size=1, max_len_a=0.0, max_len_b=MAX_TOKENS),
    )
    model = random_model(cfg, tokenizer.vocab_size)
    ckpt = root / "run" / "checkpoints" / "final.pt"
    save_checkpoint({"config": config_to_dict(cfg), "model": model.state_dict(),
                     "tokenizers": tokenizer_state(tokenizer, tokenizer), "step": 7}, ckpt)
    rows = [{"step": 7, "minutes": 0.1, "valid_loss": 6.5, "valid_bleu": 1.25}]
    (root / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    hf_dir = root / "hf"
    export.main(["--checkpoint", str(ckpt), "--format", "hf", "--output", str(hf_dir)])
    return {"root": root, "ckpt": ckpt, "cfg": cfg, "model": model, "tokenizer": tokenizer, "hf": hf_dir}


def padded(rows: list[list[int]]) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), PAD_ID, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def test_the_permutation_turns_our_sinusoids_into_marians():
    d_model, n = 32, 50
    marian = MarianSinusoidalPositionalEmbedding(n, d_model).create_weight()
    ours = sinusoidal_table(n, d_model, dtype=torch.float64)
    assert torch.allclose(ours[:, export.residual_permutation(d_model)].float(), marian, atol=1e-6)
    assert not torch.allclose(ours.float(), marian, atol=1e-2)  # the layouts do differ


def test_marian_encoder_output_and_logits_equal_ours_on_a_padded_batch(run, multi30k, tmp_path):
    # A model as initialised for training (the decoding tests' model has weights large enough that
    # float32 rounding, the same in both, is amplified past 1e-5), except that every bias and
    # LayerNorm parameter is moved off its initial 0 or 1: otherwise the permutation of those
    # vectors would go untested.
    tokenizer, cfg = run["tokenizer"], run["cfg"]
    torch.manual_seed(1)
    model = Transformer.from_config(cfg.model, tokenizer.vocab_size, tokenizer.vocab_size, PAD_ID).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.2 * torch.randn_like(parameter))
    ckpt = tmp_path / "init.pt"
    save_checkpoint({"config": config_to_dict(cfg), "model": model.state_dict(),
                     "tokenizers": tokenizer_state(tokenizer, tokenizer)}, ckpt)
    export.main(["--checkpoint", str(ckpt), "--format", "hf", "--output", str(tmp_path / "hf")])
    hf = MarianMTModel.from_pretrained(tmp_path / "hf").eval()
    src = padded(source_ids(tokenizer, multi30k["de"][:6]))
    tgt = padded([[BOS_ID] + tokenizer.encode(t) for t in multi30k["en"][:6]])
    assert (src == PAD_ID).any() and (tgt == PAD_ID).any()
    p = export.residual_permutation(model.d_model)
    with torch.no_grad():
        memory = model.encode(src)
        hf_memory = hf.get_encoder()(input_ids=src, attention_mask=src.ne(PAD_ID)).last_hidden_state
        logits = model(src, tgt)
        hf_logits = hf(input_ids=src, attention_mask=src.ne(PAD_ID), decoder_input_ids=tgt).logits
    real = src.ne(PAD_ID)
    assert torch.allclose(hf_memory[real], memory[..., p][real], atol=1e-5, rtol=0)
    assert logits.abs().max() > 1  # not a model whose logits are all near zero
    assert torch.allclose(hf_logits, logits, atol=1e-5, rtol=0)  # every position, padded ones too


def test_marian_greedy_decoding_gives_our_tokens(run, multi30k):
    model, tokenizer = run["model"], run["tokenizer"]
    hf = MarianMTModel.from_pretrained(run["hf"]).eval()
    src = padded(source_ids(tokenizer, multi30k["de"][:40]))
    ours = greedy_search(model, src, 0.0, MAX_TOKENS, bos_id=BOS_ID, eos_id=EOS_ID)
    with torch.no_grad():
        out = hf.generate(input_ids=src, attention_mask=src.ne(PAD_ID), num_beams=1, do_sample=False)
    theirs = []
    for row in out.tolist():
        assert row[0] == BOS_ID
        row = row[1:]
        theirs.append(row[: row.index(EOS_ID)] if EOS_ID in row else row)
    assert theirs == ours
    assert len({tuple(o) for o in ours}) > 10 and len({len(o) for o in ours}) > 4  # informative outputs


def test_a_gelu_model_exports_exactly_to_both_engines(run, multi30k, tmp_path):
    tokenizer, cfg = run["tokenizer"], run["cfg"]
    gelu = Config(model=dataclasses.replace(cfg.model, activation="gelu"), data=cfg.data, decode=cfg.decode)
    model = random_model(gelu, tokenizer.vocab_size)
    ckpt = tmp_path / "gelu.pt"
    save_checkpoint({"config": config_to_dict(gelu), "model": model.state_dict(),
                     "tokenizers": tokenizer_state(tokenizer, tokenizer)}, ckpt)
    export.main(["--checkpoint", str(ckpt), "--format", "hf", "--output", str(tmp_path / "hf")])
    export.main(["--checkpoint", str(ckpt), "--format", "ctranslate2", "--output", str(tmp_path / "ct2")])
    hf = MarianMTModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.activation_function == "gelu"
    sources = source_ids(tokenizer, multi30k["de"][:40])
    src, tgt = padded(sources[:6]), padded([[BOS_ID] + tokenizer.encode(t) for t in multi30k["en"][:6]])
    with torch.no_grad():
        logits = model(src, tgt)
        hf_logits = hf(input_ids=src, attention_mask=src.ne(PAD_ID), decoder_input_ids=tgt).logits
        relu = Transformer.from_config(cfg.model, tokenizer.vocab_size, tokenizer.vocab_size, PAD_ID).eval()
        relu.load_state_dict(model.state_dict())
        relu_logits = relu(src, tgt)
    assert torch.allclose(hf_logits, logits, atol=1e-4, rtol=0)
    assert not torch.allclose(hf_logits, relu_logits, atol=1e-1)  # the activation does matter here
    ours = translate_ids(model, sources, beam_size=1, max_len_a=0.0, max_len_b=MAX_TOKENS)
    ct2 = CTranslate2Model(tmp_path / "ct2", "float32", threads=1)
    assert ct2.translate_ids(sources, beam_size=1, max_len_a=0.0, max_len_b=MAX_TOKENS) == ours
    assert len({tuple(o) for o in ours}) > 10


def test_the_marian_tokenizer_gives_our_ids_on_multi30k(run, multi30k):
    tokenizer = run["tokenizer"]
    marian = AutoTokenizer.from_pretrained(run["hf"])
    assert type(marian).__name__ == "MarianTokenizer"
    assert (marian.pad_token_id, marian.unk_token_id, marian.bos_token_id, marian.eos_token_id) == (
        PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert len(marian) == tokenizer.vocab_size
    texts = multi30k["de"] + multi30k["en"] + ["Ein Mann mit ☃ und ¿ Zeichen"]
    ours = source_ids(tokenizer, texts)
    assert marian(texts).input_ids == ours
    assert UNK_ID in ours[-1]  # unknown characters map to the same id
    for ids in ours[:200]:
        if UNK_ID not in ids:
            assert marian.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids)


def test_generate_translates_text_and_files_say_what_they_hold(run, multi30k):
    # What pipeline("translation") does (a pipeline Transformers 5 no longer has): tokenize, generate
    # with the folder's generation defaults, decode.
    hf = MarianMTModel.from_pretrained(run["hf"]).eval()
    marian = AutoTokenizer.from_pretrained(run["hf"])
    texts = multi30k["de"][:8]
    with torch.no_grad():
        generated = hf.generate(**marian(texts, return_tensors="pt", padding=True))
    found = marian.batch_decode(generated, skip_special_tokens=True)
    ours = translate_ids(run["model"], source_ids(run["tokenizer"], texts), beam_size=1, max_len_a=0.0,
                         max_len_b=MAX_TOKENS)
    assert found == [marian.decode(ids, skip_special_tokens=True) for ids in ours]
    assert sum(map(bool, found)) > 3
    files = sorted(p.name for p in run["hf"].iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt")) for f in files)
    generation = json.loads((run["hf"] / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == BOS_ID and generation["bad_words_ids"] == [[PAD_ID], [BOS_ID]]
    assert "length ** length_penalty" in generation["length_penalty_form"]
    card = (run["hf"] / "README.md").read_text()
    assert "pipeline_tag: translation" in card and "| 7 | 6.500 | 1.25 |" in card and "d_model: 32" in card


def test_ctranslate2_greedy_decoding_gives_our_tokens(run, multi30k, tmp_path):
    model, tokenizer = run["model"], run["tokenizer"]
    export.main(["--checkpoint", str(run["ckpt"]), "--format", "ctranslate2", "--output", str(tmp_path / "ct2")])
    sources = source_ids(tokenizer, multi30k["de"][:40])
    ours = translate_ids(model, sources, beam_size=1, max_len_a=0.0, max_len_b=MAX_TOKENS)
    ct2 = CTranslate2Model(tmp_path / "ct2", "float32", threads=1)
    assert ct2.translate_ids(sources, beam_size=1, max_len_a=0.0, max_len_b=MAX_TOKENS) == ours
    # int8: CTranslate2's int8 kernels differ by CPU (AVX2 without VNNI rounds more coarsely than
    # AVX-512), and this random model's near-tied choices flip with the rounding, so compare the
    # log-probabilities both give our outputs rather than the outputs: close, where a wrong export
    # would be off by as much as the log-probabilities themselves.
    int8 = CTranslate2Model(tmp_path / "ct2", "int8", threads=1)
    assert all(len(o) <= MAX_TOKENS for o in int8.translate_ids(sources, 1, 1.0, 0.0, MAX_TOKENS))
    rows = [[ct2.pieces[t] for t in ids] for ids in sources]
    targets = [[ct2.pieces[t] for t in ids] for ids in ours]
    exact = [lp for r in ct2.translator.score_batch(rows, targets) for lp in r.log_probs]
    quantized = [lp for r in int8.translator.score_batch(rows, targets) for lp in r.log_probs]
    error = sum(abs(a - b) for a, b in zip(exact, quantized)) / len(exact)
    assert error < 0.3 * sum(map(abs, exact)) / len(exact)


def test_the_ctranslate2_model_cards_code_translates_as_we_do(run, multi30k, tmp_path, capsys):
    folder = tmp_path / "ct2"
    export.main(["--checkpoint", str(run["ckpt"]), "--format", "ctranslate2", "--output", str(folder)])
    card = (folder / "README.md").read_text()
    assert "library_name: ctranslate2" in card and "MarianMTModel.from_pretrained" not in card
    code = card.split("```python\n")[1].split("```")[0]
    texts = multi30k["de"][:40]
    capsys.readouterr()
    exec(code.replace("PATH/TO/THIS/FOLDER", str(folder)).replace('["..."]', repr(texts)), {})
    # The card's length limit is the generation config's, which is the checkpoint's MAX_TOKENS here.
    ours = translate_ids(run["model"], source_ids(run["tokenizer"], texts), beam_size=1, max_len_a=0.0,
                         max_len_b=MAX_TOKENS)
    assert capsys.readouterr().out == f"{[run['tokenizer'].decode(ids) for ids in ours]}\n"


def test_evaluate_scores_both_engines_the_same_way(run, tmp_path, capsys):
    export.main(["--checkpoint", str(run["ckpt"]), "--format", "ctranslate2", "--output", str(tmp_path / "ct2")])
    results = {}
    for engine, model in (("torch", run["ckpt"]), ("ctranslate2", tmp_path / "ct2")):
        evaluate.main(["--checkpoint", str(model), "--engine", engine, "--split", "valid", "--beam", "1", "--json",
                       "--output", str(tmp_path / f"{engine}.txt"), "--device", "cpu"])
        results[engine] = json.loads(capsys.readouterr().out)
    assert (tmp_path / "torch.txt").read_text() == (tmp_path / "ctranslate2.txt").read_text()
    assert results["torch"]["bleu"] == results["ctranslate2"]["bleu"]


def test_evaluate_prints_the_multi30k_flavour_of_its_own_hypotheses(run, multi30k, tmp_path, capsys):
    src, ref = tmp_path / "src.de", tmp_path / "ref.en"
    src.write_text("".join(line + "\n" for line in multi30k["de"][:30]))
    ref.write_text("".join(line + "\n" for line in multi30k["en"][:30]))
    common = ["--checkpoint", str(run["ckpt"]), "--src", str(src), "--ref", str(ref), "--beam", "1", "--device", "cpu",
              "--output", str(tmp_path / "hyp.txt"), "--bleu", "multi30k"]
    evaluate.main(common + ["--json"])
    result = json.loads(capsys.readouterr().out)
    hypotheses = (tmp_path / "hyp.txt").read_text().splitlines()
    expected = multi30k_bleu(hypotheses, multi30k["en"][:30], "en")
    assert result["multi30k_bleu"] == expected[0]
    # The details carry the n-gram counts and both token lengths, which a random model's zero score does not.
    assert result["multi30k_bleu_details"] == expected[1] and "hyp_len" in expected[1]
    evaluate.main(common)
    assert MULTI30K_LABEL in capsys.readouterr().out


def test_a_ctranslate2_model_that_does_not_load_is_a_one_line_error(run, tmp_path):
    folder = tmp_path / "ct2"
    convert_marian(run["hf"], folder)
    (folder / "model.bin").write_bytes((folder / "model.bin").read_bytes()[:100])  # truncated
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--checkpoint", str(folder), "--engine", "ctranslate2", "--split", "valid", "--device", "cpu"])
    one_line_error(exit, str(folder), "CTranslate2 cannot load it")
    (folder / "generation_config.json").unlink()
    with pytest.raises(SystemExit) as exit:
        evaluate.main(["--checkpoint", str(folder), "--engine", "ctranslate2", "--split", "valid", "--device", "cpu"])
    one_line_error(exit, str(folder), "no generation_config.json")


def test_safetensors_average_exports_and_loads_without_unpickling(run, tmp_path, monkeypatch):
    second = tmp_path / "second.pt"
    state = torch.load(run["ckpt"], weights_only=True)
    state["model"] = {k: v * 0.5 for k, v in state["model"].items()}
    save_checkpoint({k: v for k, v in state.items() if k != "format"}, second)
    out = tmp_path / "avg.safetensors"
    average.main(["--inputs", str(run["ckpt"]), str(second), "--output", str(out), "--format", "safetensors"])
    average.main(["--inputs", str(run["ckpt"]), str(second), "--output", str(tmp_path / "avg.pt")])
    from_torch = load_model([tmp_path / "avg.pt"])

    def unpickling(*args, **kwargs):
        raise AssertionError("torch.load called on a safetensors file")

    monkeypatch.setattr(torch, "load", unpickling)
    from_safetensors = load_model([out])
    for (name, a), b in zip(from_safetensors.model.state_dict().items(), from_torch.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert from_safetensors.src_tokenizer.encode("Ein Hund") == run["tokenizer"].encode("Ein Hund")
    # Tied embeddings are stored once.
    assert out.stat().st_size < (tmp_path / "avg.pt").stat().st_size
    export.main(["--checkpoint", str(out), "--format", "hf", "--output", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_average_refuses_a_file_name_its_format_could_not_be_loaded_by(run, tmp_path):
    # Loaders choose torch.load or safetensors by the .safetensors suffix.
    for name, fmt in (("avg.pt", "safetensors"), ("avg.safetensors", "checkpoint")):
        with pytest.raises(SystemExit) as exit:
            average.main(["--inputs", str(run["ckpt"]), "--output", str(tmp_path / name), "--format", fmt])
        one_line_error(exit, name, ".safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("setting, value, named", [
    ("norm_first", True, "model.norm_first=true"),
    ("positional", "learned", "model.positional='learned'"),
    ("tie_output", False, "model.tie_output=false"),
])
def test_unsupported_settings_are_one_line_errors_and_leave_nothing(run, tmp_path, setting, value, named):
    cfg = Config(model=ModelConfig(d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=1,
                                   max_len=32, share_embeddings=True, **{setting: value}), data=DataConfig(max_len=20))
    tokenizer = run["tokenizer"]
    model = Transformer.from_config(cfg.model, tokenizer.vocab_size, tokenizer.vocab_size, PAD_ID)
    ckpt = tmp_path / "ckpt.pt"
    save_checkpoint({"config": config_to_dict(cfg), "model": model.state_dict(),
                     "tokenizers": tokenizer_state(tokenizer, tokenizer)}, ckpt)
    for fmt in ("hf", "ctranslate2"):
        with pytest.raises(SystemExit) as exit:
            export.main(["--checkpoint", str(ckpt), "--format", fmt, "--output", str(tmp_path / "out")])
        one_line_error(exit, named)
        assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_bad_inputs_and_occupied_outputs_are_one_line_errors(run, tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(SystemExit) as exit:
        export.main(["--checkpoint", str(text), "--format", "hf", "--output", str(tmp_path / "out")])
    one_line_error(exit, str(text))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit:
        export.main(["--checkpoint", str(run["ckpt"]), "--format", "hf", "--output", str(occupied)])
    one_line_error(exit, str(occupied), "not an empty folder")
    assert os.listdir(occupied) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["notes.pt", "occupied"]  # no staging folder left behind
    # An existing empty folder is filled.
    (tmp_path / "empty").mkdir()
    export.main(["--checkpoint", str(run["ckpt"]), "--format", "hf", "--output", str(tmp_path / "empty")])
    assert (tmp_path / "empty" / "config.json").is_file()
    with pytest.raises(SystemExit):
        export.main(["--checkpoint", str(run["ckpt"]), "--format", "hf", "--quantization", "int8",
                     "--output", str(tmp_path / "q")])


def test_an_export_removes_the_staging_folders_that_killed_exports_left(tiny_run, tmp_path, killed_staging_folder):
    output = tmp_path / "out"
    killed = killed_staging_folder(output)
    live = staging_folder(output)  # this process's, being written
    export.main(["--checkpoint", str(tiny_run / "checkpoints" / "step_1.pt"), "--format", "hf", "--output", str(output)])
    assert not killed.exists() and (output / "config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == sorted(["out", live.name])


def test_an_error_during_writing_leaves_no_folder(run, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_marian_tokenizer", fail)
    with pytest.raises(SystemExit) as exit:
        export.main(["--checkpoint", str(run["ckpt"]), "--format", "hf", "--output", str(tmp_path / "out")])
    one_line_error(exit, "disk full")
    assert os.listdir(tmp_path) == []


def test_ctranslate2_outputs_stop_where_the_exports_position_table_ends(tiny_ctranslate2):
    """A length limit a * S + b past the export's positions (model.max_len) would make CTranslate2
    fail; the output is cut at max_len - 1 tokens instead."""
    from transformer.decoding.ctranslate2_engine import load_ctranslate2

    model, config, _ = load_ctranslate2(tiny_ctranslate2, None)
    settings = DecodeConfig(beam_size=2, max_len_a=1.0, max_len_b=200, length_penalty_form="length")
    (best, *_), = model.search([[5] * 20], settings)
    assert 0 < len(best.tokens) <= config.model.max_len - 1
