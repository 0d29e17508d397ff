"""The analytic count of decoding FLOPs (transformer/decoding/flops.py) against PyTorch's own counter,
`torch.utils.flop_counter.FlopCounterMode`, which counts every matrix product a search runs, by module.

The searches run attention written out, as the CPU does for sentences of up to
`CPU_WRITTEN_OUT_MAX_KEYS` pieces: FlopCounterMode has no formula for PyTorch's fused CPU attention
kernel (it counts it as 0), which does the same products."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from transformer.config import DecodeConfig, ModelConfig
from transformer.decoding.flops import COMPONENTS, SIDES, ModelShape, decoding_flops
from transformer.decoding.translator import TorchEngine
from transformer.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 40
SIZES = dict(d_model=32, n_heads=4, d_ff=48, n_encoder_layers=2, n_decoder_layers=3, dropout=0.0)


def model(**sizes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(VOCAB, VOCAB, **(SIZES | sizes)).eval()


def counted(net: Transformer, source: list[int], settings: DecodeConfig) -> tuple[dict, int]:
    """FlopCounterMode's FLOPs of one sentence's search, by (side, component), and the decoder's calls."""
    calls = []
    hook = net.decoder.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with FlopCounterMode(display=False) as counter:
            TorchEngine(net).search([source], settings)
    finally:
        hook.remove()
    by_module = counter.get_flop_counts()
    found = {(side, component): 0 for side in SIDES for component in COMPONENTS}
    for name, ops in by_module.items():
        parts = name.split(".")
        total = sum(ops.values())
        if name == "Linear":  # the output projection, called outside the stacks
            found["decoder", "embedding"] += total
        elif len(parts) == 4 and parts[3] in ("self_attn", "cross_attn"):
            side = parts[0].lower()
            scores = sum(n for op, n in ops.items() if "bmm" in str(op) or "attention" in str(op))
            found[side, "attention"] += scores
            found[side, "projections"] += total - scores
        elif len(parts) == 4 and parts[3] == "ff":
            found[parts[0].lower(), "feed_forward"] += total
    assert sum(found.values()) == counter.get_total_flops(), f"FLOPs outside the components: {by_module}"
    return found, len(calls)


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize("use_cache", [True, False])
def test_count_equals_pytorchs_flop_counter_by_component(beam, use_cache):
    net = model()
    source = [5, 9, 11, 7, 30, 12, 8, 3]
    settings = DecodeConfig(beam_size=beam, max_len_a=1.0, max_len_b=6, use_cache=use_cache)
    found, steps = counted(net, source, settings)
    assert steps >= 2
    expected = decoding_flops(ModelShape.of(ModelConfig(**SIZES), VOCAB), len(source), steps, beam, use_cache)
    for key, flops in found.items():
        assert expected[key] == pytest.approx(flops, rel=0.01), key
    assert sum(expected.values()) == pytest.approx(sum(found.values()), rel=0.01)


def test_a_long_beam_search_stopped_by_its_length_limit():
    """Many steps, past the written-out attention's key limit, where the search stops at its maximum length."""
    net = model(d_model=16, n_heads=2, d_ff=24, n_encoder_layers=1, n_decoder_layers=1)
    source = list(range(4, 39)) + [3]
    settings = DecodeConfig(beam_size=3, max_len_a=3.0, max_len_b=5)
    found, steps = counted(net, source, settings)
    shape = ModelShape(d_model=16, d_ff=24, n_encoder_layers=1, n_decoder_layers=1, vocab_size=VOCAB)
    assert sum(decoding_flops(shape, len(source), steps, 3).values()) == pytest.approx(sum(found.values()), rel=0.01)


def test_the_formula_of_one_encoder_layer_by_hand():
    """The paper's base model reading 10 pieces: 8·S·D² for the projections, 4·S²·D for attention, 4·S·D·F."""
    shape = ModelShape(d_model=512, d_ff=2048, n_encoder_layers=1, n_decoder_layers=1, vocab_size=37000)
    flops = decoding_flops(shape, source_length=10, steps=0, beam_size=4)
    assert flops["encoder", "projections"] == 2 * 10 * 512 * (3 * 512) + 2 * 10 * 512 * 512
    assert flops["encoder", "attention"] == 2 * (2 * 10 * 10 * 512)
    assert flops["encoder", "feed_forward"] == 2 * 2 * 10 * 512 * 2048
    assert all(flops["decoder", component] == 0 for component in COMPONENTS)


def test_the_cache_saves_work_that_grows_with_the_steps():
    shape = ModelShape(d_model=256, d_ff=1024, n_encoder_layers=3, n_decoder_layers=3, vocab_size=8000)
    cached = [sum(decoding_flops(shape, 12, n, 4).values()) for n in (5, 10, 20)]
    uncached = [sum(decoding_flops(shape, 12, n, 4, use_cache=False).values()) for n in (5, 10, 20)]
    assert all(u > c for u, c in zip(uncached, cached))
    assert uncached[2] / cached[2] > uncached[0] / cached[0]  # the prefix recomputed grows with the steps


def test_impossible_sizes_are_refused():
    shape = ModelShape(d_model=8, d_ff=8, n_encoder_layers=1, n_decoder_layers=1, vocab_size=10)
    with pytest.raises(ValueError, match="source_length"):
        decoding_flops(shape, 0, 3, 1)
