"""The read API: documented columns, values against pandas over the raw files, filters, hostile values."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_store import TINY, record_run, record_step
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import metrics, queries
from analysis.store import Store
from app import derived

pytestmark = pytest.mark.timeout(60)

HOSTILE_RUNS = ["x'; drop table steps; --", "' or 1=1 --", '"; select 1; --', "ünïcødé ✓", "a" * 5000, "..",
                "../a", "a/../a", "", "%", "a%", "*"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Run "a" (30 steps, probes at 0, 10, 20, compacted), "b" (10 steps), "a-live" (run a's data, unclosed)."""
    store = Store(tmp_path_factory.mktemp("store"))
    record_run(store, "a", 30, seed=0, flush_every_steps=4)
    record_run(store, "b", 10, seed=1)
    writer = store.create_run("a-live", {"config": {}}, flush_every_steps=4, compact_every_flushes=3)
    rng = np.random.default_rng(0)
    for step in range(30):
        record_step(writer, TINY, step, rng, probes=step % 10 == 0)
    writer.flush()
    store.append_rows("a", "audits", {"step": 29, "created_at": pd.Timestamp("2025-02-01", tz="UTC"),
                                      "checkpoint": "a/step29", "checkpoint_sha256": "0" * 64, "verdict": "WARN",
                                      "tokens": 1 << 20, "report_json": '{"layers": []}'})
    return store


def raw(store: Store, run: str, table: str) -> pd.DataFrame:
    """A table of a run read straight from its Parquet files with pandas (the oracle)."""
    return pd.read_parquet(store.root / run / "segments" / table).sort_values(
        [column for column in ("step", "prompt_id", "position", "layer", "expert", "head", "rank")
         if column in pd.read_parquet(store.root / run / "segments" / table).columns], ignore_index=True)


CALLS: list[tuple[Callable, dict, list[str]]] = [
    (queries.steps, {}, ["step", "lm_loss", "aux_loss", "eval_loss", "lr", "tokens_per_s", "tokens", "step_time_s",
                         "wall_time"]),
    (queries.expert_load, {}, ["step", "layer", "expert", "tokens", "load_fraction", "relative_load"]),
    (queries.load_imbalance, {}, ["step", "layer", "experts", "tokens", "max_load", "min_load", "mean_load",
                                  "std_load", "dead", "entropy", "entropy_norm", "effective_experts", "max_vio", "cv"]),
    (queries.expert_bias, {}, ["step", "layer", "expert", "bias"]),
    (queries.bias_history, {"layer": 2}, ["step", "layer", "expert", "bias"]),
    (queries.layer_stats, {}, ["step", "layer", "aux_loss", "bias_override_rate", "aux_map_disagreement",
                               "value_residual_lambda"]),
    (queries.value_residual, {}, ["step", "layer", "lambda"]),
    (queries.attention_stats, {}, ["step", "layer", "head", "kind", "entropy", "sink_mass", "mean_distance",
                                   "window_mass"]),
    (queries.probe_routing, {}, ["step", "prompt_id", "position", "token_id", "token_text", "domain", "layer",
                                 "rank", "expert", "gate"]),
    (queries.attention_map, {"step": 20, "prompt_id": 0, "layer": 3, "head": 1}, ["query_pos", "key_pos", "prob"]),
    (queries.expert_history, {"layer": 2, "expert": 3}, ["step", "tokens", "load_fraction", "relative_load", "bias"]),
    (queries.expert_top_tokens, {"layer": 2, "expert": 3}, ["token_id", "token_text", "count", "share",
                                                             "mean_gate"]),
    (queries.expert_domains, {"layer": 2, "expert": 3}, ["domain", "tokens", "routed", "share", "baseline", "lift"]),
    (queries.available_steps, {"table": "router_load"}, ["step"]),
    (queries.audits, {}, ["run_id", "step", "created_at", "checkpoint", "checkpoint_sha256", "verdict", "tokens",
                          "report_json"]),
]


@pytest.mark.parametrize(("function", "kwargs", "columns"), CALLS, ids=[call[0].__name__ for call in CALLS])
def test_each_query_returns_its_documented_columns(store: Store, function: Callable, kwargs: dict,
                                                   columns: list[str]) -> None:
    frame = function(store, "a", **kwargs)
    assert list(frame.columns) == columns and len(frame) > 0
    doc = inspect.getdoc(function)
    assert all(column in doc for column in columns), doc


@pytest.mark.parametrize("run", [*HOSTILE_RUNS, "no-such-run"])
@pytest.mark.parametrize(("function", "kwargs", "columns"), CALLS, ids=[call[0].__name__ for call in CALLS])
def test_hostile_or_unknown_runs_give_empty_frames(store: Store, run: str, function: Callable, kwargs: dict,
                                                   columns: list[str]) -> None:
    frame = function(store, run, **kwargs)
    assert list(frame.columns) == columns and frame.empty


def test_hostile_filter_values_are_refused_clearly(store: Store) -> None:
    for bad in ["1 or 1=1", "1; drop view steps", 1.5, True, None]:
        with pytest.raises(ValueError, match="layer must be an integer"):
            queries.bias_history(store, "a", layer=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step must be an integer"):
        queries.expert_load(store, "a", step="29")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="table must be one of"):
        queries.available_steps(store, "a", "steps; drop view steps")
    with pytest.raises(ValueError, match="run must be a run id string"):
        queries.steps(store, 7)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="first <= last"):
        queries.steps(store, "a", step_range=(5, 1))


def test_runs_and_last_step(store: Store) -> None:
    runs = queries.runs(store).set_index("run_id")
    assert runs.loc[["a", "b", "a-live"], "status"].tolist() == ["complete", "complete", "running"]
    assert runs.loc[["a", "b", "a-live"], "steps"].tolist() == [30, 10, 30]
    assert queries.last_step(store, "a") == 29 and queries.last_step(store, "b") == 9
    assert queries.last_step(store, "no-such-run") is None


def test_expert_load_defaults_to_the_latest_step_and_matches_the_raw_rows(store: Store) -> None:
    frame = queries.expert_load(store, "a")
    oracle = raw(store, "a", "router_load").query("step == 29")
    assert frame.step.unique().tolist() == [29]
    assert frame.tokens.tolist() == oracle.tokens.tolist()
    per_layer = frame.groupby("layer")
    assert np.allclose(per_layer.load_fraction.sum(), 1) and np.allclose(per_layer.relative_load.mean(), 1)
    totals = oracle.groupby("layer").tokens.transform("sum")
    assert np.allclose(frame.load_fraction, oracle.tokens.to_numpy() / totals.to_numpy())
    one = queries.expert_load(store, "a", step_range=(3, 5), layer=4)
    assert one.step.unique().tolist() == [3, 4, 5] and one.layer.unique().tolist() == [4] and len(one) == 3 * 16


def test_runs_do_not_leak_into_each_other(store: Store) -> None:
    assert len(queries.steps(store, "a")) == 30 and len(queries.steps(store, "b")) == 10
    b_loads = queries.expert_load(store, "b", step=5).tokens.tolist()
    assert b_loads == raw(store, "b", "router_load").query("step == 5").tokens.tolist()
    assert b_loads != queries.expert_load(store, "a", step=5).tokens.tolist()


def test_load_imbalance_comes_from_the_rollup_and_matches_pandas(store: Store) -> None:
    frame = queries.load_imbalance(store, "a", layer=5)
    loads = raw(store, "a", "router_load").query("layer == 5")
    grouped = loads.groupby("step").tokens
    assert frame.step.tolist() == list(range(30))
    assert np.allclose(frame.max_vio, grouped.max() / grouped.mean() - 1)
    assert np.allclose(frame.cv, grouped.std(ddof=0) / grouped.mean())
    assert np.allclose(frame.effective_experts, np.exp(frame.entropy))
    assert len(queries.load_imbalance(store, "a", step_range=(10, 19))) == 10 * 7


def bias_run(store: Store, run: str, history: np.ndarray) -> None:
    """A run whose layer 2 biases are `history` [steps, experts]."""
    steps, experts = history.shape
    with store.create_run(run, {"config": {}}, flush_every_steps=7) as writer:
        for step in range(steps):
            writer.append("expert_bias", {"step": step, "layer": 2, "expert": np.arange(experts),
                                          "bias": history[step].astype(np.float32)})


def test_bias_moves_classify_like_the_whole_history(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    rate, steps = 1e-3, 60
    walk = np.cumsum(rate * rng.choice([-1.0, 0.0, 1.0], size=(steps, 6)), axis=0)
    steady = np.outer(np.arange(steps), [rate, -rate])
    flat = np.full((steps, 1), 0.25)
    history = np.concatenate([walk, steady, flat, rng.normal(0, 0.01, (steps, 3))], axis=1).astype(np.float32)
    store = Store(tmp_path)
    bias_run(store, "r", history)
    oracle_input = history.astype(np.float64)
    for given_rate in (rate, None):
        moves = queries.bias_moves(store, "r", 2, rate=given_rate)
        changes = np.abs(np.diff(oracle_input, axis=0))
        expected_rate = rate if given_rate else float(np.median(changes[changes > 0]))
        assert moves["rate"].iloc[0] == pytest.approx(expected_rate, rel=1e-9)
        expected = metrics.classify_bias_drift(oracle_input, expected_rate)
        drift = derived.bias_drift(moves)
        assert drift["expert"].tolist() == list(range(history.shape[1]))
        assert drift["label"].tolist() == expected.labels.tolist()
        np.testing.assert_allclose(drift["straightness"].astype(float), expected.straightness, rtol=1e-9)
        np.testing.assert_allclose(drift["sign_change_rate"].astype(float), expected.sign_change_rate, rtol=1e-9)
    assert queries.bias_moves(store, "nobody", 2).empty
    with pytest.raises(ValueError, match="rate"):
        queries.bias_moves(store, "r", 2, rate=-1.0)


def pooled_bias(biases: pd.DataFrame, max_steps: int) -> pd.DataFrame:
    """The oracle of bias_history(max_steps=): spans of the same number of recorded steps, averaged."""
    steps = np.sort(biases.step.unique())
    width = max(1, -(-len(steps) // max_steps))
    label = dict(zip(steps, steps[np.arange(len(steps)) // width * width], strict=True))
    return (biases.assign(step=biases.step.map(label)).groupby(["expert", "step"], as_index=False).bias.mean())


@pytest.mark.parametrize("max_steps", [1, 7, 30, 200])
def test_bias_history_averages_equal_spans_of_steps(store: Store, max_steps: int) -> None:
    biases = raw(store, "a", "expert_bias").query("layer == 4")
    expected = pooled_bias(biases, max_steps)
    pooled = queries.bias_history(store, "a", 4, max_steps=max_steps)
    assert pooled[["expert", "step"]].values.tolist() == expected[["expert", "step"]].values.tolist()
    np.testing.assert_allclose(pooled.bias, expected.bias, rtol=1e-5, atol=1e-9)  # float32 means
    assert pooled.step.nunique() <= max_steps and (pooled.layer == 4).all()
    with pytest.raises(ValueError, match="max_steps"):
        queries.bias_history(store, "a", 4, max_steps=0)


def test_sparse_recording_pools_and_classifies_recorded_steps_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    recorded = np.arange(0, 100_000, 1000)  # every 1000 steps: a dense grid would be 100,000 rows
    history = np.cumsum(rng.choice([-1e-3, 1e-3], size=(len(recorded), 5)), axis=0)
    store = Store(tmp_path)
    with store.create_run("sparse", {"config": {}}, flush_every_steps=10) as writer:
        for step, biases in zip(recorded, history, strict=True):
            writer.append("expert_bias", {"step": int(step), "layer": 2, "expert": np.arange(5),
                                          "bias": biases.astype(np.float32)})
    pooled = queries.bias_history(store, "sparse", 2, max_steps=30)
    assert set(pooled.step) <= set(recorded.tolist()) and set(np.diff(np.sort(pooled.step.unique()))) == {4000}
    everything = queries.bias_history(store, "sparse", 2)
    expected = pooled_bias(everything, 30)
    np.testing.assert_allclose(pooled.bias, expected.bias, rtol=1e-5, atol=1e-9)
    moves = queries.bias_moves(store, "sparse", 2, rate=1e-3)
    oracle = metrics.bias_path_sums(history.astype(np.float32).astype(np.float64), 1e-3)
    assert moves.steps.tolist() == [len(recorded)] * 5
    np.testing.assert_allclose(moves.path, oracle["path"], rtol=1e-9)
    assert moves.sign_changes.tolist() == oracle["sign_changes"].tolist()


def test_bias_and_expert_history_match_the_raw_rows(store: Store) -> None:
    biases = raw(store, "a", "expert_bias").query("layer == 3 and expert == 7")
    assert np.allclose(queries.bias_history(store, "a", 3, expert=7).bias, biases.bias)
    assert len(queries.bias_history(store, "a", 3)) == 30 * 16
    assert len(queries.expert_bias(store, "a", step=12)) == 7 * 16
    history = queries.expert_history(store, "a", layer=3, expert=7)
    loads = raw(store, "a", "router_load").query("layer == 3")
    assert history.step.tolist() == list(range(30))
    assert history.tokens.tolist() == loads.query("expert == 7").tokens.tolist()
    assert np.allclose(history.bias, biases.bias)
    assert np.allclose(history.load_fraction, loads.query("expert == 7").tokens.to_numpy()
                       / loads.groupby("step").tokens.sum().to_numpy())


def test_layer_stats_and_value_residual(store: Store) -> None:
    stats = queries.layer_stats(store, "a")
    assert len(stats) == 30 * 8 and stats.query("layer == 1").aux_loss.isna().all()
    lambdas = queries.value_residual(store, "a")
    assert sorted(lambdas.layer.unique()) == list(range(2, 9)) and (lambdas["lambda"] == 0.5).all()


def test_attention_stats_mark_global_layers(store: Store) -> None:
    frame = queries.attention_stats(store, "a")
    assert frame.step.unique().tolist() == [29] and len(frame) == 8 * 4
    assert sorted(frame.query("kind == 'global'").layer.unique()) == [4, 8]
    assert len(queries.attention_stats(store, "a", step_range=(0, 9), layer=2)) == 10 * 4


def test_probe_queries(store: Store) -> None:
    routing = queries.probe_routing(store, "a")
    assert routing.step.unique().tolist() == [20] and len(routing) == 2 * 8 * 7 * 4
    assert queries.probe_routing(store, "a", step=10, prompt_id=1).prompt_id.unique().tolist() == [1]
    assert len(queries.attention_map(store, "a", 20, 0, 3, 1)) == 8 * 9 // 2
    picks = raw(store, "a", "probe_routing").query("step == 20 and layer == 2 and expert == 3")
    top = queries.expert_top_tokens(store, "a", 2, 3, n=3)
    expected = picks.groupby("token_id").size().sort_values(ascending=False)
    assert top["count"].tolist() == expected.iloc[:3].tolist() and len(top) <= 3
    domains = queries.expert_domains(store, "a", 2, 3).set_index("domain")
    assert domains.tokens.tolist() == [8, 8]
    assert domains.routed.to_dict() == picks.groupby("domain").size().reindex(["code", "prose"], fill_value=0).to_dict()
    assert np.allclose(domains.baseline, 4 / 16) and np.allclose(domains.lift, domains.share / (4 / 16))


def test_available_steps_and_audits(store: Store) -> None:
    assert queries.available_steps(store, "a", "router_load").step.tolist() == list(range(30))
    assert queries.available_steps(store, "a", "probe_routing").step.tolist() == [0, 10, 20]
    assert queries.audits(store).run_id.tolist() == ["a"]
    assert queries.audits(store, "b").empty and queries.audits(store, "a").verdict.tolist() == ["WARN"]


@pytest.mark.parametrize(("function", "kwargs", "columns"), CALLS[:-1], ids=[call[0].__name__ for call in CALLS[:-1]])
def test_live_segments_and_compacted_files_answer_the_same(store: Store, function: Callable, kwargs: dict,
                                                          columns: list[str]) -> None:
    pd.testing.assert_frame_equal(function(store, "a", **kwargs), function(store, "a-live", **kwargs))


@settings(max_examples=25, deadline=None)
@given(first=st.integers(-5, 35), width=st.integers(0, 40))
def test_step_ranges_select_exactly_their_steps(store: Store, first: int, width: int) -> None:
    expected = [step for step in range(30) if first <= step <= first + width]
    frame = queries.expert_load(store, "a-live", step_range=(first, first + width), layer=2)
    assert sorted(frame.step.unique().tolist()) == expected and len(frame) == 16 * len(expected)


def test_a_store_path_is_all_a_query_needs(tmp_path: Path) -> None:
    store = Store(tmp_path)
    record_run(store, "only", 3)
    assert queries.steps(Store(tmp_path), "only").step.tolist() == [0, 1, 2]
