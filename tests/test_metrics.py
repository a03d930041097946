"""analysis.metrics against plain loops, hand-computed cases, exact enumeration and simulation."""

import itertools
import math

import numpy as np
import pytest
import torch

from analysis import metrics as M

E, K = 256, 4


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def layer_counts(rng: np.random.Generator) -> np.ndarray:
    """[3 layers, 16 experts] of uneven counts with a dead expert in layer 1."""
    counts = rng.integers(0, 50, size=(3, 16))
    counts[1, 5] = 0
    return counts


def loop_entropy(row: list[float]) -> float:
    total = sum(row)
    return -sum(c / total * math.log(c / total) for c in row if c > 0)


def softmax_with_sink(logits: np.ndarray, sink: np.ndarray) -> np.ndarray:
    """GPT-OSS oracle: append the sink column, softmax, drop it. logits [H, T, T], sink [H]."""
    column = np.broadcast_to(sink[:, None, None], (*logits.shape[:-1], 1))
    full = np.concatenate([logits, column], axis=-1)
    weights = np.exp(full - full.max(axis=-1, keepdims=True))
    return (weights / weights.sum(axis=-1, keepdims=True))[..., :-1]


# --- load and imbalance ---


def test_load_metrics_match_loops(layer_counts: np.ndarray) -> None:
    for layer, row in enumerate(layer_counts.tolist()):
        total, num_experts = sum(row), len(row)
        fair = total / num_experts
        population_std = math.sqrt(sum((c - fair) ** 2 for c in row) / num_experts)
        entropy = loop_entropy(row)
        assert M.load_fraction(layer_counts)[layer] == pytest.approx([c / total for c in row])
        assert M.relative_load(layer_counts)[layer] == pytest.approx([c / fair for c in row])
        assert M.max_vio(layer_counts)[layer] == pytest.approx(max(row) / fair - 1)
        assert M.max_vio(row) == pytest.approx(max(row) / fair - 1)
        assert M.coefficient_of_variation(layer_counts)[layer] == pytest.approx(population_std / fair)
        assert M.routing_entropy(layer_counts)[layer] == pytest.approx(entropy)
        assert M.normalized_entropy(row) == pytest.approx(entropy / math.log(num_experts))
        assert M.effective_experts(row) == pytest.approx(math.exp(entropy))
        assert M.dead_experts(layer_counts)[layer].tolist() == [c == 0 for c in row]
        assert M.starved_experts(row, 0.5).tolist() == [c / fair < 0.5 for c in row]
        assert M.top_n_coverage(row, 3) == pytest.approx(sum(sorted(row)[-3:]) / total)
    assert M.dead_experts(layer_counts)[1, 5]


def test_scalar_for_one_layer_and_array_for_many(layer_counts: np.ndarray) -> None:
    assert isinstance(M.max_vio(layer_counts[0]), float)
    assert M.max_vio(layer_counts).shape == (3,)


def test_whole_set_max_vio_is_max_vio_of_summed_counts() -> None:
    batches = np.array([[4, 0], [0, 4]])
    assert M.max_vio(batches).tolist() == [1.0, 1.0]
    assert M.max_vio(batches.sum(axis=0)) == 0.0


def test_balanced_router() -> None:
    counts = np.full(E, 64)
    assert M.max_vio(counts) == 0.0
    assert M.coefficient_of_variation(counts) == 0.0
    assert M.normalized_entropy(counts) == pytest.approx(1.0)
    assert M.effective_experts(counts) == pytest.approx(E)
    assert M.top_n_coverage(counts, 16) == pytest.approx(16 / E)


def test_router_collapsed_onto_k_experts() -> None:
    tokens = 1000
    counts = np.zeros(E)
    counts[[3, 7, 100, 200]] = tokens
    assert M.max_vio(counts) == pytest.approx(E / K - 1)
    assert M.routing_entropy(counts) == pytest.approx(math.log(K))
    assert M.effective_experts(counts) == pytest.approx(K)
    assert M.dead_experts(counts).sum() == E - K
    assert M.top_n_coverage(counts, K) == 1.0


def test_router_collapsed_onto_one_expert() -> None:
    counts = np.zeros(E)
    counts[9] = 500
    assert M.max_vio(counts) == pytest.approx(E - 1)
    assert M.routing_entropy(counts) == 0.0
    assert M.normalized_entropy(counts) == 0.0


@pytest.mark.parametrize("metric", [M.load_fraction, M.relative_load, M.max_vio, M.coefficient_of_variation,
                                    M.routing_entropy, M.normalized_entropy, M.dead_experts])
def test_counts_that_sum_to_zero_raise(metric) -> None:
    with pytest.raises(ValueError, match="sum to zero"):
        metric(np.zeros(8))
    with pytest.raises(ValueError, match=r"rows \[\[1\]\]"):
        metric(np.array([[1, 2], [0, 0]]))


def test_bad_counts_raise() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        M.max_vio([3, -1])
    with pytest.raises(ValueError, match="non-negative"):
        M.max_vio([3, np.nan])
    with pytest.raises(ValueError, match=r"1\.\.4"):
        M.top_n_coverage([1, 2, 3, 4], 5)


def test_counts_from_torch() -> None:
    assert M.max_vio(torch.tensor([1, 3], dtype=torch.bfloat16)) == pytest.approx(0.5)


# --- noise floor ---


def test_uniform_topk_indices_draw_every_subset_equally(rng: np.random.Generator) -> None:
    draws = M.uniform_topk_indices(20_000, 5, 2, rng)
    assert draws.min() >= 0 and draws.max() < 5
    assert np.all(draws[:, 0] != draws[:, 1])
    subsets = np.bincount(np.sort(draws, axis=1) @ np.array([5, 1]), minlength=25)
    frequency = subsets[[a * 5 + b for a, b in itertools.combinations(range(5), 2)]]
    assert frequency.sum() == 20_000
    assert np.all(np.abs(frequency - 2000) < 5 * math.sqrt(2000 * 0.9))


def test_simulated_counts_sum_to_k_t_in_any_chunking(rng: np.random.Generator) -> None:
    counts = M.simulate_uniform_routing(1000, 16, 3, trials=4, rng=rng, chunk_tokens=300)
    assert counts.shape == (4, 16)
    assert counts.sum(axis=1).tolist() == [3000] * 4


@pytest.mark.parametrize(("tokens", "trials"), [(4096, 100), (16384, 40), (65536, 12)])
def test_noise_floor_matches_simulation(tokens: int, trials: int, rng: np.random.Generator) -> None:
    counts = M.simulate_uniform_routing(tokens, E, K, trials, rng)
    assert M.noise_floor_max_vio(tokens, E, K) == pytest.approx(M.max_vio(counts).mean(), rel=0.08)
    assert M.noise_floor_max_vio(tokens, E, K, 0.5) == pytest.approx(np.median(M.max_vio(counts)), rel=0.1)
    cv = M.coefficient_of_variation(counts).mean()
    assert M.noise_floor_cv(tokens, E, K) == pytest.approx(cv, rel=0.03)
    deficit = 1 - M.noise_floor_entropy(tokens, E, K)
    assert deficit == pytest.approx((1 - M.normalized_entropy(counts)).mean(), rel=0.06)


def test_noise_floor_reproduces_design_reference_values() -> None:
    reference = {4096: 0.36, 16384: 0.18, 65536: 0.09, 262144: 0.04}
    for tokens, max_vio in reference.items():
        assert round(M.noise_floor_max_vio(tokens, E, K, quantile=0.5), 2) == max_vio
        assert M.noise_floor_max_vio(tokens, E, K) == pytest.approx(max_vio, abs=0.01)


def test_noise_floor_shrinks_with_tokens_and_quantiles_are_ordered() -> None:
    floors = [M.noise_floor_max_vio(t, E, K) for t in (1024, 4096, 16384)]
    assert floors == sorted(floors, reverse=True)
    assert M.noise_floor_max_vio(4096, E, K, 0.1) < M.noise_floor_max_vio(4096, E, K, 0.99)


def test_noise_floor_entropy_and_cv_are_exact_by_enumeration() -> None:
    experts, topk, tokens = 4, 2, 3
    subsets = list(itertools.combinations(range(experts), topk))
    entropies, squared_cvs = [], []
    for routing in itertools.product(subsets, repeat=tokens):
        counts = np.bincount(np.ravel(routing), minlength=experts)
        entropies.append(M.normalized_entropy(counts))
        squared_cvs.append(M.coefficient_of_variation(counts) ** 2)
    assert M.noise_floor_entropy(tokens, experts, topk) == pytest.approx(np.mean(entropies), rel=1e-12)
    assert M.noise_floor_cv(tokens, experts, topk) ** 2 == pytest.approx(np.mean(squared_cvs), rel=1e-12)


def test_noise_floor_when_every_expert_is_chosen() -> None:
    assert M.noise_floor_max_vio(100, 8, 8) == 0.0
    assert M.noise_floor_cv(100, 8, 8) == 0.0
    assert M.noise_floor_entropy(100, 8, 8) == pytest.approx(1.0)
    assert M.prob_dead_under_uniform(100, 8, 8) == 0.0


def test_dead_experts_under_uniform_routing(rng: np.random.Generator) -> None:
    tokens = 200
    assert M.prob_dead_under_uniform(tokens, E, K) == pytest.approx((1 - K / E) ** tokens)
    assert M.prob_dead_under_uniform(tokens, E, K) == pytest.approx(math.exp(-tokens * K / E), rel=0.03)
    counts = M.simulate_uniform_routing(tokens, E, K, trials=200, rng=rng)
    simulated = (counts == 0).sum(axis=1).mean()
    assert M.expected_dead_under_uniform(tokens, E, K) == pytest.approx(simulated, rel=0.05)


def test_noise_floor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="topk"):
        M.noise_floor_cv(100, 4, 5)
    with pytest.raises(ValueError, match="quantile"):
        M.noise_floor_max_vio(100, E, K, 1.0)


# --- expert bias ---


def test_bias_drift_bound_holds_for_sign_updates(rng: np.random.Generator) -> None:
    rate, steps = 1e-3, 300
    bias = np.zeros(16)
    for _ in range(steps):
        counts = rng.integers(0, 100, size=16)
        bias += rate * np.sign(counts.mean() - counts)
    assert M.bias_drift_bound(rate, steps) == pytest.approx(0.3)
    assert np.abs(bias).max() <= M.bias_drift_bound(rate, steps) + 1e-12


def test_classify_bias_drift_on_known_histories() -> None:
    rate, steps = 1e-3, 41
    drift = rate * np.arange(steps)
    dither = rate * (np.arange(steps) % 2)
    flat = np.full(steps, 0.25)
    mostly_up = np.cumsum(rate * np.where(np.arange(steps) % 5 == 4, -1.0, 1.0))
    history = np.stack([drift, dither, flat, -drift, mostly_up], axis=1)
    result = M.classify_bias_drift(history, rate)
    assert result.labels.tolist() == ["drift", "dither", "flat", "drift", "drift"]
    assert result.straightness[[0, 1, 3]] == pytest.approx([1.0, 0.0, 1.0])
    assert result.sign_change_rate[[0, 1, 3]] == pytest.approx([0.0, 1.0, 0.0])
    assert np.isnan(result.straightness[2]) and np.isnan(result.sign_change_rate[2])


def test_classify_bias_drift_matches_loop(rng: np.random.Generator) -> None:
    rate = 1e-3
    moves = rate * rng.choice([-1.0, 0.0, 1.0], p=[0.4, 0.2, 0.4], size=(60, 2, 8))
    history = np.concatenate([np.zeros((1, 2, 8)), np.cumsum(moves, axis=0)])
    result = M.classify_bias_drift(history, rate)
    assert result.labels.shape == (2, 8)
    for layer, expert in itertools.product(range(2), range(8)):
        path = [float(v) for v in history[:, layer, expert]]
        length = sum(abs(b - a) for a, b in itertools.pairwise(path))
        signs = [math.copysign(1, b - a) for a, b in itertools.pairwise(path) if abs(b - a) >= rate / 2]
        flips = sum(a != b for a, b in itertools.pairwise(signs))
        assert result.straightness[layer, expert] == pytest.approx(abs(path[-1] - path[0]) / length)
        assert result.sign_change_rate[layer, expert] == pytest.approx(flips / (len(signs) - 1))


@pytest.mark.parametrize("still", [0.0, 0.3])  # every step moves (the counting fast path), or some do not
def test_bias_path_sums_of_a_cut_history_add_up(rng: np.random.Generator, still: float) -> None:
    rate = 1e-3
    moves = rate * rng.choice([-1.0, 0.0, 1.0], p=[(1 - still) / 2, still, (1 - still) / 2], size=(50, 6))
    history = np.concatenate([np.zeros((1, 6)), np.cumsum(moves, axis=0)])
    whole = M.bias_path_sums(history, rate)
    for column in range(6):
        signs = [int(np.sign(step)) for step in moves[:, column] if step != 0]
        assert whole["sign_changes"][column] == sum(a != b for a, b in itertools.pairwise(signs))
        assert whole["last_move"][column] == (signs[-1] if signs else 0)
    for cut in (1, 20, 49):
        first = M.bias_path_sums(history[:cut + 1], rate)
        later = M.bias_path_sums(history[cut:], rate, previous_move=first["last_move"])
        np.testing.assert_allclose(first["path"] + later["path"], whole["path"], rtol=1e-12)
        for key in ("moves", "sign_changes"):
            assert (first[key] + later[key]).tolist() == whole[key].tolist()
        assert later["last_move"].tolist() == whole["last_move"].tolist()


def test_span_means_without_missing_values_match_plain_means(rng: np.random.Generator) -> None:
    values = rng.normal(size=(10, 2, 3))
    means, starts = M.span_means(values, 3)
    expected = [values[first:first + 3].mean(axis=0) for first in starts]
    np.testing.assert_allclose(means, expected, rtol=1e-12)


def loop_override_rate(scores: np.ndarray, bias: np.ndarray, topk: int) -> float:
    changed = 0
    for row in scores:
        plain = set(sorted(range(len(row)), key=lambda i: -row[i])[:topk])
        biased = set(sorted(range(len(row)), key=lambda i: -(row[i] + bias[i]))[:topk])
        changed += len(biased - plain)
    return changed / (len(scores) * topk)


def test_bias_override_rate_matches_loop(rng: np.random.Generator) -> None:
    scores = rng.random((200, 32))
    bias = rng.normal(0, 0.1, size=32)
    rate = M.bias_override_rate(scores, bias, 4)
    assert 0 < rate < 1
    assert rate == pytest.approx(loop_override_rate(scores, bias, 4))
    assert M.bias_override_rate(torch.from_numpy(scores), torch.from_numpy(bias), 4) == pytest.approx(rate)
    assert M.bias_override_rate(scores, np.zeros(32), 4) == 0.0


def test_bias_that_forces_k_experts_overrides_all_other_choices() -> None:
    scores = np.array([[0.9, 0.8, 0.1, 0.2], [0.1, 0.9, 0.3, 0.2]])
    bias = np.array([0.0, 0.0, 10.0, 10.0])
    # Token 0 had {0, 1}: both replaced. Token 1 had {1, 2}: only 1 replaced by 3.
    assert M.bias_override_rate(scores, bias, 2) == pytest.approx(3 / 4)


# --- map disagreement and OLMoE analyses ---


def test_map_disagreement_hand_case() -> None:
    aux = np.array([[0, 1], [2, 3]])
    dispatched = np.array([[1, 0], [2, 4]])
    # Token 0 agrees; token 1 differs in 3 vs 4: |A Δ B| = 2 of 8 routed pairs.
    assert M.map_disagreement(aux, dispatched) == pytest.approx(2 / 8)
    mask = np.zeros((2, 5), dtype=bool)
    mask[[0, 0, 1, 1], [0, 1, 2, 4]] = True
    assert M.map_disagreement(aux, mask) == pytest.approx(2 / 8)
    assert M.map_disagreement(aux, aux) == 0.0
    assert M.map_disagreement(aux, aux + 5) == 1.0


def test_map_disagreement_matches_loop(rng: np.random.Generator) -> None:
    a = M.uniform_topk_indices(300, 16, 4, rng)
    b = M.uniform_topk_indices(300, 16, 4, rng)
    differ = sum(len(set(x) ^ set(y)) for x, y in zip(a.tolist(), b.tolist(), strict=True))
    assert M.map_disagreement(torch.from_numpy(a), b) == pytest.approx(differ / (2 * 300 * 4))


def test_router_saturation_matches_loop(rng: np.random.Generator) -> None:
    final = M.uniform_topk_indices(300, 16, 4, rng)
    earlier = final.copy()
    earlier[::3] = M.uniform_topk_indices(100, 16, 4, rng)
    shared = sum(len(set(x) & set(y)) for x, y in zip(earlier.tolist(), final.tolist(), strict=True))
    assert M.router_saturation(earlier, final) == pytest.approx(shared / (300 * 4))
    assert M.router_saturation(final, final) == 1.0
    assert M.router_saturation([[0, 1]], [[2, 3]]) == 0.0


def test_coactivation_counts_every_pair(rng: np.random.Generator) -> None:
    topk_idx = M.uniform_topk_indices(500, 12, 4, rng)
    expected = np.zeros((12, 12), dtype=np.int64)
    for row in topk_idx.tolist():
        for i, j in itertools.permutations(row, 2):
            expected[i, j] += 1
    coact = M.coactivation(topk_idx, 12)
    np.testing.assert_array_equal(coact, expected)
    assert coact.sum() == 500 * 4 * 3
    assert np.all(np.diag(coact) == 0)


def test_coactivation_rejects_repeated_experts() -> None:
    with pytest.raises(ValueError, match="repeats"):
        M.coactivation([[1, 1]], 4)


def test_coactivation_lift_matches_loop(rng: np.random.Generator) -> None:
    tokens, experts = 400, 10
    topk_idx = M.uniform_topk_indices(tokens, experts, 3, rng)
    counts = np.bincount(topk_idx.ravel(), minlength=experts)
    coact = M.coactivation(topk_idx, experts)
    lift = M.coactivation_lift(coact, counts, tokens)
    for i, j in itertools.permutations(range(experts), 2):
        assert lift[i, j] == pytest.approx(coact[i, j] / (counts[i] * counts[j] / tokens))
    assert np.all(np.isnan(np.diag(lift)))


def test_coactivation_lift_is_nan_for_an_expert_without_tokens() -> None:
    lift = M.coactivation_lift(np.zeros((3, 3)), [2, 2, 0], tokens=2)
    assert lift[0, 1] == 0.0
    assert np.isnan(lift[0, 2]) and np.isnan(lift[2, 1])


def test_domain_specialization_matches_loop(rng: np.random.Generator) -> None:
    topk_idx = M.uniform_topk_indices(600, 8, 2, rng)
    domains = rng.integers(0, 3, size=600)
    result = M.domain_specialization(topk_idx, domains, num_experts=8, num_domains=4)
    for d, i in itertools.product(range(3), range(8)):
        of_domain = [row for row, dom in zip(topk_idx.tolist(), domains.tolist(), strict=True) if dom == d]
        share = sum(i in row for row in of_domain) / len(of_domain)
        assert result.share[d, i] == pytest.approx(share)
        assert result.lift[d, i] == pytest.approx(share / (2 / 8))
    assert np.all(np.isnan(result.share[3]))
    assert result.share[:3].sum(axis=1) == pytest.approx([2.0] * 3)


def test_vocabulary_specialization_matches_loop(rng: np.random.Generator) -> None:
    tokens, experts = 800, 6
    token_ids = rng.integers(100, 120, size=tokens)
    topk_idx = M.uniform_topk_indices(tokens, experts, 2, rng)
    topk_idx[token_ids == 107, 0] = 5  # id 107 always goes to expert 5 (slot 0)
    topk_idx[(token_ids == 107) & (topk_idx[:, 1] == 5), 1] = 4
    result = M.vocabulary_specialization(topk_idx, token_ids, experts, top_n=3, min_occurrences=30)
    occurrences = {x: int((token_ids == x).sum()) for x in set(token_ids.tolist())}
    eligible = {x for x, n in occurrences.items() if n >= 30}
    for expert in range(experts):
        routed = {x: int(((token_ids == x) & (topk_idx == expert).any(axis=1)).sum()) for x in eligible}
        share = {x: routed[x] / occurrences[x] for x in eligible if routed[x] > 0}
        ranked = sorted(share, key=lambda x: (-share[x], -routed[x], x))[:3]
        assert result.token_ids[expert].tolist() == ranked
        assert result.share[expert] == pytest.approx([share[x] for x in ranked])
        assert result.routed[expert].tolist() == [routed[x] for x in ranked]
        score = sum(routed[x] * share[x] for x in share) / sum(routed[x] for x in share)
        assert result.score[expert] == pytest.approx(score)
    assert result.token_ids[5, 0] == 107 and result.share[5, 0] == 1.0


def test_vocabulary_specialization_pads_experts_with_few_tokens() -> None:
    result = M.vocabulary_specialization([[0, 1], [0, 1]], [7, 7], num_experts=3, top_n=2, min_occurrences=1)
    assert result.token_ids[0].tolist() == [7, -1]
    assert result.routed[2].tolist() == [0, 0]
    assert np.isnan(result.share[0, 1]) and np.isnan(result.score[2])


# --- attention summaries ---


@pytest.fixture
def attention(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """logits [2 heads, 20, 20] under a causal mask, sink [2], and the sink softmax p."""
    logits = rng.normal(size=(2, 20, 20))
    logits[:, ~np.tril(np.ones((20, 20), dtype=bool))] = -np.inf
    sink = np.array([0.5, -1.0])
    return logits, sink, softmax_with_sink(logits, sink)


def test_sink_mass_is_what_the_keys_leave(attention) -> None:
    logits, sink, p = attention
    np.testing.assert_allclose(M.sink_mass(logits, sink), 1 - p.sum(axis=-1), rtol=1e-12)
    mass = math.exp(0.5) / (math.exp(0.5) + np.exp(logits[0, 3, :4]).sum())
    assert M.sink_mass(torch.from_numpy(logits), torch.from_numpy(sink))[0, 3] == pytest.approx(mass)


def test_attention_summaries_match_loops(attention) -> None:
    _, _, p = attention
    window = 8
    entropy = M.attention_entropy(p)
    distance = M.mean_attention_distance(p)
    edge = M.window_edge_mass(p, window)
    beyond = M.beyond_window_mass(p, window)
    for h, i in itertools.product(range(2), range(20)):
        row = p[h, i].tolist()
        assert entropy[h, i] == pytest.approx(-sum(x * math.log(x) for x in row if x > 0))
        assert distance[h, i] == pytest.approx(sum(x * (i - j) for j, x in enumerate(row)))
        assert edge[h, i] == pytest.approx(sum(x for j, x in enumerate(row) if i - j == window - 1))
        assert beyond[h, i] == pytest.approx(sum(x for j, x in enumerate(row) if i - j >= window))


def test_attention_on_one_key_hand_case() -> None:
    p = np.zeros((4, 4))
    p[3, 0] = p[2, 2] = p[1, 0] = p[0, 0] = 1.0  # query 3 looks 3 back, query 2 at itself, query 1 one back
    assert M.mean_attention_distance(p).tolist() == [0, 1, 0, 3]
    assert M.attention_entropy(p).tolist() == [0, 0, 0, 0]
    assert M.window_edge_mass(p, window=4, edge_width=2).tolist() == [0, 0, 0, 1]
    assert M.window_edge_mass(p, window=3, edge_width=2).tolist() == [0, 1, 0, 0]
    assert M.beyond_window_mass(p, window=3).tolist() == [0, 0, 0, 1]


def test_queries_sit_at_the_last_positions() -> None:
    p = np.zeros((1, 5))
    p[0, 1] = 1.0  # the only query is at position 4
    assert M.mean_attention_distance(p).tolist() == [3.0]


def test_default_window_edge_is_the_oldest_eighth() -> None:
    p = np.zeros((200, 200))
    p[199, 199 - 112] = 0.25  # distance 112: first key of the 16-key edge of a 128 window
    p[199, 199 - 111] = 0.5
    p[199, 199 - 128] = 0.125  # outside the window
    assert M.window_edge_mass(p, 128)[199] == pytest.approx(0.25)
    assert M.beyond_window_mass(p, 128)[199] == pytest.approx(0.125)


def test_span_means_ignore_nan_and_keep_a_short_last_span(rng: np.random.Generator) -> None:
    values = rng.normal(size=(11, 3))
    values[2, 1] = np.nan
    values[8:, 2] = np.nan
    means, starts = M.span_means(values, 4)
    assert starts.tolist() == [0, 4, 8]
    for span, first in enumerate(starts):
        for column in range(3):
            block = values[first:first + 4, column]
            expected = np.nan if np.isnan(block).all() else np.mean(block[~np.isnan(block)])
            np.testing.assert_allclose(means[span, column], expected, rtol=1e-12, equal_nan=True)
    with pytest.raises(ValueError, match="span"):
        M.span_means(values, 0)
