"""Routed experts: E ReLU^2 FFNs (1024 -> 128 -> 1024 with biases), weighted by the router's gates.

`experts_reference` loops over experts (the oracle); `experts_grouped` sorts the (token, expert)
pairs by expert and runs two `torch._grouped_mm` calls, so each expert computes only its tokens.
"""

import torch
from torch import Tensor, nn

from vpmoe.model.mlp import relu_squared


def experts_reference(x: Tensor, idx: Tensor, weights: Tensor, fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor,
                      fc2_b: Tensor) -> Tensor:
    """y_t = sum_{i in K(t)} g_ti (W2_i phi(W1_i x_t + b1_i) + b2_i), one expert at a time.

    x [N, D]; idx, weights [N, K]; fc1_w [E, F, D], fc1_b [E, F], fc2_w [E, D, F], fc2_b [E, D].
    """
    y = torch.zeros_like(x)
    for e in range(fc1_w.shape[0]):
        token, slot = torch.nonzero(idx == e, as_tuple=True)
        if token.numel() == 0:
            continue
        h = relu_squared(x[token] @ fc1_w[e].T + fc1_b[e])
        out = h @ fc2_w[e].T + fc2_b[e]
        y = y.index_add(0, token, out * weights[token, slot, None].to(x.dtype))
    return y


def experts_grouped(x: Tensor, idx: Tensor, weights: Tensor, fc1_w: Tensor, fc1_b: Tensor, fc2_w: Tensor,
                    fc2_b: Tensor) -> Tensor:
    """Same result as `experts_reference`: tokens sorted by expert, fc1 and fc2 as grouped GEMMs."""
    K = idx.shape[1]
    E = fc1_w.shape[0]
    flat = idx.reshape(-1)  # [N*K], pair p = token p // K, slot p % K
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    token_of = order // K
    offsets = torch.cumsum(torch.bincount(flat, minlength=E), dim=0).to(torch.int32)  # group ends, [E]
    xs = x[token_of]  # [N*K, D], grouped by expert
    h = torch._grouped_mm(xs, fc1_w.transpose(1, 2), offs=offsets) + fc1_b[expert_of]
    out = torch._grouped_mm(relu_squared(h), fc2_w.transpose(1, 2), offs=offsets) + fc2_b[expert_of]
    out = out * weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add(0, token_of, out)


EXPERT_KERNELS = {"reference": experts_reference, "grouped": experts_grouped}


class RoutedExperts(nn.Module):
    """E experts as stacked weights; the kernel ('reference' loop or 'grouped') is fixed at construction."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, init_std: float, out_std: float,
                 kernel: str) -> None:
        super().__init__()
        self.kernel = kernel
        self._compute = EXPERT_KERNELS[kernel]
        self.fc1_weight = nn.Parameter(torch.randn(num_experts, ffn_size, hidden_size) * init_std)
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, ffn_size))
        self.fc2_weight = nn.Parameter(torch.randn(num_experts, hidden_size, ffn_size) * out_std)
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, hidden_size))

    def forward(self, x: Tensor, idx: Tensor, weights: Tensor) -> Tensor:
        """x [N, D], idx and gate weights [N, K] -> weighted sum of the chosen experts' outputs [N, D]."""
        return self._compute(x, idx, weights, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)
