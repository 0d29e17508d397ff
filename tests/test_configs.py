"""The shipped configs: every one loads, the WMT 2014 ones carry the paper's recipe, and the two
Multi30k directions share their data, vocabulary and kind of model."""

from pathlib import Path

import pytest

from transformer.config import config_to_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER_STEP_TOKENS = 25000  # source tokens (and target tokens) per training step, section 5.1


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads(path: Path):
    cfg = load_config(path)
    assert Path(cfg.train.output_dir).name == path.stem  # runs of different configs never mix


@pytest.mark.parametrize("size", ["base", "big"])
def test_wmt14_configs_are_the_papers_recipe(size: str):
    cfg = load_config(CONFIGS / f"wmt14_en_de_{size}.yaml")
    m, d, t, tr, dec = cfg.model, cfg.data, cfg.tokenizer, cfg.train, cfg.decode
    # Table 3
    expected = {"base": (512, 2048, 8, 0.1), "big": (1024, 4096, 16, 0.3)}[size]
    assert (m.d_model, m.d_ff, m.n_heads, m.dropout) == expected
    assert (m.n_encoder_layers, m.n_decoder_layers) == (6, 6)
    assert not m.norm_first and m.positional == "sinusoidal" and m.share_embeddings and m.tie_output
    # Data: WMT 2014 English -> German, newstest2013 to validate, newstest2014 to test.
    assert (d.src_lang, d.tgt_lang) == ("en", "de") and d.local_dir is None
    assert (d.hub_name, d.hub_config, d.hub_field) == ("wmt14", "de-en", "translation")
    assert (d.hub_train_split, d.hub_valid_split, d.hub_test_split) == ("train", "validation", "test")
    assert d.max_len == 256 and m.max_len >= d.max_len + 1
    # A shared byte-pair vocabulary of about 37000 tokens (section 5.1).
    assert (t.type, t.vocab_size, t.joint) == ("bpe", 37000, True)
    # Section 5.2-5.4: batches, Adam, the schedule, label smoothing, training length.
    assert tr.max_tokens * tr.accumulate == PAPER_STEP_TOKENS
    assert (tr.adam_beta1, tr.adam_beta2, tr.adam_eps, tr.weight_decay) == (0.9, 0.98, 1e-9, 0.0)
    assert (tr.warmup_steps, tr.lr_scale, tr.label_smoothing) == (4000, 1.0, 0.1)
    assert tr.max_steps == {"base": 100000, "big": 300000}[size]
    assert (tr.max_minutes, tr.max_epochs, tr.clip_norm, tr.patience) == (0, 0, 0, 0)
    assert tr.precision == "auto"  # bf16 on GPUs that have it (A100, H100), fp32 below
    # Averaging the last 5 (base) or 20 (big) checkpoints.
    averaged = {"base": 5, "big": 20}[size]
    assert tr.average_last == averaged and tr.keep_last >= averaged and tr.save_every == 1000
    # Section 6.1: beam 4, alpha 0.6, maximum output length = input length + 50.
    assert (dec.beam_size, dec.length_penalty, dec.max_len_a, dec.max_len_b) == (4, 0.6, 1.0, 50)


def test_the_wmt14_configs_differ_only_in_model_size_and_length():
    base, big = (config_to_dict(load_config(CONFIGS / f"wmt14_en_de_{s}.yaml")) for s in ("base", "big"))
    changed = {(section, key) for section in base for key in base[section]
               if base[section][key] != big[section][key]}
    assert changed == {("model", "d_model"), ("model", "n_heads"), ("model", "d_ff"), ("model", "dropout"),
                       ("train", "output_dir"), ("train", "max_steps"), ("train", "keep_last"),
                       ("train", "average_last")}


def test_the_multi30k_directions_share_data_tokenizer_and_model_family():
    # Each direction has its own recipe (sizes, regularisation, schedule, decoding, chosen on its own
    # validation split); what must not differ is what makes the two comparable: the same corpus and
    # splits, the same joint vocabulary, the same kind of model.
    de_en, en_de = (load_config(CONFIGS / f"multi30k_{pair}.yaml") for pair in ("de_en", "en_de"))
    assert (de_en.data.src_lang, de_en.data.tgt_lang) == ("de", "en")
    assert (en_de.data.src_lang, en_de.data.tgt_lang) == ("en", "de")
    data = [config_to_dict(c)["data"] for c in (de_en, en_de)]
    for d in data:
        d.pop("src_lang"), d.pop("tgt_lang")
    assert data[0] == data[1]
    assert de_en.tokenizer == en_de.tokenizer and de_en.tokenizer.joint
    family = ("norm_first", "positional", "activation", "share_embeddings", "tie_output")
    assert [getattr(de_en.model, f) for f in family] == [getattr(en_de.model, f) for f in family]
    assert de_en.train.precision == en_de.train.precision == "auto"
    for config in (de_en, en_de):  # a step budget that binds, with a wall-clock cap only as a backstop
        assert config.train.max_steps > 0 and config.train.max_minutes == 30
