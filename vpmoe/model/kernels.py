"""Kernel choice, resolved once at model construction from the runtime config and recorded with runs."""

from dataclasses import asdict, dataclass

import torch

from vpmoe.config import ConfigError, VpMoEConfig


@dataclass(frozen=True, slots=True)
class KernelChoice:
    """Resolved kernels: attention 'reference' | 'blocked'; experts 'reference' | 'grouped'."""

    attention: str
    experts: str

    def as_dict(self) -> dict[str, str]:
        """Plain dict for run provenance."""
        return asdict(self)


def _grouped_mm_aligned(cfg: VpMoEConfig) -> bool:
    # torch._grouped_mm wants row strides that are multiples of 16 bytes (8 bf16 or 4 fp32 values).
    step = 8 if cfg.runtime.dtype == "bfloat16" else 4
    return cfg.model.hidden_size % step == 0 and cfg.model.ffn_hidden_size % step == 0


def resolve_kernels(cfg: VpMoEConfig) -> KernelChoice:
    """Turn `auto` into a concrete kernel and check that an explicit request can run here."""
    attention = cfg.runtime.attention_kernel
    if attention == "auto":
        attention = "blocked"
    experts = cfg.runtime.expert_kernel
    grouped_ok = hasattr(torch, "_grouped_mm") and _grouped_mm_aligned(cfg)
    if experts == "auto":
        experts = "grouped" if grouped_ok else "reference"
    elif experts == "grouped" and not grouped_ok:
        raise ConfigError(
            f"{cfg.source}: [runtime].expert_kernel = \"grouped\" needs hidden_size and ffn_hidden_size to be "
            f"multiples of {8 if cfg.runtime.dtype == 'bfloat16' else 4} for {cfg.runtime.dtype} "
            f"(torch._grouped_mm row alignment), got {cfg.model.hidden_size} and {cfg.model.ffn_hidden_size}")
    return KernelChoice(attention=attention, experts=experts)
