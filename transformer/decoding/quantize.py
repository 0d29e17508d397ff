"""int8 decoding on the CPU: dynamic quantization of every linear layer of a trained model.

Every linear layer (attention's stacked W^Q/W^K/W^V projection and W^O, the feed-forward layers,
the output projection) gets int8 weights, quantized once per output channel, and int8 activations,
quantized per call from each batch's range; matmuls accumulate in int32 and results come back in
float32. Embeddings, LayerNorms and softmax stay float32. A ReLU feed-forward layer applies its
ReLU inside the first layer's kernel (`Int8FeedForward`), which spares a pass over its output.

The kernels are PyTorch's dynamic quantized `Linear` (`torch.ao.nn.quantized.dynamic`): fbgemm on
x86, and oneDNN for the output projection onto the vocabulary (`OUTPUT_PROJECTION_ENGINE`).
torchao is where PyTorch's quantization is maintained now, but without `torch.compile` its int8
dynamic-activation layers have no int8 CPU kernel and run slower than float32, where these run
faster.

Attention's (3D, D) input projection is used whole by self-attention and in two row blocks by
cross-attention (W^Q for the queries, W^K and W^V for the memory); a quantized weight cannot be
sliced, so each block gets its own quantized layer (`Int8InputProjection`). The float model is
not modified: its state-dict layout stays the checkpoint's.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.ao.nn.intrinsic import LinearReLU
from torch.ao.nn.intrinsic.quantized.dynamic import LinearReLU as DynamicInt8LinearReLU
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
from torch.ao.quantization import per_channel_dynamic_qconfig

from transformer.model import Transformer
from transformer.model.attention import InputProjection
from transformer.model.layers import ACTIVATIONS, FeedForward

# The quantized engine for the output projection onto the vocabulary: on a wide layer oneDNN's
# int8 kernel is faster than fbgemm's (1.4x on 256 -> 8,000), but it builds a kernel for every new
# number of rows, which beam search changes whenever sentences finish; on the narrow layers that
# costs more than it saves (docs/benchmarks.md), so they keep the default engine.
OUTPUT_PROJECTION_ENGINE = "onednn"


@contextlib.contextmanager
def quantized_engine(engine: str | None) -> Iterator[None]:
    """Pack int8 weights for `engine` inside the block (None, or one this build lacks: the default).

    A packed layer keeps its engine's kernel wherever it runs, so layers of one model may differ.
    """
    previous = torch.backends.quantized.engine
    if engine is not None and engine in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def int8_linear(weight: Tensor, bias: Tensor | None, relu: bool = False, engine: str | None = None) -> DynamicInt8Linear:
    """A dynamically quantized linear layer computing x W^T + b (then max(0, .) if `relu`), with
    per-output-channel int8 weights, packed for the quantized `engine` (None: PyTorch's default)."""
    linear = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.qconfig = per_channel_dynamic_qconfig
    float_layer: nn.Module = linear
    if relu:
        float_layer = LinearReLU(linear, nn.ReLU())
        float_layer.qconfig = per_channel_dynamic_qconfig
    with warnings.catch_warnings(), quantized_engine(engine):
        # PyTorch warns that quantized tensors are deprecated; these layers are its int8 kernels on the CPU.
        warnings.simplefilter("ignore", UserWarning)
        return (DynamicInt8LinearReLU if relu else DynamicInt8Linear).from_float(float_layer)


class Int8FeedForward(nn.Module):
    """`FeedForward` with int8 weights; a ReLU runs inside the first layer's kernel.

    Args:
        feed_forward: the float layer to quantize (left unchanged).
    """

    def __init__(self, feed_forward: FeedForward) -> None:
        super().__init__()
        self.activation = feed_forward.activation
        fused = self.activation == "relu"
        self.linear1 = int8_linear(feed_forward.linear1.weight.detach(), feed_forward.linear1.bias, relu=fused)
        self._activation = nn.Identity() if fused else ACTIVATIONS[self.activation]
        self.linear2 = int8_linear(feed_forward.linear2.weight.detach(), feed_forward.linear2.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D)."""
        return self.linear2(self._activation(self.linear1(x)))


class Int8InputProjection(nn.Module):
    """`InputProjection` with int8 weights: the stacked (3D, D) layer and its two row blocks.

    Args:
        projection: the float layer to quantize (left unchanged).
    """

    def __init__(self, projection: InputProjection) -> None:
        super().__init__()
        w, b = projection.weight.detach(), None if projection.bias is None else projection.bias.detach()
        D = projection.in_features
        self.in_features = D
        self.stacked = int8_linear(w, b)
        self.query_rows = int8_linear(w[:D], None if b is None else b[:D])
        self.memory_rows = int8_linear(w[D:], None if b is None else b[D:])

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., 3D): queries, keys and values."""
        return self.stacked(x)

    def query(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D): queries."""
        return self.query_rows(x)

    def memory(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., 2D): keys and values."""
        return self.memory_rows(x)


def quantize_int8(model: Transformer) -> Transformer:
    """An int8 copy of a float32 model, for CPU inference (eval mode; `model` is left unchanged).

    Raises:
        ValueError: a model that is not float32 or not on the CPU.
    """
    parameter = next(model.parameters())
    if parameter.dtype != torch.float32 or parameter.device.type != "cpu":
        raise ValueError(f"int8 quantization needs a float32 model on the CPU, got {parameter.dtype} on {parameter.device}")
    quantized = copy.deepcopy(model).eval()
    output = model.output_projection
    quantized.output_projection = int8_linear(output.weight.detach(), output.bias, engine=OUTPUT_PROJECTION_ENGINE)
    _quantize_children(quantized)  # every other layer, with the default engine
    return quantized


def _quantize_children(module: nn.Module) -> None:
    """Replace the float layers below `module` by their int8 versions, in place."""
    for name, child in module.named_children():
        if isinstance(child, InputProjection):
            setattr(module, name, Int8InputProjection(child))
        elif isinstance(child, FeedForward):
            setattr(module, name, Int8FeedForward(child))
        elif type(child) is nn.Linear:
            setattr(module, name, int8_linear(child.weight.detach(), child.bias))
        else:
            _quantize_children(child)
