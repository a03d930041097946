"""Run by tests/test_distributed.py under torchrun: one data-parallel step on half the batch per rank.

Writes `rank{r}.safetensors` (DDP-averaged gradients, local and all-reduced router counts, expert bias and
parameters after one optimizer step) and `rank{r}.json` (the step's loss) into the folder in argv[1].
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.test_training import small
from vpmoe.config import load_config
from vpmoe.training.distributed import all_reduce_sum, init_distributed
from vpmoe.training.loop import Trainer


def main() -> None:
    """One gradient pass and one train_step of the small tiny model, then save what the test compares."""
    out = Path(sys.argv[1])
    cfg = small(load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"), micro_batch_size=2)
    dist = init_distributed("cpu")
    trainer = Trainer(cfg, out / "ckpt", dist, show_progress=False)
    batch = next(trainer.train_data.batches(2, rank=dist.rank, world_size=dist.world_size))
    trainer.ddp(batch.tokens, labels=batch.labels, return_logits=False).loss.backward()
    tensors = {f"grad.{n}": p.grad.clone() for n, p in trainer.model.named_parameters()}
    local = torch.stack([r.expert_counts.clone() for r in trainer.model.routers()])
    tensors["counts.local"] = local
    tensors["counts.global"] = all_reduce_sum(local.clone())
    trainer.optimizer.zero_grad(set_to_none=True)
    for router in trainer.model.routers():
        router.expert_counts.zero_()
    info = trainer.train_step(trainer.train_data.batches(2, rank=dist.rank, world_size=dist.world_size))
    tensors |= {f"param.{n}": p.detach().clone() for n, p in trainer.model.named_parameters()}
    tensors |= {f"bias.{i}": r.expert_bias.clone() for i, r in enumerate(trainer.model.routers())}
    save_file(tensors, str(out / f"rank{dist.rank}.safetensors"))
    (out / f"rank{dist.rank}.json").write_text(json.dumps({"lm_loss": info.lm_loss, "aux_loss": info.aux_loss,
                                                           "grad_norm": info.grad_norm}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
