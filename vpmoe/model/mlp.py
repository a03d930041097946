"""The ReLU^2 feed-forward network (Primer, arXiv:2109.08668): dense layer 1 and the shared expert."""

import torch
from torch import Tensor, nn


def relu_squared(x: Tensor) -> Tensor:
    """phi(u) = relu(u)^2."""
    return torch.relu(x).square()


class ReluSquaredFFN(nn.Module):
    """y = W2 phi(W1 x + b1) + b2, both projections with bias."""

    def __init__(self, hidden_size: int, ffn_size: int, init_std: float, out_std: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_size, bias=True)
        self.fc2 = nn.Linear(ffn_size, hidden_size, bias=True)
        nn.init.normal_(self.fc1.weight, std=init_std)
        nn.init.normal_(self.fc2.weight, std=out_std)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the FFN to the last dim of `x`."""
        return self.fc2(relu_squared(self.fc1(x)))
