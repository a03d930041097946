"""Model FLOPs of a training step, for model FLOP utilisation (MFU): the work the model needs, whatever the kernels do.

Counted as in PaLM (arXiv:2204.02311, appendix B): 6 FLOPs per token per parameter a token multiplies through, plus
attention's logits and weighted sum, 3 x (2 + 2) H d FLOPs per visible key, with causal and window masks applied.
"""

from vpmoe.config import VpMoEConfig
from vpmoe.params import formula_counts


def matmul_parameters(cfg: VpMoEConfig) -> int:
    """Parameters one token multiplies through: active (routed experts at K/E) minus the embedding table, a lookup."""
    return formula_counts(cfg).active - cfg.tokenizer.vocab_size * cfg.model.hidden_size


def mean_visible_keys(seq_len: int, window: int | None) -> float:
    """Keys a query sees, averaged over positions t = 0..T-1: min(t + 1, W), or t + 1 without a window."""
    limit = window if window is not None else seq_len
    return sum(min(t + 1, limit) for t in range(seq_len)) / seq_len


def training_flops_per_token(cfg: VpMoEConfig, seq_len: int) -> float:
    """6 N + 12 H d sum_layers mean visible keys (forward + backward = 3 x forward)."""
    m = cfg.model
    attention = sum(mean_visible_keys(seq_len, cfg.attention.window_size if kind == "local" else None)
                    for kind in cfg.layer_kinds)
    return 6 * matmul_parameters(cfg) + 12 * m.num_attention_heads * m.head_dim * attention
