"""Parameter counts: the original project's budget formula and the counts of the model as built."""

from dataclasses import asdict, dataclass

import torch

from vpmoe.config import VpMoEConfig
from vpmoe.model.transformer import VpMoE


@dataclass(frozen=True, slots=True)
class ParamCounts:
    """Total, active (routed experts counted K/E) and active non-embedding parameter counts."""

    total: int
    active: int
    active_non_embedding: int

    def as_dict(self) -> dict[str, int]:
        """Plain dict for JSON."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Parts:
    embeddings: int  # embedding + LM head
    routed_experts: int  # all routed experts of all MoE layers
    rest: int


def _parts(cfg: VpMoEConfig, include_unbudgeted: bool) -> _Parts:
    """Per-component counts (contract section 8); `include_unbudgeted` adds the TPA QKV bias and the
    value-residual logits, which the original counter predates."""
    m, moe, tpa = cfg.model, cfg.moe, cfg.tpa
    D, V, H, G, d, F = m.hidden_size, cfg.tokenizer.vocab_size, m.num_attention_heads, m.num_query_groups, \
        m.head_dim, m.ffn_hidden_size
    L, n_moe = m.num_layers, cfg.num_moe_layers
    qkv = (H + 2 * G) * d
    proj = H * d * D + D
    gqa = D * qkv + qkv + proj
    tpa_layer = (D * H * tpa.tpa_q_rank + 2 * D * G * tpa.tpa_rank + D * tpa.tpa_q_rank * d
                 + 2 * D * tpa.tpa_rank * d + proj + (qkv if include_unbudgeted else 0))
    attention = sum(tpa_layer if kind == "local" and tpa.use_tpa else gqa for kind in cfg.layer_kinds)
    norms = L * 2 * D + D + (L * 2 * d if m.qk_layernorm else 0)
    sinks = L * H if m.softmax_type == "learnable" else 0
    grape = d // 2
    dense = (2 * D * F + F + D) * (L - n_moe)
    routers = n_moe * (moe.num_experts * D + moe.num_experts)
    shared = n_moe * (2 * D * moe.shared_expert_size + moe.shared_expert_size + D) if moe.shared_expert else 0
    value_residual = (L - 1) if (m.value_residual and include_unbudgeted) else 0
    routed = n_moe * moe.num_experts * (2 * D * F + F + D)
    return _Parts(embeddings=2 * V * D, routed_experts=routed,
                  rest=attention + norms + sinks + grape + dense + routers + shared + value_residual)


def _counts(parts: _Parts, cfg: VpMoEConfig) -> ParamCounts:
    total = parts.embeddings + parts.routed_experts + parts.rest
    active = total - parts.routed_experts + parts.routed_experts * cfg.moe.topk // cfg.moe.num_experts
    return ParamCounts(total=total, active=active, active_non_embedding=active - parts.embeddings)


def budget_counts(cfg: VpMoEConfig) -> ParamCounts:
    """The original `scripts/param_count_megatron.py` budget (no TPA QKV bias, no value-residual logits)."""
    return _counts(_parts(cfg, include_unbudgeted=False), cfg)


def formula_counts(cfg: VpMoEConfig) -> ParamCounts:
    """What the model as built should hold, by formula: the budget plus the parameters it leaves out."""
    return _counts(_parts(cfg, include_unbudgeted=True), cfg)


def instantiated_counts(model: torch.nn.Module) -> ParamCounts:
    """Counts from the real module tree (works on the meta device: nothing is allocated)."""
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    embeddings = sum(p.numel() for name, p in model.named_parameters()
                     if name.startswith(("embedding.", "lm_head.")))
    cfg = model.cfg
    active = total - routed + routed * cfg.moe.topk // cfg.moe.num_experts
    return ParamCounts(total=total, active=active, active_non_embedding=active - embeddings)


def build_on_meta(cfg: VpMoEConfig) -> torch.nn.Module:
    """Build the model on the meta device: shapes and counts without memory."""
    with torch.device("meta"):
        return VpMoE(cfg)
