"""Positional encodings against the paper's formula, computed independently in float64."""

import math

import pytest
import torch

from transformer.model import LearnedPositionalEmbedding, SinusoidalPositionalEncoding


def paper_formula(length: int, d_model: int) -> torch.Tensor:
    table = torch.zeros(length, d_model, dtype=torch.float64)
    for pos in range(length):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            table[pos, 2 * i] = math.sin(angle)
            table[pos, 2 * i + 1] = math.cos(angle)
    return table


def test_sinusoidal_equals_paper_formula():
    encoding = SinusoidalPositionalEncoding(32, max_len=60)
    torch.testing.assert_close(encoding(60).double(), paper_formula(60, 32), atol=1e-6, rtol=0)


def test_sinusoidal_offset_and_extension():
    encoding = SinusoidalPositionalEncoding(16, max_len=8)
    expected = paper_formula(40, 16)
    torch.testing.assert_close(encoding(5, offset=3).double(), expected[3:8], atol=1e-6, rtol=0)
    torch.testing.assert_close(encoding(10, offset=30).double(), expected[30:40], atol=1e-6, rtol=0)
    assert encoding.table.size(0) >= 40


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sinusoidal_extension_keeps_the_dtype_the_module_was_cast_to(dtype):
    encoding = SinusoidalPositionalEncoding(16, max_len=8).to(dtype)
    extended = encoding(10, offset=30)
    assert extended.dtype == dtype and encoding.table.dtype == dtype
    tolerance = 1e-12 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(extended.double(), paper_formula(40, 16)[30:40], atol=tolerance, rtol=0)


def test_learned_positions_shape_and_limit():
    learned = LearnedPositionalEmbedding(8, max_len=10)
    assert learned(4, offset=2).shape == (4, 8)
    torch.testing.assert_close(learned(1, offset=5)[0], learned.embedding.weight[5])
    with pytest.raises(ValueError, match="max_len"):
        learned(5, offset=6)
