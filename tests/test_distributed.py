"""Data-parallel training over gloo: two ranks with half the batch each equal one rank with all of it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT
from tests.test_training import SOLO, small
from vpmoe.training.distributed import all_reduce_sum
from vpmoe.training.loop import Trainer


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    worker = ROOT / "tests" / "dist_worker.py"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(worker), str(out)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _single_rank(tiny_cfg, tmp_path):
    cfg = small(tiny_cfg, micro_batch_size=4)
    trainer = Trainer(cfg, tmp_path, SOLO, show_progress=False)
    batch = next(trainer.train_data.batches(4))
    trainer.model(batch.tokens, labels=batch.labels, return_logits=False).loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    counts = torch.stack([r.expert_counts.clone() for r in trainer.model.routers()])
    trainer.optimizer.zero_grad(set_to_none=True)
    for router in trainer.model.routers():
        router.expert_counts.zero_()
    info = trainer.train_step(trainer.train_data.batches(4))
    return trainer, grads, counts, info


def test_two_ranks_equal_one_rank_with_the_whole_batch(two_ranks, tiny_cfg, tmp_path):
    trainer, grads, _, info = _single_rank(tiny_cfg, tmp_path)
    ranks = [load_file(str(two_ranks / f"rank{r}.safetensors")) for r in (0, 1)]
    meta = [json.loads((two_ranks / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert meta[0]["lm_loss"] == meta[1]["lm_loss"] == pytest.approx(info.lm_loss, rel=1e-5)
    assert meta[0]["aux_loss"] == pytest.approx(info.aux_loss, rel=1e-5)
    assert meta[0]["grad_norm"] == pytest.approx(info.grad_norm, rel=1e-4)
    for name, grad in grads.items():
        for r in (0, 1):
            torch.testing.assert_close(ranks[r][f"grad.{name}"], grad, rtol=1e-4, atol=1e-7, msg=name)
    # Adam's first step moves a weight by lr * g / (|g| + eps): where |g| is near eps, a float-rounding
    # difference dg between the two runs' gradients moves it by up to lr * |dg| / eps (lr: the peak), so that
    # is allowed; the gradients themselves are compared to 1e-4 above.
    t = trainer.cfg.training
    for name, param in trainer.model.named_parameters():
        gap = (ranks[0][f"param.{name}"] - param.detach()).abs()
        rounding = (ranks[0][f"grad.{name}"] - grads[name]).abs()
        allowed = 1e-6 + 1e-4 * param.detach().abs() + t.lr * rounding / t.adam_eps
        assert (gap <= allowed).all(), f"{name}: parameters differ by {gap.max():.3g} after one step"
    for i, router in enumerate(trainer.model.routers()):
        assert torch.equal(ranks[0][f"bias.{i}"], router.expert_bias) and torch.equal(ranks[1][f"bias.{i}"],
                                                                                      router.expert_bias)


def test_expert_bias_counts_are_summed_over_ranks(two_ranks, tiny_cfg, tmp_path):
    _, _, counts, _ = _single_rank(tiny_cfg, tmp_path)
    local = [load_file(str(two_ranks / f"rank{r}.safetensors"))["counts.local"] for r in (0, 1)]
    summed = load_file(str(two_ranks / "rank0.safetensors"))["counts.global"]
    assert not torch.equal(local[0], local[1]), "ranks saw different tokens"
    torch.testing.assert_close(local[0] + local[1], counts)
    torch.testing.assert_close(summed, counts)
    torch.testing.assert_close(all_reduce_sum(counts.clone()), counts)  # alone, all-reduce is the identity
