"""Training: schedule, param groups, loss falls, exact resume, safe checkpoints, non-finite stop, bias update."""

import dataclasses
import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch

from vpmoe.cli import main
from vpmoe.config import VpMoEConfig
from vpmoe.model.router import expert_bias_update
from vpmoe.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from vpmoe.training.distributed import DistInfo
from vpmoe.training.loop import NonFiniteError, Trainer
from vpmoe.training.optimizer import build_optimizer, is_decayed, learning_rate

SOLO = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def small(cfg: VpMoEConfig, **training) -> VpMoEConfig:
    """The tiny model with short rows and small batches, so a step takes a fraction of a second."""
    base = dict(seq_length=64, micro_batch_size=2, grad_accum_steps=1, steps=6, warmup_steps=2, eval_every=0,
                checkpoint_every=0, lr=3e-3, min_lr=3e-4)
    return cfg.replace(training=dataclasses.replace(cfg.training, **(base | training)))


def test_learning_rate_warmup_then_cosine(tiny_cfg):
    t = dataclasses.replace(tiny_cfg.training, lr=1.0, min_lr=0.1, warmup_steps=10, steps=110)
    assert learning_rate(0, t) == pytest.approx(0.1)
    assert learning_rate(9, t) == pytest.approx(1.0)
    assert learning_rate(10, t) == pytest.approx(1.0)
    assert learning_rate(60, t) == pytest.approx(0.55)
    assert learning_rate(110, t) == pytest.approx(0.1)
    lrs = [learning_rate(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_param_groups_exclude_biases_norms_sinks_lambdas_and_grape(tiny_cfg):
    from vpmoe import VpMoE

    model = VpMoE(tiny_cfg)
    decayed = {n for n, p in model.named_parameters() if is_decayed(n, p)}
    for name in ["blocks.1.attn.sinks", "blocks.1.attn.value_residual.logit", "grape_m.theta",
                 "blocks.1.input_norm.weight", "blocks.1.attn.q_norm.weight", "blocks.1.ffn.router.bias",
                 "blocks.1.ffn.experts.fc1_bias", "blocks.0.attn.qkv.qkv_bias", "blocks.3.attn.qkv.linear_qkv.bias"]:
        assert name not in decayed, name
    for name in ["embedding.weight", "lm_head.weight", "blocks.1.ffn.experts.fc1_weight", "blocks.1.ffn.router.weight",
                 "blocks.0.attn.qkv.a_q.weight", "blocks.3.attn.linear_proj.weight"]:
        assert name in decayed, name
    opt = build_optimizer(model, tiny_cfg.training)
    assert [g["weight_decay"] for g in opt.param_groups] == [tiny_cfg.training.weight_decay, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert "blocks.1.ffn.router.expert_bias" not in dict(model.named_parameters())


def test_loss_falls_on_the_builtin_corpus(tiny_cfg, tmp_path):
    cfg = small(tiny_cfg, steps=30, warmup_steps=3, lr=1e-2)
    result = Trainer(cfg, tmp_path, SOLO, show_progress=False).run()
    losses = [h["lm_loss"] for h in result.history]
    first, last = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert first > 11.0 and last < first - 1.5, (first, last)


def test_resume_reproduces_the_uninterrupted_run_exactly(tiny_cfg, tmp_path):
    cfg = small(tiny_cfg, steps=6, checkpoint_every=3, grad_accum_steps=2)
    straight = Trainer(cfg, tmp_path / "a", SOLO, show_progress=False).run()
    first = Trainer(small(tiny_cfg, steps=3, checkpoint_every=3, grad_accum_steps=2), tmp_path / "b", SOLO,
                    show_progress=False).run()
    resumed_trainer = Trainer(cfg, tmp_path / "b", SOLO, resume=True, show_progress=False)
    assert resumed_trainer.step == 3
    resumed = resumed_trainer.run()
    losses = [h["lm_loss"] for h in first.history + resumed.history]
    assert losses == [h["lm_loss"] for h in straight.history]
    a = read_checkpoint(latest_checkpoint(tmp_path / "a")).model_state
    b = read_checkpoint(latest_checkpoint(tmp_path / "b")).model_state
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().sum() > 0 for k, v in a.items() if k.endswith("expert_bias"))


def test_bias_update_uses_counts_of_all_micro_batches(tiny_cfg, tmp_path):
    cfg = small(tiny_cfg, grad_accum_steps=3)
    trainer = Trainer(cfg, tmp_path, SOLO, show_progress=False)
    routers = trainer.model.routers()
    before = [r.expert_bias.clone() for r in routers]
    seen = []
    hooks = [r.topk_idx.register_forward_hook(lambda m, a, o, i=i: seen.append((i, o.clone())))
             for i, r in enumerate(routers)]
    batches = trainer.train_data.batches(cfg.training.micro_batch_size)
    info = trainer.train_step(batches)
    for h in hooks:
        h.remove()
    E = cfg.moe.num_experts
    for i, router in enumerate(routers):
        counts = sum(torch.bincount(idx.flatten(), minlength=E) for j, idx in seen if j == i).float()
        assert len([1 for j, _ in seen if j == i]) == 3
        torch.testing.assert_close(info.router_counts[i], counts)
        torch.testing.assert_close(router.expert_bias, expert_bias_update(before[i], counts, 1e-3))
        assert router.expert_counts.sum() == 0


def test_checkpoint_contents_and_load(tiny_cfg, tmp_path):
    cfg = small(tiny_cfg, steps=2)
    Trainer(cfg, tmp_path, SOLO, show_progress=False).run()
    path = latest_checkpoint(tmp_path)
    assert path.name == "checkpoint-000002"
    meta = json.loads((path / "checkpoint.json").read_text())
    assert meta["step"] == 2 and meta["data_position"]["rows_consumed"] == 4
    assert meta["config"]["moe"]["num_experts"] == 16 and meta["code_revision"]
    model, ckpt = load_model(path)
    assert not model.training and ckpt.step == 2
    assert "blocks.1.ffn.router.expert_bias" in ckpt.model_state


def test_interrupted_save_leaves_the_previous_checkpoint_intact(tiny_cfg, tmp_path, monkeypatch):
    cfg = small(tiny_cfg, steps=2)
    trainer = Trainer(cfg, tmp_path, SOLO, show_progress=False)
    trainer.run()
    before = {p.name: p.read_bytes() for p in latest_checkpoint(tmp_path).iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk vanished mid-save")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 3, trainer.model, trainer.optimizer, cfg, {"tokens": 0})
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-000002"]
    assert {p.name: p.read_bytes() for p in latest_checkpoint(tmp_path).iterdir()} == before


def test_checkpoint_errors_name_the_file_and_the_mismatch(tiny_cfg, tmp_path):
    cfg = small(tiny_cfg, steps=1)
    Trainer(cfg, tmp_path, SOLO, show_progress=False).run()
    path = latest_checkpoint(tmp_path)
    other = cfg.replace(moe=dataclasses.replace(cfg.moe, router_group_topk=1))
    with pytest.raises(CheckpointError, match=r"checkpoint\.json: checkpoint from another architecture: "
                                              r"\[moe\]\.router_group_topk is 2 in the checkpoint but 1 in the config"):
        read_checkpoint(path, other)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        read_checkpoint(tmp_path)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 does not match"):
        read_checkpoint(path)


def test_non_finite_gradients_stop_within_one_step_naming_the_tensor(tiny_cfg, tmp_path):
    cfg = small(tiny_cfg, steps=4, checkpoint_every=1)
    trainer = Trainer(cfg, tmp_path, SOLO, show_progress=False)
    batches = trainer.train_data.batches(cfg.training.micro_batch_size)
    trainer.train_step(batches)
    trainer.save()
    saved = {p.name: p.read_bytes() for p in latest_checkpoint(tmp_path).iterdir()}
    bad = trainer.model.blocks[2].ffn.experts.fc2_weight
    hook = bad.register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite gradient in blocks\.2\.ffn\.experts\.fc2_weight"):
        trainer.train_step(batches)
    hook.remove()
    assert {p.name: p.read_bytes() for p in latest_checkpoint(tmp_path).iterdir()} == saved
    with torch.no_grad():
        trainer.model.blocks[1].attn.linear_proj.weight.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match=r"step 2: the LM loss is nan"):
        trainer.train_step(batches)


def test_cli_resume_without_checkpoint_and_bad_data(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "none"), "--resume", "--steps", "1"]) == 2
    assert "no complete checkpoint to resume from" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "missing"), "--steps", "1"]) == 2
    assert "missing" in capsys.readouterr().err


def test_cli_train_prints_losses_and_baseline(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "run"), "--steps", "2", "--micro-batch-size", "1"])
    assert code == 0
    out = capsys.readouterr().out
    assert "for a unigram model of the same training rows" in out and "checkpoint-000002" in out
    baseline = float(out.split(" for a unigram model of the same training rows")[0].split()[-1])
    assert 3.0 < baseline < 9.0 and math.isfinite(baseline)
    assert Path(tmp_path / "run" / "checkpoint-000002" / "checkpoint.json").is_file()


def test_cli_warns_that_bf16_is_emulated_on_an_avx2_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    code = main(["train", "--out", str(tmp_path / "run"), "--steps", "1", "--micro-batch-size", "1",
                 "--dtype", "bfloat16"])
    assert code == 0
    assert "has no bf16 matrix instructions" in capsys.readouterr().err
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert main(["train", "--out", str(tmp_path / "again"), "--steps", "1", "--micro-batch-size", "1"]) == 0
    assert "bf16" not in capsys.readouterr().err
