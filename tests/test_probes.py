"""Recording through nnsight: statistics against plain oracles, and a recorded run against the router."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from analysis import metrics, queries
from analysis.probes import (
    Recorder,
    attention_probabilities,
    attention_summary,
    choice_overlap,
    evaluation_batches,
    probe_prompts,
    routing_summary,
    run_manifest,
    sample_queries,
)
from analysis.store import Store
from tests.conftest import ROOT
from tests.test_training import SOLO, small
from vpmoe.model.attention_math import attention_reference
from vpmoe.model.positional import alibi_slopes
from vpmoe.model.router import DeepSeekV3Router, seq_aux_loss, sigmoid_topk_routing
from vpmoe.training.data import PackedDataset
from vpmoe.training.loop import Trainer


def test_choice_overlap_matches_map_disagreement(gen):
    a = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(50)])
    b = torch.stack([torch.randperm(16, generator=gen)[:4] for _ in range(50)])
    assert 1 - choice_overlap(a, b, 16).item() == pytest.approx(metrics.map_disagreement(a.numpy(), b.numpy()))


def test_routing_summary_against_loops(gen):
    router = DeepSeekV3Router(32, 16, 4, 4, 2, 2.5, True, 1e-3, 0.02)
    with torch.no_grad():
        router.expert_bias.copy_(torch.randn(16, generator=gen) * 0.2)
    logits = torch.randn(60, 16, generator=gen)
    _, idx, _ = sigmoid_topk_routing(logits, router.expert_bias, 4, 4, 2, 2.5)
    out = routing_summary(logits, idx, router, batch_size=3)
    assert torch.equal(out[:16], torch.bincount(idx.flatten(), minlength=16).float())
    _, unbiased, _ = sigmoid_topk_routing(logits, None, 4, 4, 2, 2.5)
    changed = sum(len(set(idx[t].tolist()) - set(unbiased[t].tolist())) for t in range(60)) / (60 * 4)
    s = torch.sigmoid(logits)
    aux_top = (s / s.sum(1, keepdim=True)).topk(4, dim=1).indices
    disagree = sum(len(set(idx[t].tolist()) - set(aux_top[t].tolist())) for t in range(60)) / (60 * 4)
    assert out[16].item() == pytest.approx(changed) and changed > 0
    assert out[17].item() == pytest.approx(disagree) and disagree > 0
    assert out[18].item() == pytest.approx(seq_aux_loss(logits, 3, 4, 1.0).item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["local", "global"])
def test_attention_statistics_from_q_and_k_match_the_reference_kernel(gen, kind):
    T, H, G, d, W = 70, 4, 2, 8, 16
    q, k, v = (torch.randn(1, T, n, d, generator=gen) for n in (H, G, G))
    sink = torch.randn(H, generator=gen)
    window, slopes = (W, None) if kind == "local" else (None, alibi_slopes(H))
    _, ref_probs = attention_reference(q, k, v, sink, window, slopes)
    queries_ = sample_queries(T, 20, q.device)
    probs = attention_probabilities(q[0], k[0], sink, window, slopes, queries_)
    torch.testing.assert_close(probs, ref_probs[0][:, queries_], rtol=1e-5, atol=1e-6)
    summary = attention_summary(probs, queries_, W, kind == "local").numpy()
    full = ref_probs[0].numpy()  # [H, T, T]: the metrics functions take whole (query, key) grids
    picked = queries_.numpy()
    expected_window = (metrics.window_edge_mass(full, W) if kind == "local" else metrics.beyond_window_mass(full, W))
    for h in range(H):
        assert summary[h, 0] == pytest.approx(metrics.attention_entropy(full)[h, picked].mean(), rel=1e-4)
        assert summary[h, 1] == pytest.approx((1 - full[h].sum(-1))[picked].mean(), rel=1e-4)
        assert summary[h, 2] == pytest.approx(metrics.mean_attention_distance(full)[h, picked].mean(), rel=1e-4)
        assert summary[h, 3] == pytest.approx(expected_window[h, picked].mean(), rel=1e-4, abs=1e-7)


def test_sample_queries_are_bounded_and_include_the_last():
    q = sample_queries(1000, 37, torch.device("cpu"))
    assert len(q) <= 37 and q[-1] == 999 and q[0] == 0 and torch.all(q[1:] > q[:-1])
    assert torch.equal(sample_queries(10, 50, torch.device("cpu")), torch.arange(10))


@pytest.fixture(scope="module")
def recorded(tiny_cfg, tmp_path_factory):
    """Train 6 steps with recording; keep the router's own counts of every step beside the store."""
    root = tmp_path_factory.mktemp("store")
    cfg = small(tiny_cfg, steps=6, grad_accum_steps=2)
    cfg = cfg.replace(recording=dataclasses.replace(cfg.recording, attention_every=2, probe_every=3,
                                                    probe_tokens=24))
    store = Store(root)
    trainer = Trainer(cfg, root / "ckpt", SOLO, show_progress=False)
    writer = store.create_run("r1", run_manifest(cfg, trainer.model, {"source": "builtin"}, "test"))
    prompts = probe_prompts(PackedDataset(None, split="heldout", seq_length=64), 24)
    recorder = Recorder(trainer.model, writer, prompts)
    counts, lambdas, aux = [], [], []

    class Spy:
        def forward(self, model, batch, step, micro):
            return recorder.forward(model, batch, step, micro)

        def on_step(self, info, model):
            counts.append(info.router_counts.clone())
            aux.append(info.aux_losses)
            lambdas.append({b.layer: b.attn.value_residual.lam.item() for b in model.blocks[1:]})
            recorder.on_step(info, model)

    trainer.observer = Spy()
    trainer.run()
    writer.close()
    return store, cfg, counts, lambdas, aux, prompts


def test_recorded_loads_equal_the_routers_own_counts(recorded):
    store, cfg, counts, *_ = recorded
    load = queries.expert_load(store, "r1", step_range=(1, 6))
    for step in range(1, 7):
        rows = load[load.step == step].sort_values(["layer", "expert"])
        assert list(rows.layer.unique()) == list(range(2, 9))
        got = rows.tokens.to_numpy().reshape(7, cfg.moe.num_experts)
        np.testing.assert_array_equal(got, counts[step - 1].numpy().astype(np.int64))


def test_layer_stats_lambdas_and_aux_losses(recorded):
    store, _, _, lambdas, aux, _ = recorded
    stats = queries.layer_stats(store, "r1")
    assert sorted(stats.step.unique()) == [1, 2, 3, 4, 5, 6]
    for step in (1, 6):
        rows = stats[stats.step == step].set_index("layer")
        assert np.isnan(rows.loc[1, "value_residual_lambda"]) and np.isnan(rows.loc[1, "aux_loss"])
        for layer in range(2, 9):
            assert rows.loc[layer, "value_residual_lambda"] == pytest.approx(lambdas[step - 1][layer], rel=1e-6)
            assert rows.loc[layer, "aux_loss"] == pytest.approx(aux[step - 1][layer - 2], rel=1e-4)
            assert 0 <= rows.loc[layer, "bias_override_rate"] <= 1
            assert 0 < rows.loc[layer, "aux_map_disagreement"] <= 1
    bias = queries.expert_bias(store, "r1", step=6)
    assert len(bias) == 7 * 16 and bias.bias.abs().max() == pytest.approx(6e-3, abs=1e-6)


def test_attention_and_probe_rows(recorded):
    store, *_, prompts = recorded
    att = queries.attention_stats(store, "r1", step_range=(1, 6))
    assert sorted(att.step.unique()) == [2, 4, 6] and len(att[att.step == 2]) == 8 * 4
    assert set(att[att.layer % 4 == 0].kind) == {"global"} and set(att[att.layer % 4 != 0].kind) == {"local"}
    assert ((att.sink_mass > 0) & (att.sink_mass < 1)).all() and (att.entropy > 0).all()
    routing = queries.probe_routing(store, "r1", step=3)
    assert set(routing.prompt_id) == {p.prompt_id for p in prompts} and set(routing.domain) == {"code", "prose", "data"}
    one = routing[routing.prompt_id == 0]
    assert len(one) == len(prompts[0].tokens) * 7 * 4
    gates = one.groupby(["position", "layer"]).gate.sum()
    np.testing.assert_allclose(gates.to_numpy(), 2.5, rtol=1e-5)
    amap = queries.attention_map(store, "r1", 3, 0, 2, 1)
    assert (amap.query_pos >= amap.key_pos).all() and (amap.query_pos - amap.key_pos).max() <= 31
    per_query = amap.groupby("query_pos").prob.sum()
    assert ((per_query > 0) & (per_query < 1)).all()


def test_run_provenance(recorded):
    store, cfg, *_ = recorded
    manifest = store.manifest("r1")
    assert manifest["config_hash"] == cfg.architecture_hash() and manifest["kernels"]["experts"] == "grouped"
    assert manifest["shape"]["moe_layers"] == list(range(2, 9)) and manifest["status"] == "complete"


def test_record_evaluation_of_a_checkpoint(recorded, tmp_path):
    _, cfg, *_ = recorded
    trainer = Trainer(cfg, tmp_path / "ck", SOLO, show_progress=False)
    store = Store(tmp_path / "store")
    with store.create_run("eval", run_manifest(cfg, trainer.model, {}, "test")) as writer:
        recorder = Recorder(trainer.model, writer, probe_prompts(PackedDataset(None, split="heldout",
                                                                               seq_length=64), 16))
        data = PackedDataset(None, split="heldout", seq_length=64)
        result = recorder.record_evaluation(evaluation_batches(data, 2, 300), step=7)
    assert result["tokens"] == 384
    load = queries.expert_load(store, "eval", step=7)
    assert load.groupby("layer").tokens.sum().eq(384 * 4).all()
    assert trainer.model.routers()[0].expert_counts.sum() == 0, "evaluation must not count for the bias update"


def test_the_model_and_training_import_no_analysis_or_ui():
    code = ("import sys, vpmoe, vpmoe.cli, vpmoe.training.loop, vpmoe.training.checkpoint\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('analysis', 'app', 'streamlit', 'nnsight', "
            "'duckdb'))\nassert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
