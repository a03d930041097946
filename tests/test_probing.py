"""Probe: routing rows against the router's hook points, attention against the reference kernel's probabilities,
ablate / force / scale against recomputation from the module's own weights, loss deltas, the figures, the page."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from analysis.probing import Ablate, Force, Probe, Scale, router_gates
from analysis.store import Store
from app.probe_figures import attention_figure, expert_importance_figure, routing_figure, token_label
from app.serve import STORE_ENV
from vpmoe.config import VpMoEConfig
from vpmoe.model.experts import experts_reference
from vpmoe.model.mlp import relu_squared
from vpmoe.model.transformer import VpMoE
from vpmoe.training.checkpoint import load_model_state, read_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "def area(radius):\n    return 3.14159 * radius ** 2  # <b>x</b>\n" * 3
TEXTS = ["import os\nprint(os.getcwd())\n", "The area of a circle grows with the square of its radius."]
RUN = "tiny-run"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_tiny_checkpoint(cfg: VpMoEConfig, store_root: Path, run_id: str = RUN, step: int = 40) -> Path:
    """Record a run `run_id` in a store at `store_root` and save a seeded tiny model into its folder as if it had
    trained `step` steps: each expert bias is a +-u random walk of that many steps (so |e_i| <= u * step)."""
    Store(store_root).create_run(run_id, {"config": cfg.to_dict()}).close()
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    model = VpMoE(cfg)
    with torch.no_grad():
        for router in model.routers():
            moves = torch.randint(0, 2, (step, router.num_experts), generator=generator) * 2 - 1
            router.expert_bias.copy_(router.bias_update_rate * moves.sum(dim=0))
    return save_checkpoint(store_root / run_id, step, model, None, cfg, {})


@pytest.fixture(scope="module")
def checkpoint(tiny_cfg: VpMoEConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny checkpoint inside a store run."""
    return save_tiny_checkpoint(tiny_cfg, tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def probe(checkpoint: Path) -> Probe:
    """The checkpoint loaded for probing (fast kernels: blocked attention, grouped experts)."""
    return Probe.from_checkpoint(checkpoint)


class HookRecorder:
    """Plain torch forward hooks (no nnsight) that keep what named submodules received and returned."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        self.seen: dict[str, tuple] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_hook(self._keep(name)) for name in names]

    def _keep(self, name: str):
        def hook(module, inputs, output):
            self.seen[name] = (tuple(i.detach().clone() if torch.is_tensor(i) else i for i in inputs), output)
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def record(probe: Probe, names: list[str], action) -> dict[str, tuple]:
    """Run `action()` with hooks on `names` of the probe's model and return what they saw."""
    recorder = HookRecorder(probe.model, names)
    try:
        action()
    finally:
        recorder.close()
    return recorder.seen


def routed_layer(probe: Probe, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ffn input x [N, D], idx [N, K] and gates [N, K] the experts received, and the ffn output [N, D]."""
    prefix = f"blocks.{layer - 1}.ffn"
    seen = record(probe, [prefix, f"{prefix}.experts"], lambda: probe.model(probe.encode(PROMPT)))
    (x,), (y, _) = seen[prefix]
    flat, idx, weights = seen[f"{prefix}.experts"][0]
    assert torch.equal(flat, x.reshape(-1, x.shape[-1]))
    return flat, idx, weights, y.reshape(-1, y.shape[-1])


def intervened_layer(probe: Probe, layer: int, intervention) -> tuple[torch.Tensor, ...]:
    """Like `routed_layer`, for a forward run by the probe with the intervention applied through nnsight."""
    prefix = f"blocks.{layer - 1}.ffn"
    seen = record(probe, [prefix, f"{prefix}.experts"], lambda: probe.routing(PROMPT, intervention))
    (x,), (y, _) = seen[prefix]
    _, idx, weights = seen[f"{prefix}.experts"][0]
    return x.reshape(-1, x.shape[-1]), idx, weights, y.reshape(-1, y.shape[-1])


def expert_term(probe: Probe, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
    """Expert_e(x) = W2_e phi(W1_e x + b1_e) + b2_e from the module's weights, for tokens x [n, D]."""
    experts = probe.model.blocks[layer - 1].ffn.experts
    hidden = relu_squared(x @ experts.fc1_weight[expert].T + experts.fc1_bias[expert])
    return hidden @ experts.fc2_weight[expert].T + experts.fc2_bias[expert]


def busiest_expert(idx: torch.Tensor, num_experts: int) -> int:
    """The expert chosen by the most tokens (not all of them, so some tokens are left untouched)."""
    counts = torch.bincount(idx.flatten(), minlength=num_experts)
    expert = int(counts.argmax())
    assert 0 < counts[expert] < idx.shape[0]
    return expert


# --- Routing and attention ---------------------------------------------------------------------------------


def test_routing_rows_match_the_router_hook_points(probe: Probe) -> None:
    frame = probe.routing(PROMPT)
    names = [f"blocks.{layer - 1}.ffn.router.{hook}" for layer in probe.moe_layers
             for hook in ("scores", "topk_idx", "topk_weights")]
    with torch.no_grad():
        seen = record(probe, names, lambda: probe.model(probe.encode(PROMPT)))
    ids = probe.tokenizer.encode(PROMPT)
    K = probe.cfg.moe.topk
    assert 1 not in set(frame["layer"]) and sorted(frame["layer"].unique()) == list(probe.moe_layers)
    assert len(frame) == len(ids) * len(probe.moe_layers) * K
    for layer in probe.moe_layers:
        hook = f"blocks.{layer - 1}.ffn.router"
        scores, idx, weights = (seen[f"{hook}.{name}"][1] for name in ("scores", "topk_idx", "topk_weights"))
        rows = frame[frame["layer"] == layer]
        for position in range(len(ids)):
            mine = rows[rows["position"] == position]
            assert list(mine["rank"]) == list(range(K))
            assert list(mine["gate"]) == sorted(mine["gate"], reverse=True)
            expected = {int(e): float(w) for e, w in zip(idx[position], weights[position], strict=True)}
            assert dict(zip(mine["expert"], mine["gate"].astype(float), strict=True)) == pytest.approx(expected)
            assert list(mine["score"]) == pytest.approx(scores[position, list(mine["expert"])].tolist())
            assert set(mine["token_id"]) == {ids[position]}
            assert set(mine["token"]) == {probe.tokenizer.token_text(ids[position])}


def reference_probe(checkpoint: Path) -> Probe:
    """The same checkpoint in a model built with the dense reference attention kernel (which fires `probs`)."""
    ckpt = read_checkpoint(checkpoint)
    cfg = ckpt.config
    model = VpMoE(cfg.replace(runtime=dataclasses.replace(cfg.runtime, attention_kernel="reference")))
    load_model_state(model, ckpt)
    return Probe(model, ckpt)


@pytest.mark.parametrize(("layer", "head"), [(2, 1), (4, 3)])
def test_attention_from_q_and_k_matches_the_reference_kernel(probe: Probe, checkpoint: Path, layer: int,
                                                            head: int) -> None:
    reference = reference_probe(checkpoint)
    assert reference.model.kernels.attention == "reference" and probe.model.kernels.attention != "reference"
    name = f"blocks.{layer - 1}.attn.probs"
    with torch.no_grad():
        seen = record(reference, [name], lambda: reference.model(reference.encode(PROMPT)))
    oracle = seen[name][1][0, head].numpy()  # [T, T], fp32, sink column already dropped
    frame = probe.attention(PROMPT, layer, head)
    T = oracle.shape[0]
    assert len(frame) == T * (T + 1) // 2 and (frame["key_pos"] <= frame["query_pos"]).all()
    np.testing.assert_allclose(frame["prob"], oracle[frame["query_pos"], frame["key_pos"]], atol=2e-6)
    np.testing.assert_allclose(frame.groupby("query_pos")["sink_mass"].first(), 1 - oracle.sum(axis=1), atol=2e-6)
    assert frame.attrs == {"layer": layer, "head": head, "kind": "local" if layer % 4 else "global",
                           "window": probe.cfg.attention.window_size if layer % 4 else None}
    if layer % 4:
        beyond = frame["query_pos"] - frame["key_pos"] >= probe.cfg.attention.window_size
        assert beyond.any() and (frame.loc[beyond, "prob"] == 0).all()


def test_probing_never_counts_tokens_or_moves_the_bias(probe: Probe) -> None:
    before = [r.expert_bias.clone() for r in probe.model.routers()]
    probe.routing(PROMPT, probe.ablate(3, 0))
    probe.loss_delta(TEXTS[:1], probe.force(2, [0], 1))
    for router, bias in zip(probe.model.routers(), before, strict=True):
        assert torch.equal(router.expert_bias, bias) and router.expert_counts.sum() == 0


# --- Interventions -----------------------------------------------------------------------------------------


def test_ablation_removes_exactly_the_experts_term_on_its_tokens(probe: Probe) -> None:
    layer = 3
    with torch.no_grad():
        x, idx, weights, base = routed_layer(probe, layer)
        expert = busiest_expert(idx, probe.num_experts)
        x2, idx2, weights2, ablated = intervened_layer(probe, layer, probe.ablate(layer, expert))
        assert torch.equal(x2, x) and torch.equal(idx2, idx)
        routed = (idx == expert).any(dim=-1)
        assert torch.equal(weights2, weights.masked_fill(idx == expert, 0.0))
        # The layer's output recomputed from the module's weights with the zeroed gate.
        ffn = probe.model.blocks[layer - 1].ffn
        manual = experts_reference(x, idx, weights2, ffn.experts.fc1_weight, ffn.experts.fc1_bias,
                                   ffn.experts.fc2_weight, ffn.experts.fc2_bias) + ffn.shared_expert(x)
        torch.testing.assert_close(ablated, manual, atol=1e-6, rtol=1e-5)
        # Tokens routed to the expert lose exactly g_e * Expert_e(x); every other token is untouched.
        gate = (weights * (idx == expert)).sum(dim=-1, keepdim=True)
        removed = gate[routed] * expert_term(probe, layer, expert, x[routed])
        torch.testing.assert_close(base[routed] - ablated[routed], removed, atol=1e-6, rtol=1e-4)
        assert removed.abs().max() > 1e-5
        assert torch.equal(ablated[~routed], base[~routed])


def test_force_routes_exactly_the_given_positions(probe: Probe) -> None:
    layer = 2
    with torch.no_grad():
        _, idx, weights, _ = routed_layer(probe, layer)
        scores = record(probe, [f"blocks.{layer - 1}.ffn.router.scores"],
                        lambda: probe.model(probe.encode(PROMPT)))[f"blocks.{layer - 1}.ffn.router.scores"][1]
        counts = torch.bincount(idx.flatten(), minlength=probe.num_experts)
        expert = int(counts.argmin())
        positions = [0, 3, 5, len(idx) - 1]
        _, forced_idx, forced_weights, _ = intervened_layer(probe, layer, probe.force(layer, positions, expert))
    before = set(torch.nonzero((idx == expert).any(dim=-1)).flatten().tolist())
    after = set(torch.nonzero((forced_idx == expert).any(dim=-1)).flatten().tolist())
    assert after == before | set(positions) and not set(positions) <= before
    others = [p for p in range(len(idx)) if p not in positions]
    assert torch.equal(forced_idx[others], idx[others]) and torch.equal(forced_weights[others], weights[others])
    for p in set(positions) - before:
        weakest = int(scores[p, idx[p]].argmin())
        expected = idx[p].clone()
        expected[weakest] = expert
        assert torch.equal(forced_idx[p], expected)
        g = 2.5 * scores[p, expected] / scores[p, expected].sum()
        torch.testing.assert_close(forced_weights[p], g)
    frame = probe.routing(PROMPT, probe.force(layer, positions, expert))
    chosen = frame[(frame["layer"] == layer) & (frame["expert"] == expert)]
    assert set(chosen["position"]) == after


def test_scale_multiplies_the_experts_gate(probe: Probe) -> None:
    layer = 4
    with torch.no_grad():
        _, idx, weights, _ = routed_layer(probe, layer)
        expert = busiest_expert(idx, probe.num_experts)
        _, idx2, weights2, _ = intervened_layer(probe, layer, probe.scale(layer, expert, 3.0))
    assert torch.equal(idx2, idx)
    torch.testing.assert_close(weights2, torch.where(idx == expert, 3 * weights, weights), atol=0, rtol=0)


def test_intervention_rules_on_synthetic_routing(gen: torch.Generator) -> None:
    scores = torch.rand(6, 8, generator=gen) + 0.01
    idx = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(6)])
    weights = router_gates(scores, idx, 2.5)
    torch.testing.assert_close(weights.sum(dim=-1), torch.full((6,), 2.5))
    assert torch.equal(Ablate(2, int(idx[0, 0])).reweigh(weights, idx)[0, 0], torch.tensor(0.0))
    assert torch.equal(Scale(2, 5, 1.0).reweigh(weights, idx), weights)
    positions = torch.arange(6)
    forced = Force(2, (1, 4), 7).select(idx, scores, positions)
    for row in range(6):
        if row in (1, 4) and 7 not in idx[row]:
            slot = int(scores[row, idx[row]].argmin())
            assert forced[row, slot] == 7 and torch.equal(forced[row].sort().values,
                                                          forced[row].unique().sort().values)
        else:
            assert torch.equal(forced[row], idx[row])


def test_interventions_are_checked_against_the_model(probe: Probe) -> None:
    with pytest.raises(ValueError, match="MoE layer"):
        probe.ablate(1, 0)
    with pytest.raises(ValueError, match=r"expert must be in 0\.\.15"):
        probe.force(2, [0], 16)
    with pytest.raises(ValueError, match="positions"):
        probe.force(2, [-1], 3)
    with pytest.raises(ValueError, match="finite"):
        probe.scale(2, 3, float("nan"))
    with pytest.raises(ValueError, match=r"head must be in 0\.\.3"):
        probe.attention(PROMPT, 2, 4)
    with pytest.raises(TypeError, match="Intervention"):
        probe.routing(PROMPT, "ablate")


# --- Loss effects ------------------------------------------------------------------------------------------


def test_loss_matches_the_models_own_loss(probe: Probe) -> None:
    total = tokens = 0.0
    with torch.no_grad():
        for text in TEXTS:
            ids = torch.tensor([probe.tokenizer.encode(text)])
            out = probe.model(ids[:, :-1], labels=ids[:, 1:], return_logits=False)
            total += out.lm_loss.item() * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    assert probe.loss(TEXTS) == pytest.approx(total / tokens, rel=1e-6)


def test_loss_delta_is_zero_for_a_no_op_and_not_for_a_real_intervention(probe: Probe) -> None:
    with torch.no_grad():
        _, idx, _, _ = routed_layer(probe, 3)
    expert = busiest_expert(idx, probe.num_experts)
    no_op = probe.loss_delta(TEXTS, probe.scale(3, expert, 1.0))
    assert no_op.delta == 0.0 and no_op.tokens > 0
    real = probe.loss_delta(TEXTS, [probe.ablate(3, expert), probe.ablate(5, 0), probe.force(2, range(6), 1)])
    assert real.baseline == no_op.baseline and real.delta != 0.0


def test_loss_delta_on_held_out_rows(probe: Probe) -> None:
    result = probe.loss_delta(2, probe.ablate(2, 0))
    assert result.tokens == 2 * probe.cfg.training.seq_length and result.delta != 0.0


@pytest.fixture(scope="module")
def importance(probe: Probe) -> pd.DataFrame:
    """Every expert of layer 2 ablated in turn on the first text."""
    return probe.expert_importance(2, [TEXTS[0]])


def test_expert_importance_ablates_each_expert_beside_its_load(probe: Probe, importance: pd.DataFrame) -> None:
    text = TEXTS[0]
    frame = importance
    assert list(frame.columns) == ["expert", "load", "load_fraction", "relative_load", "mean_gate", "loss_delta"]
    tokens = len(probe.tokenizer.encode(text)) - 1
    assert frame["load"].sum() == probe.cfg.moe.topk * tokens and frame.attrs["tokens"] == tokens
    assert (frame.loc[frame["load"] == 0, "loss_delta"] == 0.0).all()
    assert frame.loc[frame["load"] == 0, "mean_gate"].isna().all()
    busiest = int(frame["load"].idxmax())
    assert frame.loc[busiest, "loss_delta"] == pytest.approx(probe.loss_delta([text], probe.ablate(2, busiest)).delta)
    assert frame.attrs["baseline_loss"] == pytest.approx(probe.loss([text]))


# --- Figures -----------------------------------------------------------------------------------------------


def test_routing_figure_shows_the_top_expert_of_each_token_and_layer(probe: Probe) -> None:
    frame = probe.routing(PROMPT)
    figure = routing_figure(frame, probe.num_experts)
    z = np.array(figure.data[0].z)
    top = frame[frame["rank"] == 0]
    for row, layer in enumerate(probe.moe_layers):
        assert list(z[row]) == list(top[top["layer"] == layer].sort_values("position")["expert"])
    ticks = list(figure.layout.xaxis.ticktext)
    assert all("<" not in tick for tick in ticks) and any("&lt;" in tick for tick in ticks)
    assert token_label("<b>\n") == "&lt;b&gt;\\n"


def test_attention_figure_draws_the_window_edge_only_for_local_heads(probe: Probe) -> None:
    local = attention_figure(probe.attention(PROMPT, 2, 0))
    window = probe.cfg.attention.window_size
    edges = [trace for trace in local.data if trace.type == "scatter"]
    assert len(edges) == 1 and edges[0].x[0] == -0.5 and edges[0].y[0] == window - 1
    assert not [trace for trace in attention_figure(probe.attention(PROMPT, 4, 0)).data if trace.type == "scatter"]
    assert len(local.data[1].z) == len(probe.tokenizer.encode(PROMPT))  # the sink column


def test_expert_importance_figure(importance: pd.DataFrame) -> None:
    frame = importance
    figure = expert_importance_figure(frame)
    assert list(figure.data[0].y) == list(frame["loss_delta"]) and list(figure.data[1].y) == list(
        frame["load_fraction"])


# --- Page --------------------------------------------------------------------------------------------------

PAGE_DRIVER = textwrap.dedent("""
    import runpy
    from app import state
    state.draw_sidebar()
    runpy.run_path({page!r}, run_name="__main__")
""")


def test_probe_page_shows_routing_and_attention_for_a_hostile_prompt(checkpoint: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STORE_ENV, str(checkpoint.parent.parent))
    test = AppTest.from_string(PAGE_DRIVER.format(page=str(ROOT / "pages" / "probe.py")), default_timeout=120)
    test.run()
    assert not test.exception, [error.message for error in test.exception]
    hostile = "<script>alert(1)</script> <img src=x onerror=alert(2)>"
    test.text_area(key="probe-prompt").input(hostile).run()
    assert not test.exception, [error.message for error in test.exception]
    specs = [json.loads(chart.proto.spec) for chart in test.get("plotly_chart")]
    assert len(specs) == 2
    ticks = specs[0]["layout"]["xaxis"]["ticktext"]
    assert any("script" in tick for tick in ticks) and not any("<" in tick for tick in ticks)
    assert all(not markdown.proto.allow_html for markdown in test.markdown)


def test_probe_page_without_checkpoints_or_with_a_prompt_too_long(checkpoint: Path, tiny_cfg: VpMoEConfig,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store_root = checkpoint.parent.parent
    Store(store_root).create_run("no-checkpoints", {"config": tiny_cfg.to_dict()}).close()
    monkeypatch.setenv(STORE_ENV, str(store_root))
    page = PAGE_DRIVER.format(page=str(ROOT / "pages" / "probe.py"))
    empty = AppTest.from_string(page, default_timeout=60)
    empty.query_params["run"] = "no-checkpoints"
    empty.run()
    assert not empty.exception and "no checkpoints yet" in empty.info[0].value and not empty.get("plotly_chart")
    long = AppTest.from_string(page, default_timeout=120)
    long.query_params["run"] = RUN
    long.run()
    long.text_area(key="probe-prompt").input("x y " * 400).run()
    assert not long.exception and "cannot be probed" in long.warning[0].value
    assert any("more than max_sequence_length = 256" in text.value for text in long.text)
    assert not long.get("plotly_chart")
