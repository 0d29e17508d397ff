"""Dropout (Srivastava et al., 2014) with a cheaper random mask on the CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LEVELS = 1 << 16  # the mask is drawn from 16 random bits per element


class Dropout(nn.Module):
    """Zero each element with probability p during training and scale the rest by 1 / (1 - p).

    Behaves as `torch.nn.Dropout`. On the CPU the mask is built from 64-bit random integers split
    into four 16-bit lanes instead of one Bernoulli draw per element, which is much cheaper: the
    Bernoulli draws of `nn.Dropout` are a visible share of a CPU training step. The drop probability
    is then rounded to a multiple of 1/65536 (0.1 becomes 0.0999908...). The boolean mask is
    converted to the input's dtype through a uint8 view before it multiplies: PyTorch's CPU kernels
    convert a bool tensor, or a uint8 operand of a float32 product, element by element, but a uint8
    tensor on its own in vector registers. docs/benchmarks.md gives the measurements. Other devices
    use `F.dropout`.

    Args:
        p: probability of an element being zeroed, in [0, 1).
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        # Signed 16-bit lanes are uniform over [-32768, 32767]; an element is kept when its lane
        # is at or above this threshold, which happens with probability 1 - round(p * 65536) / 65536.
        self.threshold = round(p * _LEVELS) - _LEVELS // 2

    def forward(self, x: Tensor) -> Tensor:
        """Any shape -> the same shape."""
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self.threshold
        # The scale is applied to the product, not folded into the mask, where a bf16 mask would round it.
        return (x * keep.view(torch.uint8).to(x.dtype)).mul_(_LEVELS / (_LEVELS - round(self.p * _LEVELS)))

    def extra_repr(self) -> str:
        return f"p={self.p}"
