"""Value residual (ResFormer, arXiv:2410.17897): mix each layer's values with layer 1's."""

import math

import torch
from torch import Tensor

from vpmoe.model.fp32 import KeepsFP32


class ValueResidual(KeepsFP32):
    """v <- lambda * v + (1 - lambda) * v1 with lambda = sigmoid(logit): lambda weighs the CURRENT layer.

    One fp32 `logit` per layer (layers 2..L), init ln(init / (1 - init)) so lambda starts at `init`.
    """

    fp32_names = ("logit",)

    def __init__(self, init: float) -> None:
        super().__init__()
        self.init = init
        self.logit = torch.nn.Parameter(torch.tensor(math.log(init / (1.0 - init)), dtype=torch.float32))

    @property
    def lam(self) -> Tensor:
        """lambda = sigmoid(logit), a 0-dim fp32 tensor."""
        return torch.sigmoid(self.logit)

    def forward(self, v: Tensor, v1: Tensor) -> Tensor:
        """Mix this layer's values `v` with layer 1's `v1` (same shape)."""
        lam = self.lam.to(v.dtype)
        return lam * v + (1 - lam) * v1
