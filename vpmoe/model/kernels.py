"""Kernel choice, resolved once at model construction from the runtime config and recorded with runs."""

from dataclasses import asdict, dataclass

import torch

from vpmoe.config import ConfigError, VpMoEConfig


@dataclass(frozen=True, slots=True)
class KernelChoice:
    """Resolved kernels: attention 'reference' | 'blocked' | 'flex'; experts 'reference' | 'grouped'."""

    attention: str
    experts: str

    def as_dict(self) -> dict[str, str]:
        """Plain dict for run provenance."""
        return asdict(self)


def _grouped_mm_aligned(cfg: VpMoEConfig) -> bool:
    # torch._grouped_mm wants row strides that are multiples of 16 bytes (8 bf16 or 4 fp32 values).
    step = 8 if cfg.runtime.dtype == "bfloat16" else 4
    return cfg.model.hidden_size % step == 0 and cfg.model.ffn_hidden_size % step == 0


def run_device_type(cfg: VpMoEConfig) -> str:
    """'cuda' when the run asks for it ([runtime].device = "cuda", or "auto" with a CUDA device present), else 'cpu'."""
    if cfg.runtime.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.runtime.device


def _flex_problem(cfg: VpMoEConfig, device_type: str) -> str | None:
    """Why FlexAttention cannot run this config on `device_type`, or None when it can."""
    if cfg.attention.attention_dropout > 0:
        return (f"cannot apply attention dropout ([attention].attention_dropout = {cfg.attention.attention_dropout}); "
                "use \"blocked\" or \"reference\"")
    if cfg.runtime.compile and device_type == "cpu":
        return ("cannot run under [runtime].compile = true on CPU: compiled FlexAttention on CPU is inference-only "
                "and cannot return the log-sum-exp the sink needs; set compile = false or use \"blocked\"")
    return None


def resolve_kernels(cfg: VpMoEConfig) -> KernelChoice:
    """Turn `auto` into a concrete kernel and check that an explicit request can run here.

    Attention `auto` is "flex" on CUDA (when FlexAttention can run the config) and "blocked" otherwise. An explicit
    "flex" on CPU is accepted for inference: PyTorch's CPU FlexAttention runs forward only.
    """
    attention = cfg.runtime.attention_kernel
    if attention in ("auto", "flex"):
        device_type = run_device_type(cfg)
        flex_problem = _flex_problem(cfg, device_type)
        if attention == "flex" and flex_problem is not None:
            raise ConfigError(f"{cfg.source}: [runtime].attention_kernel = \"flex\" {flex_problem}")
        if attention == "auto":
            attention = "flex" if device_type == "cuda" and flex_problem is None else "blocked"
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
