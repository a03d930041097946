"""The LM loss: plain cross-entropy (reference) and a chunked fused linear + cross-entropy.

With a 201088-id vocabulary the fp32 logits are the largest tensor of a step; the chunked path
never holds more than `chunk` rows of them and computes the gradients chunk by chunk in forward.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def lm_loss_reference(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of softmax(h W^T) against labels (ignore_index -100). hidden [N, D], weight [V, D]."""
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE_INDEX)


def _chunk_loss_and_dlogits(hidden: Tensor, weight: Tensor, labels: Tensor, n_valid: Tensor,
                            with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Summed loss of one chunk and, with_grad, d(mean loss)/d(logits) = (softmax - onehot) / n_valid.

    One buffer of [n, V] fp32 is reused in place (logits -> exp -> softmax -> gradient): at this vocab
    size the elementwise passes over it cost as much as the matmuls.
    """
    buf = (hidden @ weight.T).float()  # [n, V] logits
    valid = labels != IGNORE_INDEX
    safe = labels.clamp(min=0)
    target = buf.gather(1, safe[:, None]).squeeze(1)
    peak = buf.amax(dim=-1, keepdim=True)
    buf.sub_(peak).exp_()
    total = buf.sum(dim=-1, keepdim=True)
    lse = (peak + total.log()).squeeze(1)
    loss = ((lse - target) * valid).sum()
    if not with_grad:
        return loss, None
    buf.div_(total)
    buf[torch.arange(len(safe), device=buf.device), safe] -= 1.0
    buf.mul_((valid.float() / n_valid)[:, None])
    return loss, buf


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1).float()
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            loss, dlogits = _chunk_loss_and_dlogits(h, weight, labels[start:start + chunk], n_valid, True)
            total += loss
            grad_hidden[start:start + chunk] = (dlogits.to(weight.dtype) @ weight).to(hidden.dtype)
            grad_weight += dlogits.T.to(h.dtype).matmul(h).float()
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out.to(grad_hidden.dtype), grad_weight * grad_out.to(grad_weight.dtype), None, None


def lm_loss_chunked(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 1024) -> Tensor:
    """Same value and gradients as `lm_loss_reference`, holding at most `chunk` rows of logits at a time."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk)
    n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1).float()
    total = sum(_chunk_loss_and_dlogits(hidden[s:s + chunk], weight, labels[s:s + chunk], n_valid, False)[0]
                for s in range(0, hidden.shape[0], chunk))
    return total / n_valid
