"""The CPU dropout: drop rate, scaling, gradient, determinism under a seed, eval identity."""

import pytest
import torch

from transformer.model import Dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_drop_rate_and_expectation(p):
    torch.manual_seed(0)
    x = torch.ones(400, 500)
    y = Dropout(p).train()(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 0.005, f"dropped {dropped:.4f}, expected {p}"
    assert abs(y.mean().item() - 1.0) < 0.01  # kept elements are scaled by 1 / (1 - p)
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - round(p * 65536) / 65536)))


def test_lanes_are_independent_of_position():
    """Every one of the four 16-bit lanes of a 64-bit draw must be uniform (none stuck at a sign)."""
    torch.manual_seed(0)
    y = Dropout(0.5).train()(torch.ones(100_000, 4))
    for lane in range(4):
        assert abs((y[:, lane] == 0).float().mean().item() - 0.5) < 0.01


def test_gradient_is_the_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 33, requires_grad=True)
    y = Dropout(0.2).train()(x)
    y.sum().backward()
    kept = y != 0
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], 65536 / (65536 - round(0.2 * 65536))))
    assert torch.all(x.grad[~kept] == 0)


def test_seeded_and_eval_identity():
    x = torch.randn(10, 10)
    layer = Dropout(0.4).train()
    torch.manual_seed(3)
    a = layer(x)
    torch.manual_seed(3)
    torch.testing.assert_close(layer(x), a)
    assert layer.eval()(x) is x
    with pytest.raises(ValueError):
        Dropout(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_elements_are_scaled_in_the_products_precision(dtype):
    """Each kept element is x / (1 - p) rounded once in x's dtype (no scale pre-rounded to bf16)."""
    torch.manual_seed(0)
    x = torch.randn(300, 200, dtype=dtype)
    y = Dropout(0.1).train()(x)
    assert y.dtype == dtype
    kept = y != 0
    scale = 65536 / (65536 - round(0.1 * 65536))
    expected = (x.float() * torch.tensor(scale, dtype=torch.float32)).to(dtype)
    assert torch.equal(y[kept], expected[kept])
