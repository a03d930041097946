"""The training loop: AdamW, warmup + cosine, accumulation, LM + aux loss, the expert-bias update once per
optimizer step from all micro-batches and ranks, held-out evaluation, checkpoints, and a per-step observer.

The loop knows nothing of recording: an observer (see `StepObserver`) may run the micro-batch forward
itself (to trace it) and receives a `StepInfo` after every optimizer step.
"""

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vpmoe.config import VpMoEConfig
from vpmoe.model.transformer import VpMoE, VpMoEOutput
from vpmoe.training.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_model_state,
    read_checkpoint,
    restore_optimizer,
    save_checkpoint,
)
from vpmoe.training.data import Batch, PackedDataset
from vpmoe.training.distributed import DistInfo, all_reduce_mean, all_reduce_sum
from vpmoe.training.optimizer import build_optimizer, learning_rate


class NonFiniteError(RuntimeError):
    """The loss or a gradient became NaN or infinite; the message names the step and the first tensor."""


@dataclass
class StepInfo:
    """What happened in one optimizer step (global figures, summed or averaged over ranks)."""

    step: int  # optimizer steps completed, 1-based
    lm_loss: float
    aux_loss: float
    aux_losses: list[float]  # per MoE layer, in layer order
    lr: float
    grad_norm: float
    tokens: int  # tokens trained so far, all ranks
    tokens_per_s: float
    step_time_s: float
    router_counts: Tensor  # [MoE layers, E] tokens per expert of this step's real routing, all ranks
    eval_loss: float | None = None
    batch: Batch | None = None  # this rank's last micro-batch


class StepObserver(Protocol):
    """Receives every step; may run the micro-batch forward itself (for example inside a trace)."""

    def forward(self, model: nn.Module, batch: Batch, step: int, micro: int) -> VpMoEOutput:
        """Run the training forward of one micro-batch and return the model's output."""
        ...

    def on_step(self, info: StepInfo, model: VpMoE) -> None:
        """Called after each optimizer step and bias update."""
        ...


@dataclass
class TrainResult:
    """Summary of a finished run."""

    steps: int
    final_lm_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    last_eval_loss: float | None = None


def _autocast(cfg: VpMoEConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.runtime.dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def first_non_finite_grad(model: nn.Module) -> str | None:
    """Name of the first parameter (in module order) whose gradient holds NaN or inf."""
    for name, param in model.named_parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            return name
    return None


@torch.no_grad()
def evaluate(model: VpMoE, dataset: PackedDataset, cfg: VpMoEConfig, device: torch.device) -> float:
    """Mean held-out LM loss over the first `eval_batches` batches (same rows every time)."""
    was_training = model.training
    model.eval()
    losses = []
    batches = dataset.batches(cfg.training.micro_batch_size)
    for _ in range(cfg.training.eval_batches):
        batch = next(batches)
        with _autocast(cfg, device):
            out = model(batch.tokens.to(device), labels=batch.labels.to(device), return_logits=False)
        losses.append(out.lm_loss.item())
    model.train(was_training)
    return sum(losses) / len(losses)


class Trainer:
    """Owns the model, optimizer and data stream of one run; `run()` trains to `cfg.training.steps`."""

    def __init__(self, cfg: VpMoEConfig, out_dir: Path, dist: DistInfo, *, data: str | None = None,
                 text_field: str = "text", resume: bool = False, observer: StepObserver | None = None,
                 show_progress: bool = True) -> None:
        self.cfg, self.out_dir, self.dist, self.observer = cfg, Path(out_dir), dist, observer
        t = cfg.training
        if dist.device.type == "cpu":
            # CPU kernels such as index_add pick thread-dependent summation orders; exact resume needs them fixed.
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(t.seed)
        self.model = VpMoE(cfg).to(dist.device)
        self.optimizer = build_optimizer(self.model, t)
        self.step = 0
        self.rows_consumed = 0
        self.tokens = 0
        self.show_progress = show_progress and dist.is_main
        if resume:
            self._resume()
        self.train_data = PackedDataset(data, split="train", seq_length=t.seq_length, seed=t.seed,
                                        text_field=text_field)
        self.eval_data = (PackedDataset(data, split="heldout", seq_length=t.seq_length, seed=t.seed,
                                        text_field=text_field) if t.eval_every else None)
        self.ddp: nn.Module = (DistributedDataParallel(self.model, broadcast_buffers=False)
                               if dist.world_size > 1 else self.model)

    @property
    def global_batch_rows(self) -> int:
        """Rows per optimizer step over all ranks and micro-batches."""
        t = self.cfg.training
        return t.micro_batch_size * t.grad_accum_steps * self.dist.world_size

    def _resume(self) -> None:
        path = latest_checkpoint(self.out_dir)
        ckpt = read_checkpoint(path, self.cfg)
        load_model_state(self.model, ckpt)
        names = {id(p): n for n, p in self.model.named_parameters()}
        restore_optimizer(self.optimizer, names, ckpt.optimizer_state, path)
        if "rng.torch_cpu" in ckpt.optimizer_state:
            torch.set_rng_state(ckpt.optimizer_state["rng.torch_cpu"])
        self.step = ckpt.step
        self.rows_consumed = int(ckpt.meta["data_position"]["rows_consumed"])
        self.tokens = int(ckpt.meta["tokens"])

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 only; other ranks wait)."""
        path = None
        if self.dist.is_main and not (self.out_dir / f"checkpoint-{self.step:06d}").exists():
            extra: dict[str, Any] = {
                "tokens": self.tokens, "world_size": self.dist.world_size,
                "data_position": {"rows_consumed": self.rows_consumed, "split": "train",
                                  "description": self.train_data.describe()},
                "kernels": self.model.kernels.as_dict(),
            }
            path = save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, self.cfg, extra,
                                   rng_state=torch.get_rng_state())
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return path

    def _forward(self, batch: Batch, micro: int) -> VpMoEOutput:
        if self.observer is not None:
            return self.observer.forward(self.ddp, batch, self.step, micro)
        return self.ddp(batch.tokens, labels=batch.labels, return_logits=False)

    def train_step(self, batches: Iterator[Batch]) -> StepInfo:
        """One optimizer step: accumulate micro-batches, check finiteness, clip, step, update expert bias."""
        t, device = self.cfg.training, self.dist.device
        start = time.perf_counter()
        lr = learning_rate(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        lm_total, aux_total, aux_layers = 0.0, 0.0, None
        batch = None
        for micro in range(t.grad_accum_steps):
            batch = next(batches)
            batch = Batch(tokens=batch.tokens.to(device), labels=batch.labels.to(device), domains=batch.domains,
                          first_row=batch.first_row)
            last = micro == t.grad_accum_steps - 1
            sync = contextlib.nullcontext() if last or self.ddp is self.model else self.ddp.no_sync()
            with sync:
                with _autocast(self.cfg, device):
                    out = self._forward(batch, micro)
                if not torch.isfinite(out.lm_loss):
                    raise NonFiniteError(f"step {self.step + 1}: the LM loss is {out.lm_loss.item()} "
                                         f"(micro-batch {micro}, rows from {batch.first_row})")
                bad = [i for i, a in enumerate(out.aux_losses.tolist()) if not math.isfinite(a)]
                if bad:
                    layer = [b.layer for b in self.model.blocks if b.is_moe][bad[0]]
                    raise NonFiniteError(f"step {self.step + 1}: the aux loss of layer {layer} is not finite")
                (out.loss / t.grad_accum_steps).backward()
            lm_total += out.lm_loss.item() / t.grad_accum_steps
            aux_total += out.aux_loss.item() / t.grad_accum_steps
            layer_aux = out.aux_losses.detach() / t.grad_accum_steps
            aux_layers = layer_aux if aux_layers is None else aux_layers + layer_aux
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if not torch.isfinite(norm):  # checked before clipping, which would spread NaN to every gradient
            name = first_non_finite_grad(self.model) or "the gradient norm"
            raise NonFiniteError(f"step {self.step + 1}: non-finite gradient in {name}")
        if t.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), t.grad_clip, norm)
        grad_norm = float(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        routers = self.model.routers()
        counts = torch.stack([r.expert_counts for r in routers]) if routers else torch.zeros(0, 0, device=device)
        all_reduce_sum(counts)  # expert-bias counts of all micro-batches AND all ranks
        for router, c in zip(routers, counts, strict=True):
            router.apply_bias_update(c)
        self.step += 1
        self.rows_consumed += self.global_batch_rows
        step_tokens = self.global_batch_rows * t.seq_length
        self.tokens += step_tokens
        elapsed = time.perf_counter() - start
        return StepInfo(step=self.step, lm_loss=all_reduce_mean(lm_total, device),
                        aux_loss=all_reduce_mean(aux_total, device),
                        aux_losses=[all_reduce_mean(a, device) for a in aux_layers.tolist()], lr=lr,
                        grad_norm=grad_norm, tokens=self.tokens, tokens_per_s=step_tokens / elapsed,
                        step_time_s=elapsed, router_counts=counts.cpu(), batch=batch)

    def run(self) -> TrainResult:
        """Train until `cfg.training.steps`, evaluating and checkpointing on schedule; save at the end."""
        t = self.cfg.training
        batches = self.train_data.batches(t.micro_batch_size, start_row=self.rows_consumed,
                                          rank=self.dist.rank, world_size=self.dist.world_size)
        result = TrainResult(steps=self.step, final_lm_loss=float("nan"))
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.show_progress, unit="step",
                   dynamic_ncols=True, desc="train")
        self.model.train()
        while self.step < t.steps:
            info = self.train_step(batches)
            if self.eval_data is not None and t.eval_every and self.step % t.eval_every == 0:
                info.eval_loss = all_reduce_mean(evaluate(self.model, self.eval_data, self.cfg, self.dist.device),
                                                 self.dist.device)
                result.last_eval_loss = info.eval_loss
            if self.observer is not None:
                self.observer.on_step(info, self.model)
            result.history.append({"step": info.step, "lm_loss": info.lm_loss, "aux_loss": info.aux_loss,
                                   "tokens_per_s": info.tokens_per_s, "eval_loss": info.eval_loss or float("nan")})
            result.final_lm_loss = info.lm_loss
            bar.set_postfix(loss=f"{info.lm_loss:.3f}", aux=f"{info.aux_loss:.2e}",
                            tok_s=f"{info.tokens_per_s:,.0f}", refresh=False)
            bar.update(1)
            if t.checkpoint_every and self.step % t.checkpoint_every == 0:
                self.save()
        bar.close()
        self.save()
        result.steps = self.step
        result.checkpoints = list_checkpoints(self.out_dir)
        return result
