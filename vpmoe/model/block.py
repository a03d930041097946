"""One pre-norm transformer block on a single residual stream."""

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from vpmoe.config import VpMoEConfig
from vpmoe.model.attention import Attention
from vpmoe.model.mlp import ReluSquaredFFN
from vpmoe.model.moe import MoEFFN
from vpmoe.model.norms import RMSNorm


class TransformerBlock(nn.Module):
    """h = x + Attn(RMSNorm(x)); out = h + FFN(RMSNorm(h)), FFN dense (layer 1) or MoE."""

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

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], v1: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        """x [B, T, D] -> (x, this layer's pre-mix values, aux loss or None for the dense layer)."""
        p = self.hidden_dropout if self.training else 0.0
        attn_out, v_own = self.attn(self.input_norm(x), rotary, v1)
        x = x + F.dropout(attn_out, p=p)
        if self.is_moe:
            ffn_out, aux = self.ffn(self.ffn_norm(x))
        else:
            ffn_out, aux = self.ffn(self.ffn_norm(x)), None
        return x + F.dropout(ffn_out, p=p), v_own, aux
