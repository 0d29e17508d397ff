"""The training loss: label-smoothed cross entropy (paper section 5.4) over the real target tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from transformer.data.tokenizer import PAD_ID
from transformer.model import TokenLayout, Transformer


def rows_found_on_host(device: torch.device) -> bool:
    """Whether the loss may find its rare underflowed rows with `nonzero`: on the CPU, where that
    is free; a GPU would have to stop and report them to the host, so there they are fixed in place."""
    return device.type == "cpu"


def _target_nll(logits: Tensor, probs: Tensor, target: Tensor, target_logit: Tensor) -> Tensor:
    """-log p_y of each row, (N,), read off the softmax `probs` of `logits` (N, V): no pass over the rows.

    Below the normal range (a target logit ~87 or more under the row's largest in float32), p_y has
    lost precision or underflowed to 0: those rows take lse - z_y from the logits instead.
    """
    target_prob = probs.gather(1, target.unsqueeze(1)).squeeze(1)
    nll = target_prob.log().neg_()
    lost = target_prob < torch.finfo(probs.dtype).tiny
    if rows_found_on_host(logits.device):
        # Recompute just the rare rows: finding them costs nothing here.
        rows = lost.nonzero().squeeze(1)
        if rows.numel():
            nll[rows] = torch.logsumexp(logits[rows], dim=1) - target_logit[rows]
        return nll
    # Finding the rows would wait for the device. lse = z_max - log p_max instead, where
    # p_max >= 1/V cannot underflow: one max pass over the probabilities, no exponential.
    p_max, argmax = probs.max(dim=1)
    lse = logits.gather(1, argmax.unsqueeze(1)).squeeze(1) - p_max.log()
    return torch.where(lost, lse - target_logit, nll)


class _LabelSmoothedCrossEntropy(torch.autograd.Function):
    """Summed label-smoothed cross entropy whose backward is the softmax its forward computed.

    With q = (1 - eps) * onehot(y) + eps / V, the loss of a row is sum_j -q_j log p_j
    = (1 - eps)(-log p_y) + eps (lse - mean(z)), and since lse = z_y - log p_y, that is
    -log p_y + eps (z_y - mean(z)). Its gradient is p - q. The forward keeps p, so the backward is
    one pass over it: no second exponential, unlike `log_softmax` and its backward.
    Double backward is not supported.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
        probs = torch.softmax(logits, dim=1)
        target_logit = logits.gather(1, target.unsqueeze(1)).squeeze(1)
        nll = _target_nll(logits, probs, target, target_logit)
        loss = (nll + smoothing * (target_logit - logits.mean(dim=1))).sum()
        ctx.save_for_backward(probs, target)
        ctx.smoothing = smoothing
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        probs, target = ctx.saved_tensors
        smoothing = ctx.smoothing
        # grad * (p - q) in one pass, into a new tensor: p must survive a second backward
        # (retain_graph=True).
        grad_logits = torch.addcmul(grad * (-smoothing / probs.size(1)), probs, grad)
        grad_logits[torch.arange(target.numel(), device=target.device), target] -= (1 - smoothing) * grad
        return grad_logits, None, None


def label_smoothed_cross_entropy(logits: Tensor, target: Tensor, smoothing: float) -> Tensor:
    """Cross entropy against (1 - smoothing) * onehot(target) + smoothing / V, summed over rows.

    Equals `F.cross_entropy(logits, target, label_smoothing=smoothing, reduction="sum")`, with a
    cheaper forward + backward (docs/benchmarks.md).

    Args:
        logits: (N, V); float16/bfloat16 are computed in float32.
        target: (N,) class indices in [0, V).
        smoothing: epsilon_ls in [0, 1).

    Returns:
        the summed loss, a scalar in the logits' dtype (float32 for half precisions).
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the softmax over V classes needs float32 range and precision
    return _LabelSmoothedCrossEntropy.apply(logits, target, smoothing)


class _ProjectedLabelSmoothedCrossEntropy(torch.autograd.Function):
    """The output projection z = h W^T and the summed label-smoothed cross entropy of z, as one step.

    The gradient of the loss with respect to z is p - q, with q = (1 - eps) onehot(y) + eps / V, and
    the projection's backward multiplies it by W and by h. Taken apart, (p - q) W =
    p W - (eps / V) sum_v W_v - (1 - eps) W_y, and (p - q)^T h = p^T h - (eps / V) 1 sum_n h_n
    - (1 - eps) scatter_y(h): the two matrix products read p as the forward left it, and the
    smoothing and the targets enter as corrections of (N, D) and (V, D) size. So the (N, V) matrix
    is written once (the softmax) and never passed over again, where the loss's gradient alone
    would write a second (N, V) matrix. The mean logit of a row, which the smoothing term needs, is
    h . mean_v(W). Double backward is not supported.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, target: Tensor, smoothing: float) -> Tensor:
        logits = torch.mm(hidden, weight.t())
        probs = torch.softmax(logits, dim=1)
        target_logit = logits.gather(1, target.unsqueeze(1)).squeeze(1)
        nll = _target_nll(logits, probs, target, target_logit)
        mean_logit = torch.mv(hidden, weight.mean(dim=0))
        loss = (nll + smoothing * (target_logit - mean_logit)).sum()
        ctx.save_for_backward(hidden, weight, probs, target)
        ctx.smoothing = smoothing
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        hidden, weight, probs, target = ctx.saved_tensors
        uniform, on_target = ctx.smoothing / probs.size(1), 1.0 - ctx.smoothing
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.mm(probs, weight)
            grad_hidden -= uniform * weight.sum(dim=0)
            grad_hidden -= on_target * weight.index_select(0, target)
            grad_hidden *= grad
        if ctx.needs_input_grad[1]:
            scaled = hidden * grad
            grad_weight = torch.mm(probs.t(), scaled)
            grad_weight -= uniform * scaled.sum(dim=0)
            grad_weight.index_add_(0, target, scaled, alpha=-on_target)
        return grad_hidden, grad_weight, None, None


def projected_label_smoothed_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, smoothing: float) -> Tensor:
    """`label_smoothed_cross_entropy(hidden @ weight.T, target, smoothing)` with a cheaper backward.

    Args:
        hidden: (N, D) the decoder's output at the N target positions.
        weight: (V, D) the pre-softmax projection (no bias).
        target: (N,) class indices in [0, V).
        smoothing: epsilon_ls in [0, 1).

    Returns:
        the summed loss, a scalar in the inputs' dtype. Half precisions are not taken: under
        autocast, `TranslationLoss` projects first and calls `label_smoothed_cross_entropy`.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    if hidden.dtype in (torch.float16, torch.bfloat16) or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share a float32 or float64 dtype, got {hidden.dtype} and {weight.dtype}")
    return _ProjectedLabelSmoothedCrossEntropy.apply(hidden, weight, target, smoothing)


class TranslationLoss(nn.Module):
    """Label-smoothed cross entropy of a Transformer on one batch, summed over target tokens.

    Logits are computed only at non-padding target positions: padding costs no output projection,
    no softmax and no memory for a (B, T, V) tensor. Outside autocast, the output projection and the
    loss are one autograd step (`projected_label_smoothed_cross_entropy`).
    """

    def __init__(self, model: Transformer, label_smoothing: float) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(
        self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor, src_index: Tensor | None = None,
        tgt_index: Tensor | None = None,
    ) -> Tensor:
        """Args:
            src: (B, S) source ids; tgt_in, tgt_out: (B, T) decoder inputs and labels.
            src_index: optional (N_src,) positions of the real source tokens in the flattened
                (B * S) `src`. None: found from `src` if it has padding; but if `tgt_index` is
                given, None means that `src` has no padding (as in `data.Batch`).
            tgt_index: optional (N,) positions of the labels in the flattened (B * T) `tgt_out`
                (None: found from `tgt_out`). Given, as `data.Batch` carries them, nothing here
                reads a device tensor on the host, so a GPU never waits for it.

        Returns:
            the summed loss (scalar, float32).
        """
        if src_index is not None:
            layout = TokenLayout(src_index, src.size(0), src.size(1))
        elif tgt_index is not None:  # positions from the host, and no source padding among them
            layout = TokenLayout.dense(src.size(0), src.size(1), src.device)
        else:
            layout = None
        memory = self.model.encode(src, layout)
        hidden = self.model.decode_hidden(tgt_in, memory, self.model.padding_mask(src))  # (B, T, D)
        if tgt_index is None:
            tgt_index = tgt_out.ne(PAD_ID).flatten().nonzero().squeeze(1)
        rows = hidden.flatten(0, 1).index_select(0, tgt_index)  # (N, D), N real targets
        target = tgt_out.flatten().index_select(0, tgt_index)
        if torch.is_autocast_enabled(rows.device.type):  # products in half precision, the softmax in float32
            return label_smoothed_cross_entropy(self.model.project(rows), target, self.label_smoothing)
        return projected_label_smoothed_cross_entropy(rows, self.model.output_projection.weight, target,
                                                      self.label_smoothing)
