"""The attention sublayer: sliding-window TPA with GRAPE-M (local) or full causal GQA with ALiBi (global)."""

from typing import Literal

import torch
from torch import Tensor, nn

from vpmoe.config import VpMoEConfig
from vpmoe.model.attention_math import attention_local_blocked, attention_reference, attention_sdpa
from vpmoe.model.flex_attention import FlexMasks, attention_flex, flex_function
from vpmoe.model.hooks import HookPoint
from vpmoe.model.kernels import run_device_type
from vpmoe.model.norms import RMSNorm
from vpmoe.model.positional import alibi_slopes, grape_m_rotate
from vpmoe.model.tpa import GQAProjection, TPAProjection
from vpmoe.model.value_residual import ValueResidual


class Attention(nn.Module):
    """One attention sublayer, in the contract's order: QKV + bias -> QK-norm -> GRAPE-M (local only)
    -> value mix -> scaled logits (+ ALiBi, global) -> mask -> sink softmax -> output projection.

    Hook points: `q` [B,T,H,d] and `k` [B,T,G,d] as they enter the logits, `v` [B,T,G,d] after the value
    mix, and `probs` [B,H,T,T], which only the reference kernel materialises and fires. The kernel ('reference',
    'blocked': blocked local + SDPA global, or 'flex': FlexAttention for both) is fixed at construction.
    """

    def __init__(self, cfg: VpMoEConfig, layer: int, kind: Literal["local", "global"], kernel: str) -> None:
        super().__init__()
        m = cfg.model
        self.layer, self.kind, self.kernel = layer, kind, kernel
        self.window = cfg.attention.window_size if kind == "local" else None
        self.dropout_p = cfg.attention.attention_dropout
        H, G, d = m.num_attention_heads, m.num_query_groups, m.head_dim
        out_std = m.init_method_std / (2 * m.num_layers) ** 0.5
        if kind == "local" and cfg.tpa.use_tpa:
            self.qkv: nn.Module = TPAProjection(m.hidden_size, H, G, d, cfg.tpa.tpa_q_rank, cfg.tpa.tpa_rank,
                                                m.init_method_std)
        else:
            self.qkv = GQAProjection(m.hidden_size, H, G, d, m.init_method_std)
        self.q_norm = RMSNorm(d, m.norm_epsilon) if m.qk_layernorm else None
        self.k_norm = RMSNorm(d, m.norm_epsilon) if m.qk_layernorm else None
        self.value_residual = ValueResidual(m.value_residual_init) if m.value_residual and layer > 1 else None
        self.sinks = nn.Parameter(torch.randn(H) * m.init_method_std) if m.softmax_type == "learnable" else None
        slopes = alibi_slopes(H) if kind == "global" and cfg.grape.grape_a else None
        self.register_buffer("alibi_slopes", slopes, persistent=False)
        self.linear_proj = nn.Linear(H * d, m.hidden_size, bias=True)
        nn.init.normal_(self.linear_proj.weight, std=out_std)
        nn.init.zeros_(self.linear_proj.bias)
        self.q, self.k, self.v, self.probs = HookPoint(), HookPoint(), HookPoint(), HookPoint()
        self._flex = flex_function(run_device_type(cfg)) if kernel == "flex" else None

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], v1: Tensor | None, masks: FlexMasks | None = None
                ) -> tuple[Tensor, Tensor]:
        """x [B, T, D] (normed) -> (output [B, T, D], this layer's pre-mix values for the value residual).

        `masks` are the FlexAttention block masks for this sequence length, needed by the 'flex' kernel only.
        """
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.kind == "local":
            cos, sin = rotary
            q, k = grape_m_rotate(q, cos, sin), grape_m_rotate(k, cos, sin)
        v_own = v
        if self.value_residual is not None:
            if v1 is None:
                raise ValueError(f"layer {self.layer}: value residual needs layer 1's values, got None")
            v = self.value_residual(v, v1)
        q, k, v = self.q(q), self.k(k), self.v(v)
        dropout_p = self.dropout_p if self.training else 0.0
        if self.kernel == "reference":
            out, probs = attention_reference(q, k, v, self.sinks, self.window, self.alibi_slopes, dropout_p)
            self.probs(probs)
        elif self._flex is not None:
            if masks is None:
                raise ValueError(f"layer {self.layer}: the flex kernel needs the block masks, got None")
            out = attention_flex(q, k, v, self.sinks, masks[self.kind], self.alibi_slopes, self._flex)
        elif self.kind == "local":
            out = attention_local_blocked(q, k, v, self.sinks, self.window, dropout_p)
        else:
            out = attention_sdpa(q, k, v, self.sinks, None, self.alibi_slopes, dropout_p)
        out = out.reshape(B, T, -1)  # [B, T, H*d], heads concatenated
        return self.linear_proj(out), v_own
