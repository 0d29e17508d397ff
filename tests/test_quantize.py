"""int8 decoding: every linear layer quantized, outputs close to float32, the float model untouched."""

import json

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from transformer.commands import evaluate
from transformer.decoding.quantize import (
    Int8FeedForward,
    Int8InputProjection,
    int8_linear,
    quantize_int8,
    quantized_engine,
)
from transformer.decoding.search import beam_search
from transformer.model import MultiHeadAttention, Transformer
from transformer.model.attention import InputProjection
from transformer.model.layers import FeedForward


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(300, 300, d_model=64, n_heads=4, d_ff=128, n_encoder_layers=2, n_decoder_layers=2,
                       dropout=0.0, share_embeddings=True).eval()


def test_every_linear_layer_is_int8_and_the_float_model_is_unchanged():
    float_model = model()
    before = {k: v.clone() for k, v in float_model.state_dict().items()}
    quantized = quantize_int8(float_model)
    assert not any(isinstance(m, (nn.Linear, InputProjection)) for m in quantized.modules())
    projections = [m for m in quantized.modules() if isinstance(m, Int8InputProjection)]
    assert len(projections) == 2 + 2 * 2  # encoder self-attention, decoder self- and cross-attention
    # Per attention: the stacked projection and its 2 row blocks, and W^O; per layer 2 feed-forward
    # layers; and the output projection.
    n_int8 = sum(isinstance(m, DynamicInt8Linear) for m in quantized.modules())
    assert n_int8 == 6 * (3 + 1) + 4 * 2 + 1
    assert sum(isinstance(m, Int8FeedForward) for m in quantized.modules()) == 4
    assert isinstance(quantized.output_projection, DynamicInt8Linear)
    after = float_model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert isinstance(float_model.decoder.layers[0].cross_attn.in_proj, InputProjection)


def test_the_int8_row_blocks_compute_the_stacked_projection():
    attention = MultiHeadAttention(32, 4).eval()
    int8 = Int8InputProjection(attention.in_proj)
    x = torch.randn(5, 7, 32)
    stacked = int8(x)
    # The separately quantized row blocks agree with the stacked layer to int8 resolution ...
    assert torch.allclose(torch.cat([int8.query(x), int8.memory(x)], dim=-1), stacked, atol=0.05)
    # ... and each with the float rows it came from.
    D = 32
    reference = attention.in_proj(x)
    assert torch.allclose(int8.query(x), reference[..., :D], atol=0.05)
    assert torch.allclose(int8.memory(x), reference[..., D:], atol=0.05)
    assert torch.allclose(attention.in_proj.query(x), reference[..., :D], atol=1e-6)
    assert torch.allclose(attention.in_proj.memory(x), reference[..., D:], atol=1e-6)


def test_packing_for_another_engine_leaves_the_default_engine_as_it_was():
    default = torch.backends.quantized.engine
    layer = nn.Linear(16, 40, bias=False)
    x = torch.randn(6, 16)
    for engine in (None, "onednn", "no-such-engine"):
        with quantized_engine(engine):
            supported = engine in torch.backends.quantized.supported_engines
            assert torch.backends.quantized.engine == (engine if supported else default)
        assert torch.backends.quantized.engine == default
        # The engine's packed kernel computes the same layer, to int8 resolution.
        assert torch.allclose(int8_linear(layer.weight.detach(), None, engine=engine)(x), layer(x), atol=0.05)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_the_int8_feed_forward_layer_is_its_two_int8_layers_around_the_activation(activation):
    torch.manual_seed(0)
    ffn = FeedForward(32, 64, activation).eval()
    int8 = Int8FeedForward(ffn)
    x = torch.randn(5, 7, 32)
    first = int8_linear(ffn.linear1.weight.detach(), ffn.linear1.bias)
    second = int8_linear(ffn.linear2.weight.detach(), ffn.linear2.bias)
    # With ReLU, the fused kernel gives exactly what a separate ReLU after the int8 layer gives.
    assert torch.equal(int8(x), second(ffn._activation(first(x))))
    with torch.no_grad():
        reference = ffn(x)
    assert (int8(x) - reference).abs().max() < 0.05 * reference.abs().max()


def test_int8_logits_and_beam_search_stay_close_to_float32():
    float_model = model()
    quantized = quantize_int8(float_model)
    src = torch.randint(4, 300, (4, 9))
    src[1, 6:] = 0
    tgt = torch.randint(4, 300, (4, 6))
    with torch.no_grad():
        a, b = float_model(src, tgt), quantized(src, tgt)
    assert (a - b).abs().max() < 0.05 * a.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    found = beam_search(quantized, src, 3, 0.6, 1.0, 5, bos_id=2, eos_id=3)
    assert len(found) == 4 and all(h[0].tokens for h in found)


def test_evaluate_runs_in_int8_and_refuses_a_quantized_non_float_model(run, capsys, monkeypatch):  # noqa: F811
    ckpt = str(run / "checkpoints" / "step_1.pt")
    results, int8_calls = {}, {}
    int8_forward = DynamicInt8Linear.forward
    for precision in ("fp32", "int8"):
        calls = []
        monkeypatch.setattr(DynamicInt8Linear, "forward", lambda self, x: calls.append(1) or int8_forward(self, x))
        evaluate.main(["--checkpoint", ckpt, "--json", "--device", "cpu", "--precision", precision, "--beam", "1",
                       "--output", str(run / f"hyp.{precision}.txt")])
        results[precision], int8_calls[precision] = json.loads(capsys.readouterr().out), len(calls)
    assert results["int8"]["precision"] == "int8" and results["int8"]["n_sentences"] == results["fp32"]["n_sentences"]
    assert int8_calls["fp32"] == 0 and int8_calls["int8"] > 0  # the int8 run decodes with the int8 layers
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        quantize_int8(model().to(torch.bfloat16))
