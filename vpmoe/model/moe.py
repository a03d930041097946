"""The MoE FFN of layers 2..L: routed experts plus an always-on shared expert."""

import torch
from torch import Tensor, nn

from vpmoe.config import VpMoEConfig
from vpmoe.model.experts import RoutedExperts
from vpmoe.model.mlp import ReluSquaredFFN
from vpmoe.model.router import DeepSeekV3Router, seq_aux_loss


class MoEFFN(nn.Module):
    """y = sum_{i in K(x)} g_i Expert_i(x) + Shared(x); returns y and this layer's seq aux loss.

    The shared expert (weight 1, no gate) uses its fc2 bias; the original code created that bias but
    dropped it in forward, leaving a dead parameter.
    """

    def __init__(self, cfg: VpMoEConfig, expert_kernel: str) -> None:
        super().__init__()
        m, moe = cfg.model, cfg.moe
        out_std = m.init_method_std / (2 * m.num_layers) ** 0.5
        self.aux_loss_coeff = moe.aux_loss_coeff
        self.router = DeepSeekV3Router(
            m.hidden_size, moe.num_experts, moe.topk, moe.router_num_groups, moe.router_group_topk,
            moe.router_topk_scaling_factor, moe.router_enable_expert_bias, moe.router_bias_update_rate,
            m.init_method_std)
        self.experts = RoutedExperts(moe.num_experts, m.hidden_size, m.ffn_hidden_size, m.init_method_std, out_std,
                                     expert_kernel)
        self.shared_expert = (ReluSquaredFFN(m.hidden_size, moe.shared_expert_size, m.init_method_std, out_std)
                              if moe.shared_expert else None)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T, D] -> (y [B, T, D], aux loss scalar fp32)."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)  # tokens in batch-major order, as the per-row aux loss expects
        routing = self.router(flat)
        y = self.experts(flat, routing.topk_idx, routing.topk_weights)
        if self.shared_expert is not None:
            y = y + self.shared_expert(flat)
        if self.aux_loss_coeff > 0 and torch.is_grad_enabled():
            aux = seq_aux_loss(routing.logits, B, self.router.topk, self.aux_loss_coeff)
        else:
            aux = routing.logits.new_zeros(())
        return y.view(B, T, D), aux
