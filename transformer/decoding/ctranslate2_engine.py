"""CTranslate2 as a second decoding engine: conversion of an exported Marian folder, and translation.

The conversion is CTranslate2's own Transformers converter, with one setting changed: its Marian
loader assumes Marian's convention of starting the decoder from a zero vector (Marian models start
from the padding token, whose embedding is zero), while ours starts from the BOS embedding. The
converted model therefore starts from the token `MarianConfig.decoder_start_token_id` names, as
Hugging Face's `MarianMTModel` does.

`CTranslate2Model` is a `transformer.decoding.engine.Engine`: it takes our token ids and returns them, so
the decoding commands run it exactly as they run our model (same tokenization, batching and BLEU).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

import ctranslate2
import torch

from transformer.checkpoint import CheckpointError
from transformer.config import Config, ConfigError, DecodeConfig, load_config
from transformer.data.batches import make_batches
from transformer.data.tokenizer import BOS_ID, PAD_ID, Tokenizer
from transformer.decoding.engine import Engine
from transformer.decoding.search import Hypothesis

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "source.spm"  # the SentencePiece model, copied from the Hugging Face folder
TRAINING_CONFIG = "training_config.yaml"
GENERATION_CONFIG = "generation_config.json"
# Our precision names -> CTranslate2 compute types.
COMPUTE_TYPES = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8", "auto": "default"}


def _marian_converter() -> type:
    """CTranslate2's Transformers converter, adapted to where our vocabulary puts padding and how our
    decoder starts. Built here because it needs `transformers`, which decoding does not."""
    import transformers
    from ctranslate2.converters import TransformersConverter

    class MarianConverter(TransformersConverter):
        def load_model(self, model_class, model_name_or_path, **kwargs):  # noqa: ANN001, ANN201 (CTranslate2's signature)
            # CTranslate2's Marian loader drops the last row of the embeddings, which in Marian models
            # from the Hub is the padding token appended after the vocabulary. Our padding is id 0, so
            # the loaded model gets one extra row for the loader to drop (CTranslate2 checks that the
            # embeddings then match the vocabulary, so a loader that stopped dropping it would fail loudly).
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            verbosity = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()  # not a new token to initialise: the row is dropped
            try:
                model.resize_token_embeddings(model.config.vocab_size + 1, mean_resizing=False)
            finally:
                transformers.logging.set_verbosity(verbosity)
            return model

        def _load(self):  # noqa: ANN202 (CTranslate2's signature)
            spec = super()._load()
            folder = Path(self._model_name_or_path)
            start_id = json.loads((folder / "config.json").read_text(encoding="utf-8"))["decoder_start_token_id"]
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            spec.decoder.start_from_zero_embedding = False
            spec.config.decoder_start_token = next(piece for piece, i in vocab.items() if i == start_id)
            return spec

    return MarianConverter


def convert_marian(hf_dir: Path, output: Path, quantization: str = "float32") -> None:
    """Convert a Hugging Face Marian folder written by `transformer.commands.export` to a CTranslate2 model.

    Args:
        hf_dir: the exported Hugging Face folder.
        output: folder to create (must not exist).
        quantization: CTranslate2 weight type (float32, int8, int8_float32, bfloat16).
    """
    files = [TOKENIZER_FILE, TRAINING_CONFIG, GENERATION_CONFIG]  # the model card is written for the format
    _marian_converter()(str(hf_dir), copy_files=files).convert(str(output), quantization=quantization)


class CTranslate2Model(Engine):
    """A converted model as an engine: ids in, n-best lists out, with CTranslate2's beam search.

    Args:
        folder: a folder written by `transformer-export --format ctranslate2`.
        compute_type: CTranslate2 compute type ("default": as converted).
        threads: intra-op threads on the CPU (default: torch's).
        max_src_len: longest source in tokens, EOS included, for `translate` (see `Engine`).
        device: where CTranslate2 runs: the CPU, or a CUDA GPU (its index; "cuda" is GPU 0).
    """

    def __init__(
        self, folder: str | Path, compute_type: str = "default", threads: int | None = None,
        max_src_len: int | None = None, device: str | torch.device = "cpu",
    ) -> None:
        self.folder = Path(folder)
        device = torch.device(device)
        self.translator = ctranslate2.Translator(
            str(self.folder), device=device.type, device_index=device.index or 0, compute_type=compute_type,
            inter_threads=1, intra_threads=threads or torch.get_num_threads(),
        )
        self.tokenizer = Tokenizer.load(self.folder / TOKENIZER_FILE)
        super().__init__(self.tokenizer, self.tokenizer, max_src_len)
        self.pieces = [self.tokenizer.id_to_piece(i) for i in range(self.tokenizer.vocab_size)]
        self.ids = {piece: i for i, piece in enumerate(self.pieces)}
        self.banned = [[self.pieces[PAD_ID]], [self.pieces[BOS_ID]]]  # never generated, as in our search

    def search(self, sources: Sequence[Sequence[int]], settings: DecodeConfig) -> list[list[Hypothesis]]:
        """See `Engine.search`; scores are CTranslate2's, log p / |Y|^alpha (`length_penalty_form` "length").

        Batches are cut as ours are. CTranslate2 takes one length limit per call: it gets the batch's
        largest, floor(a * S + b) tokens before EOS (at most the export's positions minus one), and
        each output is cut to its own sentence's limit (its score stays that of the uncut output). CTranslate2 always decodes with its cache,
        so `settings.use_cache` changes nothing here.
        """
        if settings.length_penalty_form != "length":
            raise ValueError(f"CTranslate2 takes the length penalty form 'length' (log p / |Y|^alpha), not "
                             f"{settings.length_penalty_form!r}")
        found: list[list[Hypothesis]] = [[Hypothesis([], None)] for _ in sources]
        nonempty = [i for i, ids in enumerate(sources) if ids]
        lengths = [len(sources[i]) for i in nonempty]
        for batch in make_batches(lengths, lengths, settings.batch_tokens):
            rows = [[self.pieces[t] for t in sources[nonempty[j]]] for j in batch]
            limits = [math.floor(settings.max_len_a * len(row) + settings.max_len_b) for row in rows]
            if self.max_src_len is not None:
                # The export's position table ends there, and CTranslate2 fails past it (BOS takes
                # position 0, so at most max_len - 1 tokens follow).
                limits = [min(limit, self.max_src_len - 1) for limit in limits]
            results = self.translator.translate_batch(
                rows, beam_size=settings.beam_size, length_penalty=settings.length_penalty,
                num_hypotheses=settings.n_best, return_scores=True, max_decoding_length=max(limits) + 1,
                suppress_sequences=self.banned, max_input_length=0, min_decoding_length=0,
            )
            for j, limit, result in zip(batch, limits, results):
                # Cut at the sentence's own limit, where our search forces EOS.
                found[nonempty[j]] = [Hypothesis([self.ids[piece] for piece in pieces[:limit]], score)
                                      for pieces, score in zip(result.hypotheses, result.scores)]
        return found

    def translate_ids(
        self, sources: Sequence[Sequence[int]], beam_size: int = DecodeConfig.beam_size,
        length_penalty: float = DecodeConfig.length_penalty, max_len_a: float = DecodeConfig.max_len_a,
        max_len_b: int = DecodeConfig.max_len_b, batch_tokens: int = DecodeConfig.batch_tokens,
    ) -> list[list[int]]:
        """The best output ids of each source (`search` with these settings).

        Args:
            sources: id sequences, each ending with EOS (as `transformer.decoding.engine.source_ids` makes them).
            length_penalty: CTranslate2's: score = log p / length^length_penalty.
            Others: see `transformer.decoding.translator.translate_ids`.

        Returns:
            Output ids per source, without start token and EOS, in input order.
        """
        settings = DecodeConfig(engine="ctranslate2", beam_size=beam_size, length_penalty=length_penalty,
                                length_penalty_form="length", max_len_a=max_len_a, max_len_b=max_len_b,
                                batch_tokens=batch_tokens)
        return [found[0].tokens for found in self.search(sources, settings)]


def load_ctranslate2(
    folder: str | Path, precision: str | None = None, device: str | torch.device = "cpu"
) -> tuple[CTranslate2Model, Config, float]:
    """Load an exported CTranslate2 folder.

    Args:
        folder: from `transformer-export --format ctranslate2`.
        precision: "fp32", "bf16", "int8", or None/"auto" for the converted weight type.
        device: the CPU or a CUDA GPU.

    Returns:
        The model, the training config stored with it, and the length penalty of its generation defaults.

    Raises:
        FileNotFoundError: a folder that is not such an export.
        CheckpointError: a model CTranslate2 cannot load, or not with this precision on this device; or a
            damaged training or generation config (the message names the file).
    """
    folder = Path(folder)
    for name in ("model.bin", TOKENIZER_FILE, TRAINING_CONFIG, GENERATION_CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: not a CTranslate2 export of this package (no {name})")
    try:
        config = load_config(folder / TRAINING_CONFIG)  # yaml.safe_load: a tag that would build objects is refused
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    length_penalty = _length_penalty(folder / GENERATION_CONFIG)
    compute_type = COMPUTE_TYPES[precision or "auto"]
    try:
        model = CTranslate2Model(folder, compute_type, max_src_len=config.model.max_len, device=device)
    except (ValueError, RuntimeError) as e:  # e.g. a compute type this device lacks, no CUDA build, a damaged model.bin
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder}: CTranslate2 cannot load it with compute type {compute_type} on {device} "
                              f"({reason[:200]})") from None
    return model, config, length_penalty


def _length_penalty(path: Path) -> float:
    """The length penalty of an export's generation defaults (1.0 where the file has none).

    Raises:
        CheckpointError: naming the file: not UTF-8 JSON, not an object, or a length penalty that is
            not a finite number.
    """
    try:
        generation = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(generation, dict):
        raise CheckpointError(f"{path}: expected a JSON object of generation settings, found a {type(generation).__name__}")
    value = generation.get("length_penalty", 1.0)
    if type(value) is int and abs(value) < 2**53:  # exactly a float; not a bool, nor beyond float's range
        value = float(value)
    if not (isinstance(value, float) and math.isfinite(value)):
        raise CheckpointError(f"{path}: length_penalty must be a finite number, not {value!r:.40}")
    return value

