"""Config: defaults, YAML round trip, dotted overrides and strict validation messages."""

from pathlib import Path

import pytest
import yaml

from transformer.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


def test_defaults_are_the_paper_base_model():
    cfg = load_config(None)
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.d_ff) == (512, 8, 2048)
    assert (cfg.model.n_encoder_layers, cfg.model.n_decoder_layers) == (6, 6)
    assert cfg.model.dropout == 0.1 and cfg.train.label_smoothing == 0.1
    assert (cfg.train.adam_beta1, cfg.train.adam_beta2, cfg.train.adam_eps) == (0.9, 0.98, 1e-9)
    assert cfg.train.warmup_steps == 4000
    assert (cfg.decode.beam_size, cfg.decode.length_penalty) == (4, 0.6)
    assert cfg == Config()


def test_yaml_may_omit_sections_and_keys(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 256\n  n_heads: 4\ntrain:\n")
    cfg = load_config(path)
    assert cfg.model.d_model == 256 and cfg.model.n_heads == 4
    assert cfg.model.d_ff == 2048 and cfg.train == Config().train


def test_save_load_round_trip(tmp_path: Path):
    cfg = load_config(None, ["model.d_model=256", "model.norm_first=true", "data.local_dir=/x/y",
                             "train.max_minutes=2", "tokenizer.type=unigram", "decode.beam_size=1"])
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert yaml.safe_load(path.read_text())["model"]["d_model"] == 256


def test_overrides_are_parsed_and_typed(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  local_dir: some/dir\n")
    cfg = load_config(path, ["train.max_steps=200", "data.local_dir=null", "train.lr_scale=2",
                             "model.share_embeddings=false", "tokenizer.joint=false",
                             "train.device=cuda:1", "data.hub_config=de-en"])
    assert cfg.train.max_steps == 200
    assert cfg.data.local_dir is None
    assert cfg.train.lr_scale == 2.0 and isinstance(cfg.train.lr_scale, float)
    assert cfg.model.share_embeddings is False and cfg.tokenizer.joint is False
    assert cfg.train.device == "cuda:1" and cfg.data.hub_config == "de-en"


def test_string_fields_take_override_text_verbatim():
    cfg = load_config(None, ["data.src_lang=no", "data.test_split=2017", "data.hub_config=null"])
    assert cfg.data.src_lang == "no" and cfg.data.test_split == "2017" and cfg.data.hub_config is None


def test_later_override_wins():
    assert load_config(None, ["train.seed=2", "train.seed=3"]).train.seed == 3


def test_unknown_key_in_file_suggests_nearest(tmp_path: Path):
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  d_modle: 256\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: unknown key 'model.d_modle'; did you mean 'model.d_model'?"


def test_unknown_key_in_wrong_section_suggests_other_section():
    with pytest.raises(ConfigError, match=r"unknown key 'model.beam_size'; did you mean 'decode.beam_size'"):
        load_config(None, ["model.beam_size=2"])


def test_unknown_section_suggests_nearest(tmp_path: Path):
    path = tmp_path / "x.yaml"
    path.write_text("trian:\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"x.yaml: unknown section 'trian'; did you mean 'train'"):
        load_config(path)


def test_unknown_key_without_close_match_lists_section_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'decode.zzz'; valid: decode.beam_size, "):
        load_config(None, ["decode.zzz=1"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.d_model=true", r"'model.d_model' expects int, got True"),  # bool is not int
        ("model.d_model=512.0", r"'model.d_model' expects int, got 512.0"),
        ("model.dropout=high", r"'model.dropout' expects float, got 'high'"),
        ("model.norm_first=1", r"'model.norm_first' expects bool, got 1"),
        ("model.positional=null", r"'model.positional' expects str, got None"),
        ("train.max_steps=[1, 2]", r"'train.max_steps' expects int, got \[1, 2\]"),
    ],
)
def test_type_errors_name_key_type_and_value(override: str, expected: str):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_type_error_in_file_names_file(tmp_path: Path):
    path = tmp_path / "t.yaml"
    path.write_text("train:\n  max_steps: many\n")
    with pytest.raises(ConfigError, match=r"t.yaml: 'train.max_steps' expects int, got 'many'"):
        load_config(path)


def test_int_accepted_for_float():
    cfg = config_from_dict({"model": {"dropout": 0}})
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)


def test_malformed_override_is_named():
    with pytest.raises(ConfigError, match=r"override 'train.max_steps': expected 'section.key=value'"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match=r"'model' names a section"):
        load_config(None, ["model=3"])


def test_missing_file_and_bad_yaml_name_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: 1\n   n_heads: 2\n")
    with pytest.raises(ConfigError) as error:
        load_config(bad)
    # One line that starts with the file, the line and the column of the fault.
    assert str(error.value).startswith(f"{bad}:3:11: invalid YAML: ") and "\n" not in str(error.value)
    unclosed = tmp_path / "unclosed.yaml"
    unclosed.write_text("model: [d_model: 1\n")
    with pytest.raises(ConfigError, match=r"unclosed.yaml:2:1: invalid YAML: expected ',' or ']'"):
        load_config(unclosed)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("model:\n  d_model: 32\n# Größe\n".encode("latin-1"))
    with pytest.raises(ConfigError) as error:
        load_config(latin1)
    assert str(error.value) == f"{latin1}:3: not UTF-8 text (byte b'\\xf6'); save the config file as UTF-8"
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match=r"scalar.yaml: top level must be a mapping"):
        load_config(scalar)


def test_empty_file_gives_defaults(tmp_path: Path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.d_model=100", r"model.d_model \(100\) must be divisible by model.n_heads \(8\)"),
        ("model.n_heads=0", r"model.n_heads must be > 0"),
        ("model.n_encoder_layers=0", r"model.n_encoder_layers must be > 0"),
        ("model.dropout=1.0", r"model.dropout must be in \[0, 1\)"),
        ("model.positional=rotary", r"model.positional must be 'sinusoidal' or 'learned'"),
        ("model.activation=swish", r"model.activation must be 'relu' or 'gelu'"),
        ("tokenizer.type=wordpiece", r"tokenizer.type must be 'bpe' or 'unigram'"),
        ("tokenizer.vocab_size=50", r"tokenizer.vocab_size must be >= 100"),
        ("train.label_smoothing=1", r"train.label_smoothing must be in \[0, 1\)"),
        ("train.precision=fp8", r"train.precision must be"),
        ("decode.precision=fp16", r"decode.precision must be 'fp32', 'bf16', 'int8' or 'auto'"),
        ("train.device=gpu", r"train.device must be"),
        ("train.max_tokens=0", r"train.max_tokens must be > 0"),
        ("decode.beam_size=0", r"decode.beam_size must be >= 1"),
        ("data.tgt_lang=de", r"must differ"),
    ],
)
def test_range_checks(override: str, expected: str):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])


def test_shared_embeddings_need_a_joint_vocabulary():
    with pytest.raises(ConfigError, match=r"share_embeddings=true requires tokenizer.joint=true"):
        load_config(None, ["model.share_embeddings=true", "tokenizer.joint=false"])


def test_range_error_in_file_names_file(tmp_path: Path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  d_model: 100\n")
    with pytest.raises(ConfigError, match=r"r.yaml: model.d_model \(100\) must be divisible"):
        load_config(path)


def test_override_can_fix_an_invalid_file(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  d_model: 100\n")
    assert load_config(path, ["model.n_heads=4"]).model.d_model == 100


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_file_values_are_not_coerced(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  local_dir: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: 'data.local_dir' expects str \| None, got 3 \(int\)"):
        load_config(path)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.d_model=33", "model.n_heads=3"], r"model.d_model \(33\) must be even for model.positional='sinusoidal'"),
        (["model.positional=learned", "model.max_len=100", "data.max_len=100"],
         r"model.max_len \(100\) must be > data.max_len \(100\) with learned positions"),
        (["model.max_len=1"], r"model.max_len must be >= 2"),
    ],
)
def test_what_the_model_would_refuse_is_refused_at_config_time(overrides: list[str], expected: str):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.d_model=34", "model.n_heads=2"],
        ["model.positional=learned", "model.max_len=101", "data.max_len=100"],
        ["model.d_model=33", "model.n_heads=3", "model.positional=learned", "model.max_len=20", "data.max_len=19"],
    ],
)
def test_a_config_that_validates_builds_a_model_that_takes_its_longest_sentences(overrides: list[str]):
    import torch

    from transformer.model import Transformer

    cfg = load_config(None, ["model.d_ff=8", "model.n_encoder_layers=1", "model.n_decoder_layers=1", *overrides])
    model = Transformer.from_config(cfg.model, 16, 16, 0).eval()
    longest = torch.full((1, cfg.data.max_len + 1), 5)  # data.max_len tokens plus EOS (source) or BOS (target)
    assert model(longest, longest).shape == (1, cfg.data.max_len + 1, 16)
