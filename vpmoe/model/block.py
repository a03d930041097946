"""One pre-norm transformer block on a single residual stream."""

import functools
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpmoe.config import VpMoEConfig
from vpmoe.model.attention import Attention
from vpmoe.model.flex_attention import FlexMasks
from vpmoe.model.mlp import ReluSquaredFFN
from vpmoe.model.moe import MoEFFN
from vpmoe.model.norms import RMSNorm


def attention_residual(block: "TransformerBlock", x: Tensor, rotary: tuple[Tensor, Tensor], v1: Tensor | None,
                       masks: FlexMasks | None) -> tuple[Tensor, Tensor]:
    """h = x + Attn(RMSNorm(x)) of one block -> (h [B, T, D], the block's pre-mix values for the value residual)."""
    p = block.hidden_dropout if block.training else 0.0
    attn_out, v_own = block.attn(block.input_norm(x), rotary, v1, masks)
    return x + F.dropout(attn_out, p=p), v_own


@functools.cache
def compiled_attention_residual() -> Callable[..., tuple[Tensor, Tensor]]:
    """`attention_residual` compiled once for every block, so blocks of the same kind share compiled code."""
    return torch.compile(attention_residual)


class TransformerBlock(nn.Module):
    """h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h)), FFN dense (layer 1) or MoE.

    With `[runtime].compile` the attention half (norm, attention, residual) is compiled once here; the FFN half
    stays eager because the routed experts' `torch._grouped_mm` compiles for bf16 inputs only, and under autocast
    with fp32 weights its inputs stay fp32.
    """

    def __init__(self, cfg: VpMoEConfig, layer: int, kind: Literal["local", "global"], is_moe: bool,
                 attention_kernel: str, expert_kernel: str) -> None:
        super().__init__()
        m = cfg.model
        self.layer, self.kind, self.is_moe = layer, kind, is_moe
        self.hidden_dropout = m.hidden_dropout
        self.input_norm = RMSNorm(m.hidden_size, m.norm_epsilon)
        self.attn = Attention(cfg, layer, kind, attention_kernel)
        self.ffn_norm = RMSNorm(m.hidden_size, m.norm_epsilon)
        out_std = m.init_method_std / (2 * m.num_layers) ** 0.5
        self.ffn: nn.Module = (MoEFFN(cfg, expert_kernel) if is_moe
                               else ReluSquaredFFN(m.hidden_size, m.ffn_hidden_size, m.init_method_std, out_std))
        self._attention_half = compiled_attention_residual() if cfg.runtime.compile else attention_residual

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], v1: Tensor | None, masks: FlexMasks | None = None
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        """x [B, T, D] -> (x, this layer's pre-mix values, aux loss or None for the dense layer)."""
        x, v_own = self._attention_half(self, x, rotary, v1, masks)
        p = self.hidden_dropout if self.training else 0.0
        if self.is_moe:
            ffn_out, aux = self.ffn(self.ffn_norm(x))
        else:
            ffn_out, aux = self.ffn(self.ffn_norm(x)), None
        return x + F.dropout(ffn_out, p=p), v_own, aux
