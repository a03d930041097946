"""Tensor Product Attention factors (TPA, arXiv:2501.06425) for the local layers."""

import torch
from torch import Tensor, nn


def tpa_reconstruct(a: Tensor, b: Tensor) -> Tensor:
    """x[n] = (1/R) sum_r A[n, r] B[r]: a [..., N, R], b [..., R, d] -> [..., N, d]."""
    return torch.matmul(a, b) / a.shape[-1]


class TPAProjection(nn.Module):
    """q, k, v from six bias-free maps of the normed input, rank tpa_q_rank for q and tpa_rank for k and v.

    A and B for K/V have one row per KV group (not per head); the (H + 2G) * d QKV bias is added after
    reconstruction. Returns q [B, T, H, d], k and v [B, T, G, d].
    """

    def __init__(self, hidden_size: int, heads: int, groups: int, head_dim: int, q_rank: int, kv_rank: int,
                 init_std: float) -> None:
        super().__init__()
        self.heads, self.groups, self.head_dim = heads, groups, head_dim
        self.q_rank, self.kv_rank = q_rank, kv_rank
        self.a_q = nn.Linear(hidden_size, heads * q_rank, bias=False)
        self.a_k = nn.Linear(hidden_size, groups * kv_rank, bias=False)
        self.a_v = nn.Linear(hidden_size, groups * kv_rank, bias=False)
        self.b_q = nn.Linear(hidden_size, q_rank * head_dim, bias=False)
        self.b_k = nn.Linear(hidden_size, kv_rank * head_dim, bias=False)
        self.b_v = nn.Linear(hidden_size, kv_rank * head_dim, bias=False)
        self.qkv_bias = nn.Parameter(torch.zeros((heads + 2 * groups) * head_dim))
        for lin in (self.a_q, self.a_k, self.a_v, self.b_q, self.b_k, self.b_v):
            nn.init.normal_(lin.weight, std=init_std)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project `x` [B, T, D] to q, k, v."""
        B, T, _ = x.shape
        H, G, d = self.heads, self.groups, self.head_dim
        q = tpa_reconstruct(self.a_q(x).view(B, T, H, self.q_rank), self.b_q(x).view(B, T, self.q_rank, d))
        k = tpa_reconstruct(self.a_k(x).view(B, T, G, self.kv_rank), self.b_k(x).view(B, T, self.kv_rank, d))
        v = tpa_reconstruct(self.a_v(x).view(B, T, G, self.kv_rank), self.b_v(x).view(B, T, self.kv_rank, d))
        bias_q, bias_k, bias_v = self.qkv_bias.split([H * d, G * d, G * d])
        return q + bias_q.view(H, d), k + bias_k.view(G, d), v + bias_v.view(G, d)


class GQAProjection(nn.Module):
    """q, k, v from one [(H + 2G) * d, D] matrix with bias (global layers): q [B,T,H,d], k, v [B,T,G,d]."""

    def __init__(self, hidden_size: int, heads: int, groups: int, head_dim: int, init_std: float) -> None:
        super().__init__()
        self.heads, self.groups, self.head_dim = heads, groups, head_dim
        self.linear_qkv = nn.Linear(hidden_size, (heads + 2 * groups) * head_dim, bias=True)
        nn.init.normal_(self.linear_qkv.weight, std=init_std)
        nn.init.zeros_(self.linear_qkv.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Project `x` [B, T, D] to q, k, v."""
        B, T, _ = x.shape
        H, G, d = self.heads, self.groups, self.head_dim
        q, k, v = self.linear_qkv(x).split([H * d, G * d, G * d], dim=-1)
        return q.view(B, T, H, d), k.view(B, T, G, d), v.view(B, T, G, d)
