"""One training step (forward, backward, AdamW) on fixed random tokens: the unit that B1, B7 and the depth bench time.

"fused" is what a run uses by default: kernels resolved from `auto` (blocked attention on CPU, FlexAttention on CUDA;
grouped experts), the chunked LM loss, and the blocks compiled when asked. "reference" is the dense reference
attention, the per-expert loop and the full-logits loss. Both use the trainer's numerics: fp32 weights, bf16 autocast
when `[runtime].dtype` is bfloat16.
"""

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from vpmoe import VpMoE
from vpmoe.config import VpMoEConfig
from vpmoe.training.optimizer import build_optimizer

VARIANTS = ("fused", "reference")


def variant_config(cfg: VpMoEConfig, variant: str, device: torch.device, layers: int | None = None,
                   compile_blocks: bool = False) -> VpMoEConfig:
    """`cfg` set up for `variant` on `device`, optionally cut to `layers` layers (same widths); the fused variant
    compiles its blocks when `compile_blocks`."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    kernels = ({"attention_kernel": "auto", "expert_kernel": "auto", "compile": compile_blocks} if variant == "fused"
               else {"attention_kernel": "reference", "expert_kernel": "reference", "compile": False})
    runtime = dataclasses.replace(cfg.runtime, device=device.type, **kernels)
    model = dataclasses.replace(cfg.model, num_layers=layers) if layers is not None else cfg.model
    return cfg.replace(runtime=runtime, model=model)


def build_model(cfg: VpMoEConfig, device: torch.device) -> VpMoE:
    """The model with its parameters created on `device` directly (a 6B model never passes through host memory)."""
    torch.manual_seed(0)
    with torch.device(device):
        return VpMoE(cfg)


def autocast_for(cfg: VpMoEConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when the config asks for bfloat16, as the trainer runs; nothing for float32."""
    if cfg.runtime.dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_train_step(cfg: VpMoEConfig, variant: str, device: torch.device, batch_size: int, seq_len: int
                    ) -> tuple[VpMoE, Callable[[], None]]:
    """Build the model and optimizer; return them with a function that runs one full optimizer step."""
    model = build_model(cfg, device)
    optimizer = build_optimizer(model, cfg.training)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, cfg.tokenizer.vocab_size, (batch_size, seq_len + 1), generator=gen).to(device)
    tokens, labels = rows[:, :-1], rows[:, 1:]
    full_logits = variant == "reference"

    def step() -> None:
        with autocast_for(cfg, device):
            out = model(tokens, labels=labels, return_logits=full_logits)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step
