"""Label-smoothed cross entropy, alone and fused with the output projection, against PyTorch's
F.cross_entropy over F.linear, in float64, values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from transformer.model import Transformer
from transformer.training.loss import (TranslationLoss, label_smoothed_cross_entropy,
                                       projected_label_smoothed_cross_entropy)


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


def projected_reference(hidden, weight, target, smoothing):
    return F.cross_entropy(F.linear(hidden, weight), target, label_smoothing=smoothing, reduction="sum")


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("scale", [1.0, 8.0])  # 8: logits of ~±60, most classes underflow
def test_the_fused_projection_and_loss_match_linear_then_cross_entropy(smoothing, scale):
    torch.manual_seed(1)
    hidden = (torch.randn(29, 16, dtype=torch.float64) * scale).requires_grad_()
    weight = torch.randn(50, 16, dtype=torch.float64).requires_grad_()
    target = torch.cat([torch.randint(0, 50, (26,)), torch.tensor([3, 3, 3])])  # repeated targets add up in W's grad
    ref_hidden, ref_weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = projected_label_smoothed_cross_entropy(hidden, weight, target, smoothing)
    expected = projected_reference(ref_hidden, ref_weight, target, smoothing)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    upstream = torch.tensor(0.7, dtype=torch.float64)
    (loss * upstream).backward()
    (expected * upstream).backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weight.grad, ref_weight.grad, rtol=1e-10, atol=1e-12)


def test_the_fused_gradient_passes_gradcheck_and_a_retained_graph_repeats_it():
    torch.manual_seed(3)
    hidden = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 8, 8, 2, 4, 0])
    assert torch.autograd.gradcheck(lambda h, w: projected_label_smoothed_cross_entropy(h, w, target, 0.1),
                                    (hidden, weight))
    loss = projected_label_smoothed_cross_entropy(hidden, weight, target, 0.1)
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (hidden, weight))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    only_weight = torch.autograd.grad(projected_label_smoothed_cross_entropy(hidden.detach(), weight, target, 0.1),
                                      weight)[0]
    torch.testing.assert_close(only_weight, first[1], rtol=0, atol=0)


def test_the_fused_loss_takes_underflowed_target_rows_from_the_logits():
    torch.manual_seed(2)
    hidden = torch.randn(4, 8, dtype=torch.float64)
    weight = torch.randn(30, 8, dtype=torch.float64)
    target = torch.tensor([5, 1, 7, 29])
    hidden[0] = weight[5] * -40.0  # the target logit far under the rest: p_y ~ 0 in float32
    expected = projected_reference(hidden, weight, target, 0.1)
    loss = projected_label_smoothed_cross_entropy(hidden.float(), weight.float(), target, 0.1)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


def test_the_fused_loss_refuses_half_precision_and_mixed_dtypes():
    target = torch.zeros(2, dtype=torch.long)
    with pytest.raises(TypeError, match="float32 or float64"):
        projected_label_smoothed_cross_entropy(torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(3, 4), target, 0.1)
    with pytest.raises(ValueError, match="label smoothing"):
        projected_label_smoothed_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4), target, -0.1)


@pytest.mark.parametrize("autocast", [False, True])
def test_translation_loss_fuses_in_float32_and_projects_first_under_autocast(autocast, monkeypatch):
    """Both paths give the loss and every parameter's gradient of the plain computation."""
    torch.manual_seed(4)
    model = Transformer(src_vocab_size=40, tgt_vocab_size=40, d_model=16, n_heads=2, d_ff=32,
                        n_encoder_layers=1, n_decoder_layers=1, dropout=0.0, share_embeddings=True).double()
    src = torch.randint(4, 40, (3, 6))
    tgt = torch.randint(4, 40, (3, 7))
    tgt[1, 5:] = 0
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    keep = tgt_out.ne(0)
    expected = F.cross_entropy(model(src, tgt_in)[keep], tgt_out[keep], label_smoothing=0.1, reduction="sum")
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    called = []
    import transformer.training.loss as loss_module
    for name in ("label_smoothed_cross_entropy", "projected_label_smoothed_cross_entropy"):
        original = getattr(loss_module, name)
        monkeypatch.setattr(loss_module, name, lambda *a, _f=original, _n=name: called.append(_n) or _f(*a))
    # Under autocast the products may run in bfloat16: there only the path taken is checked.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = TranslationLoss(model, 0.1)(src, tgt_in, tgt_out)
    assert called == ["label_smoothed_cross_entropy" if autocast else "projected_label_smoothed_cross_entropy"]
    if not autocast:
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
        for got, want in zip(torch.autograd.grad(loss, list(model.parameters())), expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
