"""Typed experiment configuration: nested dataclasses <-> YAML <-> dotted overrides.

A config is five sections (model, data, tokenizer, train, decode), each a dataclass whose defaults
are the paper's base setting. YAML files use the same nested shape and may omit any section or key.
Command-line overrides look like ``train.max_steps=200`` and are parsed with ``yaml.safe_load``, so
``data.local_dir=null`` and ``model.norm_first=true`` work. Every value is type-checked and range-
checked; mistakes raise :class:`ConfigError` naming the key, the file and, for misspelt keys, the
nearest valid one.

This module imports nothing from the rest of the package but its atomic file write: it sits at the
top of the data flow.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from transformer.atomic import atomic_write_bytes


class ConfigError(ValueError):
    """A configuration file, dict or override is malformed or out of range."""


@dataclass
class ModelConfig:
    """Architecture of the encoder-decoder Transformer (paper section 3, base model).

    Every field is a keyword argument of `transformer.model.Transformer` with the same default;
    `Transformer.from_config` passes them all by name, so a new option is a field here and a
    parameter there.
    """

    d_model: int = 512  # width of every sub-layer output and embedding
    n_heads: int = 8  # attention heads; d_k = d_v = d_model / n_heads
    d_ff: int = 2048  # inner width of the position-wise feed-forward network
    n_encoder_layers: int = 6  # N for the encoder stack
    n_decoder_layers: int = 6  # N for the decoder stack
    dropout: float = 0.1  # on sub-layer outputs and embedding sums (P_drop)
    attention_dropout: float = 0.0  # on attention weights
    norm_first: bool = False  # False = post-LN (paper); True = pre-LN
    activation: str = "relu"  # feed-forward non-linearity: "relu" (paper) | "gelu"
    positional: str = "sinusoidal"  # "sinusoidal" | "learned"
    max_len: int = 1024  # positions precomputed / learned
    share_embeddings: bool = False  # source and target embeddings shared, as in the paper (needs tokenizer.joint)
    tie_output: bool = True  # target embedding shared with the pre-softmax projection


@dataclass
class DataConfig:
    """Where the parallel corpus comes from and which pairs are kept."""

    src_lang: str = "de"  # source language code, also the file suffix / column name
    tgt_lang: str = "en"  # target language code
    local_dir: str | None = None  # folder with {split}.{lang}[.gz|.txt]; used when it exists
    hub_name: str | None = None  # Hugging Face dataset, used when local_dir is missing/None
    hub_config: str | None = None  # e.g. "de-en" for wmt14
    hub_field: str | None = None  # dict column holding the languages ("translation"); None = top-level
    train_split: str = "train"  # local training split name (file stem)
    valid_split: str = "val"  # local validation split name
    test_split: str = "test_2016_flickr"  # local test split name
    hub_train_split: str = "train"  # hub training split name
    hub_valid_split: str = "validation"  # hub validation split name
    hub_test_split: str = "test"  # hub test split name
    max_len: int = 128  # pairs with more tokens than this on either side are dropped (counted)
    prepared_dir: str | None = None  # memory-mapped training data written by transformer-prepare; None = encode in memory
    clean_max_words: int = 0  # drop training pairs with more words than this on a side before encoding; 0 = off
    clean_ratio: float = 0.0  # drop training pairs whose word counts differ by more than this factor; 0 = off
    dedup: bool = False  # drop training pairs that repeat an earlier pair exactly
    prepare_workers: int = 0  # processes encoding the corpus in transformer-prepare; 0 = one per CPU, at most 4


@dataclass
class TokenizerConfig:
    """SentencePiece subword model settings."""

    type: str = "bpe"  # "bpe" | "unigram" (SentencePiece model_type)
    vocab_size: int = 8000  # pieces per model, including the four special ids
    joint: bool = True  # one vocabulary for both languages
    character_coverage: float = 1.0  # fraction of characters covered by the vocabulary
    cache_dir: str = ".cache/tokenizers"  # trained models are cached here, keyed by data + settings
    sample_size: int = 1000000  # training pairs (both sides) drawn with a fixed seed to train on; 0 = all


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpointing (paper section 5)."""

    output_dir: str = "runs/default"  # run directory: checkpoints, logs, resolved config
    seed: int = 1  # seeds torch, batching shuffles and dropout
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    max_tokens: int = 25000  # per batch, per side (padded tokens of the longer of source/target)
    accumulate: int = 1  # batches per optimizer step
    max_steps: int = 100000  # optimizer steps to train for; 0 = no limit
    max_epochs: int = 0  # passes over the training data; 0 = no limit
    max_minutes: float = 0.0  # minutes of training, validation excluded; 0 = no limit (the first limit reached stops)
    lr_scale: float = 1.0  # the paper's schedule times this
    warmup_steps: int = 4000  # linear warm-up steps of the paper's schedule
    lr_decay: str = "inverse_sqrt"  # after warm-up: "inverse_sqrt" (paper) | "none" (hold the peak; with cooldown, warm-up/stable/decay)
    cooldown: float = 0.0  # final fraction of the step/epoch/minute budget over which lr decays linearly to 0
    adam_beta1: float = 0.9  # Adam beta_1
    adam_beta2: float = 0.98  # Adam beta_2
    adam_eps: float = 1e-9  # Adam epsilon
    weight_decay: float = 0.0  # decoupled weight decay (AdamW); the paper uses none
    label_smoothing: float = 0.1  # epsilon_ls of label smoothing
    clip_norm: float = 0.0  # clip the gradient's global norm to this; 0 = no clipping
    precision: str = "fp32"  # "fp32" | "bf16" | "fp16" (fp16 only on CUDA) | "auto" (bf16 where it measures clearly faster, else fp32)
    short_budget: str = "off"  # "auto": time the first steps and train with the short_budget_* settings where fewer than short_budget_below steps would fit in max_minutes (off without max_minutes) | "on" | "off"
    short_budget_below: int = 2000  # with short_budget auto: the projected steps under which the short budget is used
    short_budget_max_steps: int = 1600  # the short budget's train.max_steps
    short_budget_lr_scale: float = 0.7  # its train.lr_scale
    short_budget_lr_decay: str = "inverse_sqrt"  # its train.lr_decay
    short_budget_dropout: float = 0.1  # its model.dropout
    tf32: bool = True  # CUDA only: float32 matmuls and convolutions on TensorFloat-32 tensor cores (Ampere and newer)
    log_every: int = 50  # steps between training log lines
    eval_every: int = 1000  # steps between validations
    eval_bleu_sentences: int = 500  # validation sentences decoded for BLEU (0 = skip BLEU)
    save_every: int = 1000  # steps between checkpoints
    keep_last: int = 5  # step checkpoints kept on disk
    patience: int = 0  # validations without BLEU improvement before stopping; 0 = off
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops
    average_last: int = 1  # checkpoints averaged for the final evaluation (paper: 5 base, 20 big)


@dataclass
class DecodeConfig:
    """Decoding settings (paper section 6.1): the one object that carries them from a checkpoint's
    config, with the decoding commands' options laid over it (`transformer.commands.options.decode_settings`),
    to the engine that searches (`transformer.decoding.engine`)."""

    beam_size: int = 4  # hypotheses kept per sentence; 1 = greedy
    n_best: int = 1  # candidates an engine returns per sentence, best first (at most beam_size); the commands write the best
    length_penalty: float = 0.6  # alpha of the length penalty lp(Y) that divides a hypothesis's log-probability
    length_penalty_form: str = "gnmt"  # lp(Y): "gnmt" ((5+|Y|)/6)^alpha, the torch engine's | "length" |Y|^alpha, CTranslate2's
    max_len_a: float = 1.0  # max output length = a * source length + b
    max_len_b: int = 50  # additive term of the maximum output length
    batch_tokens: int = 8000  # source tokens per decoding batch
    use_cache: bool = True  # decode incrementally with the key/value cache; false recomputes every prefix (same outputs, slower)
    precision: str = "fp32"  # "fp32" | "bf16" (weights and activations; log-probs stay fp32) | "int8" (CPU) | "auto"
    engine: str = "torch"  # "torch" (this package's search) | "ctranslate2" (a transformer-export --format ctranslate2 folder); the decoding commands set it from --engine
    rerank_with: list[str] | None = None  # reverse-direction checkpoints (several are averaged) that rerank the beam's candidates by the noisy-channel score; null = no reranking
    rerank_weight: float = 0.5  # weight of the reverse model's log-probability per source token in that score

    def errors(self) -> list[str]:
        """What is out of range or inconsistent, one message per problem; empty when valid."""
        checks = [
            (self.engine in ("torch", "ctranslate2"), "decode.engine must be 'torch' or 'ctranslate2'"),
            (self.beam_size >= 1, "decode.beam_size must be >= 1"),
            (1 <= self.n_best <= max(self.beam_size, 1),
             f"decode.n_best must be >= 1 and at most decode.beam_size ({self.beam_size})"),
            (self.length_penalty >= 0, "decode.length_penalty must be >= 0"),
            (self.length_penalty_form in ("gnmt", "length"), "decode.length_penalty_form must be 'gnmt' or 'length'"),
            # Each engine searches with one form, so an alpha meant for the other would be misread.
            ((self.engine == "ctranslate2") == (self.length_penalty_form == "length"),
             "decode.length_penalty_form must be 'gnmt' with decode.engine torch and 'length' with ctranslate2"),
            (self.max_len_a >= 0, "decode.max_len_a must be >= 0"),
            (self.max_len_b >= 0, "decode.max_len_b must be >= 0"),
            (self.max_len_a > 0 or self.max_len_b > 0, "decode.max_len_a and decode.max_len_b cannot both be 0"),
            (self.batch_tokens > 0, "decode.batch_tokens must be > 0"),
            (self.precision in ("fp32", "bf16", "int8", "auto"),
             "decode.precision must be 'fp32', 'bf16', 'int8' or 'auto'"),
            (self.rerank_with is None or (len(self.rerank_with) > 0 and all(self.rerank_with)),
             "decode.rerank_with must be null or a non-empty list of checkpoint paths"),
            (self.rerank_weight >= 0, "decode.rerank_weight must be >= 0"),
        ]
        return [message for ok, message in checks if not ok]


@dataclass
class Config:
    """The whole experiment: one section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


# Section name -> dataclass; resolved through get_type_hints because annotations are strings here.
_SECTIONS: dict[str, type] = typing.get_type_hints(Config)

# Upper bounds on every size that input sets: a config file or override, the config stored in a
# checkpoint or an export, and the command-line options that size memory ("generate.*" and
# "attention.*" are options of transformer-generate and transformer-attention). They are checked
# before anything is allocated, so that a typo or a hostile file ends in a one-line error instead of
# exhausting memory. Each is far above what the paper's big model and the recipes here use; a run
# that needs more raises a limit in the environment, e.g.
# TRANSFORMER_SIZE_LIMITS="model.d_model=32768,decode.beam_size=4096".
SIZE_LIMITS: dict[str, int | float] = {
    "model.d_model": 16384,
    "model.n_heads": 1024,
    "model.d_ff": 65536,
    "model.n_encoder_layers": 256,
    "model.n_decoder_layers": 256,
    "model.max_len": 65536,
    "data.max_len": 65536,
    "data.prepare_workers": 256,
    "tokenizer.vocab_size": 1048576,
    "train.threads": 1024,
    "train.max_tokens": 16777216,
    "train.accumulate": 4096,  # the batches of one step are all held at once
    "decode.beam_size": 1024,
    "decode.max_len_a": 100.0,
    "decode.max_len_b": 65536,
    "decode.batch_tokens": 16777216,
    "generate.num": 1024,  # transformer-generate --num: continuations of a prompt, decoded as one batch
    "generate.max_new_tokens": 65536,  # transformer-generate --max-new-tokens
    "attention.max_tokens": 1024,  # transformer-attention --max-tokens: pieces drawn per side
}
SIZE_LIMITS_ENV = "TRANSFORMER_SIZE_LIMITS"


def size_limit(key: str) -> int | float:
    """The upper bound on `key`: the one TRANSFORMER_SIZE_LIMITS sets, else `SIZE_LIMITS[key]`.

    Raises:
        ConfigError: TRANSFORMER_SIZE_LIMITS is not a comma-separated list of `key=number` with
            keys of `SIZE_LIMITS` and positive numbers.
    """
    raised: dict[str, int | float] = {}
    for item in filter(None, (part.strip() for part in os.environ.get(SIZE_LIMITS_ENV, "").split(","))):
        name, sep, text = (part.strip() for part in item.partition("="))
        if not sep or name not in SIZE_LIMITS:
            raise ConfigError(f"{SIZE_LIMITS_ENV}: {item!r} is not KEY=NUMBER with KEY one of {', '.join(SIZE_LIMITS)}")
        kind = type(SIZE_LIMITS[name])
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise ConfigError(f"{SIZE_LIMITS_ENV}: {item!r}: the limit must be a positive "
                              f"{'integer' if kind is int else 'number'}")
        raised[name] = value
    return raised.get(key, SIZE_LIMITS[key])


def size_error(key: str, value: int | float, given_as: str | None = None) -> str | None:
    """Why `value` of the size `key` is refused (above its limit), or None when it is within it.

    Args:
        key: a key of `SIZE_LIMITS`.
        value: the size asked for.
        given_as: how the value was given, when not as `key` (e.g. "--beam", or "" for an argparse
            message, which names the option itself).

    Raises:
        ConfigError: TRANSFORMER_SIZE_LIMITS is malformed (see `size_limit`).
    """
    limit = size_limit(key)
    if value <= limit:
        return None
    subject = f"{key}={value}" if given_as is None else f"{given_as} {value}".strip()
    where = "" if given_as is None else f" on {key}"
    return (f"{subject} is above the limit of {limit}{where}, which keeps it from exhausting memory; "
            f"to allow it, set {SIZE_LIMITS_ENV}={key}={value}")


def bounded_int(key: str) -> Callable[[str], int]:
    """An argparse `type`: an integer no larger than the limit on `key` (the command checks its lower end)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        try:
            message = size_error(key, value, given_as="")
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if message is not None:
            raise argparse.ArgumentTypeError(message)
        return value

    parse.size_key = key  # type: ignore[attr-defined]  # which limit, for the tests that enumerate them
    return parse


def _unknown(name: str, valid: Sequence[str], source: str, kind: str, section: str = "") -> ConfigError:
    """Build the error for an unknown key or section, suggesting the closest valid one.

    Names are compared without their section prefix, which would otherwise make every key of the
    right section look similar. A key in the wrong section (``model.beam_size``) is matched against
    the other sections' keys too.

    Args:
        name: the offending key (without section) or section name.
        valid: valid names in the same place (keys of ``section``, or section names).
        source: file or override the name came from.
        kind: "key" or "section", for the message.
        section: the section of an unknown key; empty for an unknown section.

    Returns:
        The error to raise.
    """
    prefix = f"{section}." if section else ""
    message = f"{source}: unknown {kind} '{prefix}{name}'"
    close = [prefix + c for c in difflib.get_close_matches(name, valid, n=1, cutoff=0.6)]
    if not close and section:
        elsewhere = {f.name: f"{s}.{f.name}" for s, cls in _SECTIONS.items() if s != section
                     for f in dataclasses.fields(cls)}
        close = [elsewhere[c] for c in difflib.get_close_matches(name, elsewhere, n=1, cutoff=0.8)]
    if close:
        return ConfigError(f"{message}; did you mean '{close[0]}'?")
    return ConfigError(f"{message}; valid: {', '.join(prefix + v for v in valid)}")


def _type_name(tp: Any) -> str:
    """Human-readable name for a field annotation such as ``str | None``."""
    args = typing.get_args(tp)
    if args:
        return " | ".join("None" if a is type(None) else a.__name__ for a in args)
    return tp.__name__


def _check_type(key: str, value: Any, tp: Any, source: str) -> Any:
    """Return ``value`` converted to ``tp`` if it is an acceptable value, else raise.

    Accepts int for float (converted); rejects bool for int/float; None only for Optional fields.
    """
    args = typing.get_args(tp)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    if value is None:
        if optional:
            return None
    elif base is bool:
        if isinstance(value, bool):
            return value
    elif base is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float's range
                number = math.inf
            if math.isfinite(number):
                return number
            raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r:.40}")
    elif base is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        if isinstance(value, list) and all(isinstance(v, item) for v in value):
            return list(value)
    raise ConfigError(f"{source}: '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def finite_float(text: str) -> float:
    """An argparse `type`: a finite number (argparse's `float` takes "nan" and "inf")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def _set(cfg: Config, key: str, value: Any, source: str, raw: str | None = None) -> None:
    """Type-check ``value`` and assign it to the dotted ``key`` of ``cfg``.

    ``raw`` is an override's unparsed text: a string field takes it verbatim when YAML read it as a
    bool or number, so ``data.src_lang=no`` (Norwegian) or ``data.test_split=2017`` mean what they say.
    """
    section, _, name = key.partition(".")
    if section not in _SECTIONS:
        raise _unknown(section, list(_SECTIONS), source, "section")
    if not name:
        raise ConfigError(f"{source}: '{key}' names a section; expected 'section.key'")
    hints = typing.get_type_hints(_SECTIONS[section])
    if name not in hints:
        raise _unknown(name, list(hints), source, "key", section)
    tp = hints[name]
    takes_str = str in (tp, *typing.get_args(tp))
    if raw is not None and takes_str and value is not None and not isinstance(value, str):
        value = raw.strip()
    setattr(getattr(cfg, section), name, _check_type(key, value, tp, source))


def _validate(cfg: Config, source: str) -> None:
    """Range and consistency checks that types alone cannot express."""
    for key in SIZE_LIMITS:  # first: a size above its limit is the reason, whatever else is off
        section, _, name = key.partition(".")
        if section in _SECTIONS and (message := size_error(key, getattr(getattr(cfg, section), name))):
            raise ConfigError(f"{source}: {message}")
    m, d, t, tr, dec = cfg.model, cfg.data, cfg.tokenizer, cfg.train, cfg.decode
    checks: list[tuple[bool, str]] = [
        (m.d_model > 0, "model.d_model must be > 0"),
        (m.n_heads > 0, "model.n_heads must be > 0"),
        (m.n_heads <= 0 or m.d_model % m.n_heads == 0,
         f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})"),
        (m.d_ff > 0, "model.d_ff must be > 0"),
        (m.n_encoder_layers > 0, "model.n_encoder_layers must be > 0"),
        (m.n_decoder_layers > 0, "model.n_decoder_layers must be > 0"),
        (0.0 <= m.dropout < 1.0, "model.dropout must be in [0, 1)"),
        (0.0 <= m.attention_dropout < 1.0, "model.attention_dropout must be in [0, 1)"),
        (m.activation in ("relu", "gelu"), "model.activation must be 'relu' or 'gelu'"),
        (m.positional in ("sinusoidal", "learned"), "model.positional must be 'sinusoidal' or 'learned'"),
        (m.positional != "sinusoidal" or m.d_model % 2 == 0,
         f"model.d_model ({m.d_model}) must be even for model.positional='sinusoidal' (sin/cos pairs)"),
        (m.max_len >= 2, "model.max_len must be >= 2 (a token and EOS)"),
        (m.positional != "learned" or d.max_len < m.max_len,
         f"model.max_len ({m.max_len}) must be > data.max_len ({d.max_len}) with learned positions: a training "
         "sentence of data.max_len tokens plus EOS or BOS needs that many positions"),
        (not m.share_embeddings or t.joint,
         "model.share_embeddings=true requires tokenizer.joint=true (one shared vocabulary)"),
        (bool(d.src_lang) and bool(d.tgt_lang), "data.src_lang and data.tgt_lang must be non-empty"),
        (d.src_lang != d.tgt_lang, "data.src_lang and data.tgt_lang must differ"),
        (d.max_len > 0, "data.max_len must be > 0"),
        (d.prepared_dir != "", "data.prepared_dir must be a folder path or null"),
        (d.clean_max_words >= 0, "data.clean_max_words must be >= 0"),
        (d.clean_ratio == 0 or d.clean_ratio >= 1, "data.clean_ratio must be 0 (off) or >= 1"),
        (d.prepare_workers >= 0, "data.prepare_workers must be >= 0"),
        (t.type in ("bpe", "unigram"), "tokenizer.type must be 'bpe' or 'unigram'"),
        (t.vocab_size >= 100, "tokenizer.vocab_size must be >= 100"),
        (0.0 < t.character_coverage <= 1.0, "tokenizer.character_coverage must be in (0, 1]"),
        (t.sample_size >= 0, "tokenizer.sample_size must be >= 0"),
        (tr.device == "auto" or tr.device == "cpu" or tr.device == "cuda"
         or (tr.device.startswith("cuda:") and tr.device[5:].isdigit()),
         "train.device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (tr.threads >= 0, "train.threads must be >= 0"),
        (tr.max_tokens > 0, "train.max_tokens must be > 0"),
        (tr.accumulate >= 1, "train.accumulate must be >= 1"),
        (tr.max_steps >= 0, "train.max_steps must be >= 0"),
        (tr.max_epochs >= 0, "train.max_epochs must be >= 0"),
        (tr.max_minutes >= 0, "train.max_minutes must be >= 0"),
        (tr.lr_scale > 0, "train.lr_scale must be > 0"),
        (tr.warmup_steps > 0, "train.warmup_steps must be > 0"),
        (tr.lr_decay in ("inverse_sqrt", "none"), "train.lr_decay must be 'inverse_sqrt' or 'none'"),
        (tr.short_budget in ("auto", "on", "off"), "train.short_budget must be 'auto', 'on' or 'off'"),
        (tr.short_budget_below >= 0, "train.short_budget_below must be >= 0"),
        (tr.short_budget_max_steps > 0, "train.short_budget_max_steps must be > 0"),
        (tr.short_budget_lr_scale > 0, "train.short_budget_lr_scale must be > 0"),
        (tr.short_budget_lr_decay in ("inverse_sqrt", "none"), "train.short_budget_lr_decay must be 'inverse_sqrt' or 'none'"),
        (0.0 <= tr.short_budget_dropout < 1.0, "train.short_budget_dropout must be in [0, 1)"),
        (0.0 <= tr.cooldown <= 1.0, "train.cooldown must be in [0, 1]"),
        (tr.cooldown == 0 or tr.max_steps or tr.max_epochs or tr.max_minutes,
         "train.cooldown needs a budget to cool down towards: set train.max_steps, max_epochs or max_minutes"),
        (0.0 <= tr.adam_beta1 < 1.0, "train.adam_beta1 must be in [0, 1)"),
        (0.0 <= tr.adam_beta2 < 1.0, "train.adam_beta2 must be in [0, 1)"),
        (tr.adam_eps > 0, "train.adam_eps must be > 0"),
        (tr.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (0.0 <= tr.label_smoothing < 1.0, "train.label_smoothing must be in [0, 1)"),
        (tr.clip_norm >= 0, "train.clip_norm must be >= 0"),
        (tr.precision in ("fp32", "bf16", "fp16", "auto"), "train.precision must be 'fp32', 'bf16', 'fp16' or 'auto'"),
        (tr.log_every > 0, "train.log_every must be > 0"),
        (tr.eval_every > 0, "train.eval_every must be > 0"),
        (tr.eval_bleu_sentences >= 0, "train.eval_bleu_sentences must be >= 0"),
        (tr.save_every > 0, "train.save_every must be > 0"),
        (tr.keep_last >= 1, "train.keep_last must be >= 1"),
        (tr.patience >= 0, "train.patience must be >= 0"),
        (tr.max_nonfinite >= 1, "train.max_nonfinite must be >= 1"),
        (tr.average_last >= 1, "train.average_last must be >= 1"),
        *((False, message) for message in dec.errors()),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{source}: {message}")


def _apply_dict(cfg: Config, d: Any, source: str) -> None:
    """Assign every key of a nested ``{section: {key: value}}`` mapping onto ``cfg``."""
    if d is None:
        return
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections, got {type(d).__name__}")
    for section, values in d.items():
        if section not in _SECTIONS:
            raise _unknown(str(section), list(_SECTIONS), source, "section")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {values!r}")
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value, source)


def _apply_overrides(cfg: Config, overrides: Sequence[str]) -> None:
    """Apply ``section.key=value`` strings; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected 'section.key=value'")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:  # its text goes on to quote the value over several lines
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"override '{item}': cannot parse value: {problem}") from None
        _set(cfg, key, value, f"override '{item}'", raw=raw)


def _yaml_error(source: str, error: yaml.YAMLError) -> str:
    """One line for a YAML syntax error: file, line and column (1-based), then what is wrong."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    context = getattr(error, "context", None)
    return f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")


def config_from_dict(d: dict, source: str = "<dict>") -> Config:
    """Build and validate a :class:`Config` from a nested dict; omitted keys keep their defaults.

    Args:
        d: mapping ``{section: {key: value}}``, e.g. the result of :func:`config_to_dict`.
        source: where ``d`` came from, used in error messages.

    Returns:
        The validated config.

    Raises:
        ConfigError: on unknown keys, wrong types or out-of-range values.
    """
    cfg = Config()
    _apply_dict(cfg, d, source)
    _validate(cfg, source)
    return cfg


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from defaults), apply dotted overrides, and validate.

    Args:
        path: YAML file of the same nested shape as :class:`Config`, or None for the defaults.
        overrides: strings like ``"train.max_steps=200"``; values are parsed with ``yaml.safe_load``.

    Returns:
        The validated config.

    Raises:
        ConfigError: on a missing or unparsable file, unknown keys, wrong types, malformed overrides
            or out-of-range values.
    """
    cfg = Config()
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{source}: cannot read config file: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            data = Path(path).read_bytes()
            line = data.count(b"\n", 0, e.start) + 1
            raise ConfigError(f"{source}:{line}: not UTF-8 text (byte {data[e.start:e.start + 1]!r}); "
                              "save the config file as UTF-8") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_error(source, e)) from None
        _apply_dict(cfg, raw, source)
    _apply_overrides(cfg, overrides)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    _validate(cfg, source)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Return ``cfg`` as a plain nested dict (YAML- and checkpoint-friendly).

    Args:
        cfg: the config to convert.

    Returns:
        ``{section: {key: value}}`` with only built-in types.
    """
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically, creating parent folders; :func:`load_config` reads it back equal.

    Args:
        cfg: the config to save.
        path: destination file.
    """
    atomic_write_bytes(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode("utf-8"))
