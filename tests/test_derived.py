"""The dashboard's derived analyses against analysis.metrics and hand-worked cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis import metrics
from app import derived


def test_run_shape_reads_the_config_tables_and_refuses_junk() -> None:
    shape = derived.run_shape({"moe": {"num_experts": 256, "topk": 4, "router_bias_update_rate": 1e-3},
                               "attention": {"window_size": 128}})
    assert shape == derived.RunShape(num_experts=256, topk=4, window_size=128, bias_update_rate=1e-3)
    junk = derived.run_shape({"moe": {"num_experts": True, "topk": "4"}, "attention": []})
    assert junk == derived.RunShape(None, None, None, None)


def test_step_snapping() -> None:
    steps = [0, 10, 20, 30]
    assert derived.nearest_step(steps, 14) == 10 and derived.nearest_step(steps, 15) == 10
    assert derived.nearest_step(steps, 16) == 20 and derived.nearest_step(steps, 99) == 30
    assert derived.step_at_or_before(steps, 29) == 20 and derived.step_at_or_before(steps, -5) == 0
    assert derived.step_at_or_before([], 3) is None


def test_noise_floors_use_the_tokens_of_each_step() -> None:
    imbalance = pd.DataFrame({"step": [0, 0, 1], "layer": [2, 3, 2], "experts": 256, "tokens": [16384, 16384, 65536]})
    floors = derived.noise_floors(imbalance, topk=4)
    assert floors["tokens"].tolist() == [4096, 16384]
    assert floors["max_vio"].iloc[0] == pytest.approx(metrics.noise_floor_max_vio(4096, 256, 4))
    assert floors["cv"].iloc[1] == pytest.approx(metrics.noise_floor_cv(16384, 256, 4))


def test_starved_experts_and_expected_dead() -> None:
    load = pd.DataFrame({"layer": 2, "expert": [0, 1, 2, 3], "tokens": [30, 0, 1, 9],
                         "relative_load": [3.0, 0.0, 0.1 - 1e-9, 0.9]})
    starved = derived.starved_experts(load)
    assert starved["expert"].tolist() == [1, 2] and starved["dead"].tolist() == [True, False]
    assert derived.expected_dead(load, topk=2) == pytest.approx(metrics.expected_dead_under_uniform(20, 4, 2))


def test_bias_drift_labels_steady_and_dithering_experts() -> None:
    # Expert 0 climbs 1e-3 a step for 19 steps; expert 1 goes up and down every step; expert 2 never moves.
    moves = pd.DataFrame({"expert": [0, 1, 2], "steps": 20, "first_bias": [0.0, 0.0, 0.5],
                          "last_bias": [0.019, 1e-3, 0.5], "path": [0.019, 0.019, 0.0], "moves": [19, 19, 0],
                          "sign_changes": [0, 18, 0], "rate": 1e-3})
    drift = derived.bias_drift(moves).set_index("expert")
    assert drift["label"].to_dict() == {0: "drift", 1: "dither", 2: "flat"}
    assert drift.loc[0, "straightness"] == pytest.approx(1.0) and drift.loc[1, "sign_change_rate"] == 1.0
    assert derived.bias_drift(moves.assign(rate=np.nan)).empty
    assert derived.bias_drift(moves.assign(steps=1)).empty


def probe(domains: dict[int, str], experts: list[list[int]]) -> pd.DataFrame:
    """probe_routing rows of one layer: token t of prompt 0 chose experts[t], its domain from `domains`."""
    rows = [{"prompt_id": 0, "position": token, "token_id": 100 + token % 2, "token_text": f"tok{token % 2}",
             "domain": domains[token], "layer": 2, "rank": rank, "expert": expert, "gate": 0.5}
            for token, chosen in enumerate(experts) for rank, expert in enumerate(chosen)]
    return pd.DataFrame(rows)


def test_specialisation_matches_the_metrics() -> None:
    frame = probe({0: "code", 1: "code", 2: "prose", 3: "prose"}, [[0, 1], [0, 2], [3, 1], [3, 2]])
    routing = derived.probe_arrays(frame)
    assert routing is not None and routing.topk.shape == (4, 2) and routing.domains == ["code", "prose"]
    lift = derived.domain_lift(routing, 4).set_index(["domain", "expert"])["lift"]
    assert lift[("code", 0)] == pytest.approx(1.0 / (2 / 4)) and lift[("prose", 0)] == 0.0
    pairs = derived.coactivation(routing, 4).set_index(["expert_a", "expert_b"])
    assert pairs.loc[(0, 1), "count"] == 1 and np.isnan(pairs.loc[(0, 0), "lift"])
    vocabulary = derived.vocabulary(routing, 4, top_n=2, min_occurrences=1)
    assert vocabulary["top_tokens"].iloc[0] == "'tok0' | 'tok1'"
    assert derived.probe_arrays(frame.iloc[:0]) is None


def test_prompt_text_and_tokens() -> None:
    frame = probe({0: "code", 1: "code"}, [[0, 1], [2, 3]])
    assert derived.prompt_tokens(frame, 0) == ["tok0", "tok1"]
    summary = derived.prompt_summaries(frame)
    assert summary.to_dict("records") == [{"prompt_id": 0, "domain": "code", "tokens": 2, "text": "tok0tok1"}]
