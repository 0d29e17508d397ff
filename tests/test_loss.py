"""Label-smoothed cross entropy against PyTorch's F.cross_entropy, in float64, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from transformer.training.loss import label_smoothed_cross_entropy


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: rows whose softmax underflows to 0 for most classes
def test_matches_torch_cross_entropy(smoothing, scale):
    torch.manual_seed(0)
    logits = (torch.randn(37, 50, dtype=torch.float64) * scale).requires_grad_()
    target = torch.randint(0, 50, (37,))
    expected_logits = logits.detach().clone().requires_grad_()
    loss = label_smoothed_cross_entropy(logits, target, smoothing)
    expected = F.cross_entropy(expected_logits, target, label_smoothing=smoothing, reduction="sum")
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    upstream = torch.tensor(0.7, dtype=torch.float64)  # a gradient other than 1 must scale the result
    (loss * upstream).backward()
    (expected * upstream).backward()
    torch.testing.assert_close(logits.grad, expected_logits.grad, rtol=0, atol=1e-12)


def test_repeated_targets_and_half_precision_logits():
    """A class that is the target of several rows gets each row's gradient; bf16 logits run in float32."""
    torch.manual_seed(1)
    logits = torch.randn(6, 9).bfloat16().requires_grad_()
    target = torch.tensor([3, 3, 3, 0, 8, 3])
    loss = label_smoothed_cross_entropy(logits, target, 0.1)
    assert loss.dtype == torch.float32
    loss.backward()
    reference = logits.detach().float().requires_grad_()
    F.cross_entropy(reference, target, label_smoothing=0.1, reduction="sum").backward()
    torch.testing.assert_close(loss, F.cross_entropy(logits.detach().float(), target, label_smoothing=0.1,
                                                     reduction="sum"))
    torch.testing.assert_close(logits.grad.float(), reference.grad, rtol=0, atol=1e-2)


def test_half_precision_gradient_is_rounded_once():
    """bf16 logits get the float64 gradient rounded to bf16, also where p_y - (1 - eps) cancels.

    Targets with p_y ~ 0.9 (logit 7.9 over 299 zeros) have gradients ~100x smaller than p_y: a
    gradient formed in bf16 before the target term is subtracted would be off by ~100%.
    """
    torch.manual_seed(3)
    logits = torch.randn(64, 300) * 0.01
    target = torch.randint(0, 300, (64,))
    logits[torch.arange(64), target] = torch.linspace(7.5, 8.3, 64)
    logits = logits.bfloat16().requires_grad_()
    label_smoothed_cross_entropy(logits, target, 0.1).backward()
    reference = logits.detach().double().requires_grad_()
    F.cross_entropy(reference, target, label_smoothing=0.1, reduction="sum").backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.double(), reference.grad, rtol=2**-8, atol=1e-9)


def test_rejects_smoothing_outside_unit_interval():
    with pytest.raises(ValueError, match="label smoothing"):
        label_smoothed_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.0)


def test_a_retained_graph_gives_the_same_gradient_twice():
    torch.manual_seed(2)
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 7, (5,))
    loss = label_smoothed_cross_entropy(logits, target, 0.1)
    first = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    second = torch.autograd.grad(loss, logits)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_target_probability_below_the_normal_range(dtype):
    """Rows whose target probability is subnormal or 0 in `dtype` (the target logit 100-2000 under
    the others) still get the exact loss, not inf or a rounded value; other rows are unaffected."""
    torch.manual_seed(2)
    logits = torch.randn(5, 40, dtype=torch.float64)
    target = torch.tensor([7, 0, 39, 12, 7])
    logits[0, 7] -= 100.0  # float32: p_y ~ 1e-45, subnormal
    logits[2, 39] -= 2000.0  # 0 in both dtypes
    logits[4, 7] -= 730.0  # float64: subnormal
    expected = F.cross_entropy(logits, target, label_smoothing=0.1, reduction="none")
    rows = []
    for i in range(5):
        z = logits[i : i + 1].to(dtype).requires_grad_()
        rows.append(label_smoothed_cross_entropy(z, target[i : i + 1], 0.1))
        rows[-1].backward()
        assert torch.isfinite(z.grad).all()
    loss = torch.stack(rows).double()
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    batch = logits.to(dtype)
    torch.testing.assert_close(label_smoothed_cross_entropy(batch, target, 0.1).double(), expected.sum(),
                               rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
