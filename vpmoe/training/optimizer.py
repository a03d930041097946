"""AdamW with parameter groups, and the warmup + cosine learning-rate schedule."""

import math

import torch
from torch import nn

from vpmoe.config import TrainingConfig

NO_DECAY_SUFFIXES = ("bias", "sinks", "value_residual.logit", "grape_m.theta", "qkv_bias")


def is_decayed(name: str, param: torch.Tensor) -> bool:
    """Weight decay only on weight matrices: never on biases, norms, sinks, value-residual logits, GRAPE-M."""
    return param.dim() >= 2 and not name.endswith(NO_DECAY_SUFFIXES)


def build_optimizer(model: nn.Module, cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW over two groups, 'decay' and 'no_decay', in parameter-name order (stable across runs)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if is_decayed(name, param) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             foreach=False)


def learning_rate(step: int, cfg: TrainingConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine from lr to min_lr at `steps` (step counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
