"""Where the work of translating one sentence goes: its matrix products by component, counted
analytically (`transformer.decoding.flops`), beside the time each component took.

The time is measured operation by operation: a `TorchDispatchMode` times every tensor operation of
one search, and hooks on the model's modules tell which component it ran in (the attention,
feed-forward, embedding or output projection modules of the encoder or the decoder). Inside an
attention module, the linear layers are its Q/K/V and output projections and everything else
(scores, softmax, weighted sums, the cache) is attention proper. Operations in a stack but in none
of those modules (layer norms, residual sums) are the stack's "other" work, and operations outside
the model (log-softmax over the vocabulary, top-k, beam bookkeeping) the search's.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from transformer.config import DecodeConfig
from transformer.decoding.flops import COMPONENTS, SIDES, ModelShape, decoding_flops
from transformer.decoding.search import Hypothesis
from transformer.decoding.translator import TorchEngine
from transformer.model import Transformer

OTHER = "other"  # inside a stack, in no counted component: layer norms, residual sums
SEARCH = "search"  # outside the model: log-softmax, top-k, beam bookkeeping
# Operations that apply a linear layer: float (linear, or the matrix product it becomes) and int8.
LINEAR_OPERATIONS = frozenset({"linear", "addmm", "mm", "linear_dynamic", "linear_relu_dynamic"})
# Every (side, component) that time is reported for, in reading order.
TIMED = [(side, component) for side in SIDES for component in (*COMPONENTS, OTHER)] + [(SEARCH, SEARCH)]


class ComponentClock(TorchDispatchMode):
    """Adds the time of every tensor operation run inside it to the component the model is in.

    `watching(model)` installs the hooks that follow the model's modules; `seconds` then holds the
    time per (side, component) and `decoder_calls` the decoder's calls (the search's steps).

    Args:
        synchronize: wait for the device after each operation (a GPU runs them asynchronously).
    """

    def __init__(self, synchronize: bool = False) -> None:
        super().__init__()
        self.synchronize = synchronize
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.decoder_calls = 0
        self._stack: list[tuple[str, str]] = []  # (side, component) of the modules entered

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        where = self._stack[-1] if self._stack else (SEARCH, SEARCH)
        if where[1] == "attention" and func.overloadpacket.__name__ in LINEAR_OPERATIONS:
            where = (where[0], "projections")
        start = perf_counter()
        out = func(*args, **(kwargs or {}))
        if self.synchronize:
            torch.cuda.synchronize()
        self.seconds[where] += perf_counter() - start
        return out

    @contextlib.contextmanager
    def watching(self, model: Transformer) -> Iterator[None]:
        """Follow `model`'s modules inside the block (hooks, removed at its end)."""
        handles = []

        def enter(module: nn.Module, side: str | None, component: str, count: bool = False) -> None:
            def pre(_module: nn.Module, _args: Any) -> None:
                if count:
                    self.decoder_calls += 1
                here = side or (self._stack[-1][0] if self._stack else self._embedding_side())
                self._stack.append((here, component))

            def post(_module: nn.Module, _args: Any, _output: Any) -> None:
                self._stack.pop()

            handles.extend([module.register_forward_pre_hook(pre), module.register_forward_hook(post)])

        enter(model.encoder, "encoder", OTHER)
        enter(model.decoder, "decoder", OTHER, count=True)
        for embedding in {id(m): m for m in (model.src_embed, model.tgt_embed)}.values():
            enter(embedding, None, "embedding")  # a shared table: the side is found when it runs
        enter(model.output_projection, "decoder", "embedding")
        for layer in [*model.encoder.layers, *model.decoder.layers]:
            for attention in (layer.self_attn, getattr(layer, "cross_attn", None)):
                if attention is not None:
                    enter(attention, None, "attention")
            enter(layer.ff, None, "feed_forward")
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _embedding_side(self) -> str:
        """The side of an embedding lookup outside the stacks: the source's until the decoder has run
        (one sentence is encoded once, before its first decoding step)."""
        return "decoder" if self.decoder_calls else "encoder"


@dataclass(frozen=True)
class Work:
    """The matrix products of one translation and the time its parts took.

    Attributes:
        source_pieces: S, the pieces the encoder read (EOS included).
        steps: n, the decoder's sequential steps.
        beam_size: K, hypothesis rows per step after the first.
        use_cache: whether the decoder used the key/value cache.
        flops: {(side, component): FLOPs} (`decoding_flops`).
        flops_without_cache: what the same search would have cost recomputing every prefix.
        seconds: {(side, component): seconds} for every entry of `TIMED`.
        wall_seconds: the search's time under the clock (which adds its own cost per operation).
    """

    source_pieces: int
    steps: int
    beam_size: int
    use_cache: bool
    flops: dict[tuple[str, str], int]
    flops_without_cache: int
    seconds: dict[tuple[str, str], float]
    wall_seconds: float


def measure_translation(
    model: Transformer, shape: ModelShape, source: list[int], settings: DecodeConfig
) -> tuple[list[Hypothesis], Work]:
    """Translate one sentence with this package's search (`TorchEngine.search`) under the clock, and
    count its matrix products.

    Args:
        model: the model, as an engine holds it (any precision).
        shape: its sizes, for the count.
        source: the sentence's source ids, EOS included.
        settings: the decode settings (beam, cache, lengths).

    Returns:
        The sentence's n-best list, and where the work went.
    """
    engine = TorchEngine(model)
    clock = ComponentClock(synchronize=next(model.parameters(), torch.empty(0)).device.type == "cuda")
    with clock.watching(model), clock:
        start = perf_counter()
        found = engine.search([source], settings)[0]
        wall = perf_counter() - start
    flops = decoding_flops(shape, len(source), clock.decoder_calls, settings.beam_size, settings.use_cache)
    without_cache = decoding_flops(shape, len(source), clock.decoder_calls, settings.beam_size, use_cache=False)
    return found, Work(len(source), clock.decoder_calls, settings.beam_size, settings.use_cache, flops,
                       sum(without_cache.values()), {key: clock.seconds.get(key, 0.0) for key in TIMED}, wall)
