"""GRAPE positional encodings (arXiv:2512.07805): GRAPE-M on local layers, GRAPE-A (ALiBi) on global."""

import math

import torch
from torch import Tensor

from vpmoe.model.fp32 import KeepsFP32


def grape_m_initial_theta(num_planes: int, base: float, log_freq_scale: float) -> Tensor:
    """theta_i = scale * ln(omega_i) with omega_i = base^(-i/num_planes): exact RoPE frequencies at init."""
    i = torch.arange(num_planes, dtype=torch.float64)
    return (log_freq_scale * (-i / num_planes) * math.log(base)).float()


def grape_m_rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate plane i = dims (i, i + d/2) by angle t*omega_i: y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin.

    x [B, T, heads, d]; cos, sin [T, d/2] (fp32). Computed in fp32, returned in x's dtype.
    """
    half = x.shape[-1] // 2
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half:]
    c = cos[None, :, None, :]  # [1, T, 1, d/2]
    s = sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


class GrapeM(KeepsFP32):
    """GRAPE-M, commuting multi-plane form: RoPE with one learnable frequency vector shared by all heads
    and all local layers, stored as theta = scale * ln(omega) and kept fp32 even in bf16 models."""

    fp32_names = ("theta",)

    def __init__(self, head_dim: int, base: float, log_freq_scale: float) -> None:
        super().__init__()
        self.log_freq_scale = log_freq_scale
        self.theta = torch.nn.Parameter(grape_m_initial_theta(head_dim // 2, base, log_freq_scale))

    @property
    def omega(self) -> Tensor:
        """Angular frequencies omega_i = exp(theta_i / scale), [d/2] fp32."""
        return torch.exp(self.theta / self.log_freq_scale)

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        """cos and sin of t*omega_i for positions t = 0..seq_len-1, each [T, d/2] fp32."""
        t = torch.arange(seq_len, device=self.theta.device, dtype=torch.float32)
        angles = t[:, None] * self.omega[None, :]  # [T, d/2]
        return torch.cos(angles), torch.sin(angles)


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi slopes m_h = 2^(-8(h+1)/H) (arXiv:2108.12409); for H = 8 this is 1/2 ... 1/256."""
    h = torch.arange(num_heads, dtype=torch.float64)
    return torch.pow(2.0, -8.0 * (h + 1) / num_heads).float()
