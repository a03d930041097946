"""The DeepSeek-V3 router with expert bias (Megatron-Core 0.16 `topk_routing_with_score_function`, sigmoid).

Pure functions first (each is the formula, tested against Megatron-Core), then the module that holds
the router weights, the `expert_bias` buffer and the routing counts that drive the bias update.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpmoe.model.fp32 import KeepsFP32
from vpmoe.model.hooks import HookPoint


def group_limited_topk(scores: Tensor, topk: int, num_groups: int, group_topk: int) -> Tensor:
    """Top-k experts inside the best `group_topk` of `num_groups` groups (DeepSeek-V3, arXiv:2412.19437).

    A group's score is the sum of its top `topk // group_topk` scores (Megatron-Core's rule; with
    topk=4, group_topk=4 that is the group's best expert). scores [N, E] -> expert indices [N, topk].
    """
    N, E = scores.shape
    per_group = scores.view(N, num_groups, E // num_groups)  # [N, groups, experts per group]
    group_scores = per_group.topk(topk // group_topk, dim=-1).values.sum(dim=-1)  # [N, groups]
    kept_groups = group_scores.topk(group_topk, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
    masked = scores.masked_fill(~keep.repeat_interleave(E // num_groups, dim=1), float("-inf"))
    return masked.topk(topk, dim=-1).indices


def sigmoid_topk_routing(logits: Tensor, expert_bias: Tensor | None, topk: int, num_groups: int,
                         group_topk: int, scaling_factor: float) -> tuple[Tensor, Tensor, Tensor]:
    """s = sigmoid(z); choose top-k of s + e (group-limited); gates g_i = scale * s_i / (sum_K s_j + 1e-20).

    The expert bias e chooses but never weighs (arXiv:2408.15664). logits [N, E] fp32 ->
    (scores [N, E], topk_idx [N, K], topk_weights [N, K]); gates sum to `scaling_factor`.
    """
    scores = torch.sigmoid(logits.float())
    choice = scores if expert_bias is None else scores + expert_bias
    if num_groups > 1:
        idx = group_limited_topk(choice, topk, num_groups, group_topk)
    else:
        idx = choice.topk(topk, dim=-1).indices
    chosen = scores.gather(1, idx)
    weights = chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20) * scaling_factor
    return scores, idx, weights


def aux_loss_routing(logits: Tensor, topk: int) -> tuple[Tensor, Tensor]:
    """The aux loss's own routing: s^ = s / (sum_all s + 1e-20) with s = sigmoid(z); map = plain top-k of s^.

    No bias, no groups: it differs from the dispatched routing by design. -> (map [N, E] bool, s^ [N, E]).
    """
    scores = torch.sigmoid(logits.float())
    scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    idx = scores.topk(topk, dim=-1).indices
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)
    return routing_map, scores


def seq_aux_loss(logits: Tensor, batch_size: int, topk: int, coeff: float) -> Tensor:
    """Sequence-level aux loss L = (alpha/B) sum_b sum_i f[b,i] P[b,i] (DeepSeek-V3, arXiv:2412.19437).

    Per packed row b of T tokens: f[b,i] = E/(K*T) sum_t m[b,t,i], P[b,i] = (1/T) sum_t s^[b,t,i].
    logits [B*T, E] in batch-major order. Gradient flows through P only; equals alpha at perfect balance.
    """
    routing_map, scores = aux_loss_routing(logits, topk)
    E = logits.shape[-1]
    T = logits.shape[0] // batch_size
    f = routing_map.view(batch_size, T, E).float().sum(dim=1) * (E / (topk * T))  # [B, E]
    P = scores.view(batch_size, T, E).mean(dim=1)  # [B, E]
    return coeff * (f * P).sum() / batch_size


def expert_bias_update(expert_bias: Tensor, counts: Tensor, rate: float) -> Tensor:
    """Aux-loss-free balancing step (arXiv:2408.15664): e_i <- e_i + u * sign(mean(c) - c_i)."""
    counts = counts.float()
    return expert_bias + rate * torch.sign(counts.mean() - counts)


@dataclass(frozen=True, slots=True)
class RouterOutput:
    """What the router hands the experts and the loss."""

    logits: Tensor  # [N, E] fp32, before the sigmoid
    scores: Tensor  # [N, E] fp32 sigmoid scores (unbiased)
    topk_idx: Tensor  # [N, K] int64, chosen experts
    topk_weights: Tensor  # [N, K] fp32 gates, sum to the scaling factor


class DeepSeekV3Router(KeepsFP32):
    """z = W_r x + b_r in fp32, sigmoid scores, group-limited top-k on s + expert_bias, 2.5-scaled gates.

    `expert_bias` [E] is an fp32 buffer (zero init, saved in checkpoints, never touched by the
    optimizer). `expert_counts` [E] accumulates tokens per expert of the real routing while grad is
    enabled, for the bias update once per optimizer step (`apply_bias_update`).
    """

    fp32_names = ("weight", "bias", "expert_bias", "expert_counts")

    def __init__(self, hidden_size: int, num_experts: int, topk: int, num_groups: int, group_topk: int,
                 scaling_factor: float, use_expert_bias: bool, bias_update_rate: float, init_std: float) -> None:
        super().__init__()
        self.num_experts, self.topk = num_experts, topk
        self.num_groups, self.group_topk = num_groups, group_topk
        self.scaling_factor, self.bias_update_rate = scaling_factor, bias_update_rate
        self.use_expert_bias = use_expert_bias
        self.weight = nn.Parameter(torch.randn(num_experts, hidden_size) * init_std)
        self.bias = nn.Parameter(torch.randn(num_experts) * init_std)
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        self.logits, self.scores = HookPoint(), HookPoint()
        self.topk_idx, self.topk_weights = HookPoint(), HookPoint()

    def forward(self, x: Tensor) -> RouterOutput:
        """Route tokens x [N, D]; counts this routing when grad is enabled."""
        with torch.autocast(device_type=x.device.type, enabled=False):  # the router stays fp32 under autocast
            logits = self.logits(F.linear(x.float(), self.weight.float(), self.bias.float()))
            bias = self.expert_bias if self.use_expert_bias else None
            scores, idx, weights = sigmoid_topk_routing(logits, bias, self.topk, self.num_groups, self.group_topk,
                                                        self.scaling_factor)
        scores, idx, weights = self.scores(scores), self.topk_idx(idx), self.topk_weights(weights)
        if torch.is_grad_enabled():
            self.expert_counts += torch.bincount(idx.flatten(), minlength=self.num_experts).float()
        return RouterOutput(logits=logits, scores=scores, topk_idx=idx, topk_weights=weights)

    @torch.no_grad()
    def apply_bias_update(self, counts: Tensor | None = None) -> None:
        """Apply e <- e + u * sign(mean(c) - c) with `counts` (already summed over ranks) or the local
        counts, then reset the counts. A no-op for the bias when expert bias is disabled."""
        counts = self.expert_counts if counts is None else counts
        if self.use_expert_bias:
            self.expert_bias.copy_(expert_bias_update(self.expert_bias, counts, self.bias_update_rate))
        self.expert_counts.zero_()
