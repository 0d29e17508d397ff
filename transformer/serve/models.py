"""The models a server holds: each an engine, as the decoding commands build it, with its name,
its config and its default decode settings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from transformer.config import Config, DecodeConfig
from transformer.decoding.engine import Engine
from transformer.decoding.flops import ModelShape
from transformer.decoding.translator import TorchEngine
from transformer.model import Transformer


@dataclass
class ServedModel:
    """One model of the server.

    Attributes:
        name: what requests call it.
        engine: the engine that translates, from `transformer.commands.options.load_engine`.
        config: the config it was trained with.
        decode: its decode settings as `transformer-translate` resolves them (the checkpoint's
            `decode` section with the command's options over it, precision resolved); a request's
            settings are put over these.
        source: the checkpoint or export it was loaded from.
    """

    name: str
    engine: Engine
    config: Config
    decode: DecodeConfig
    source: str
    parameters: int = field(init=False)

    def __post_init__(self) -> None:
        # Counted on a storage-less copy built from the config: an int8 or CTranslate2 model holds
        # its weights in forms that `parameters()` does not list.
        with torch.device("meta"):
            shell = Transformer.from_config(self.config.model, self.engine.src_tokenizer.vocab_size,
                                            self.engine.tgt_tokenizer.vocab_size)
        self.parameters = sum(p.numel() for p in shell.parameters())

    @property
    def torch_model(self) -> Transformer | None:
        """The `Transformer` the engine runs (any precision), or None where the engine is not this
        package's (CTranslate2), whose attention weights and modules cannot be read."""
        return self.engine.model if isinstance(self.engine, TorchEngine) else None

    @property
    def shape(self) -> ModelShape:
        """The model's sizes, for counting its FLOPs."""
        return ModelShape.of(self.config.model, self.engine.tgt_tokenizer.vocab_size)

    def describe(self) -> dict:
        """What `GET /models` says about it."""
        reranking = self.decode.rerank_with is not None
        return {
            "name": self.name,
            "source_language": self.config.data.src_lang,
            "target_language": self.config.data.tgt_lang,
            "parameters": self.parameters,
            "vocabulary": {"source": self.engine.src_tokenizer.vocab_size,
                           "target": self.engine.tgt_tokenizer.vocab_size},
            "engine": self.decode.engine + (" with noisy-channel reranking" if reranking else ""),
            "precision": self.decode.precision,
            "layers": {"encoder": self.config.model.n_encoder_layers, "decoder": self.config.model.n_decoder_layers},
            "heads": self.config.model.n_heads,
            "attention": self.torch_model is not None,
            "decode": dataclasses.asdict(self.decode),
        }
