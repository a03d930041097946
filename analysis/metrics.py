"""Pure functions behind every number the dashboards and the audit show (DESIGN section 8).

Notation per MoE layer: c_i tokens routed to expert i (summed over the K top-k slots), T tokens, K = top-k,
E experts, fair share c̄ = K*T/E. Functions on counts take [E] or [..., E] (a leading layer or batch axis),
reduce the last axis, and return a float for [E] input. Routing is dropless, so sum_i c_i = K*T and the
formulas need neither K nor T. A row of counts summing to zero raises ValueError instead of returning NaN:
no tokens means nothing was recorded, not a balanced or a collapsed router. Inputs may be numpy arrays,
array-likes or torch tensors; outputs are numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:
    from torch import Tensor

Values: TypeAlias = "ArrayLike | Tensor"
FloatOrArray: TypeAlias = "float | NDArray[np.float64]"


def _as_array(values: Values) -> np.ndarray:
    """numpy view of an array-like or tensor; half-precision tensors widen to fp32 (numpy has no bf16)."""
    if hasattr(values, "detach"):
        tensor = values.detach().cpu()
        if tensor.is_floating_point() and tensor.element_size() < 4:
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(values)


def _reduced(values: np.ndarray) -> FloatOrArray:
    return float(values) if values.ndim == 0 else values


def _counts(counts: Values) -> NDArray[np.float64]:
    c = _as_array(counts).astype(np.float64)
    if c.ndim == 0 or c.shape[-1] == 0:
        raise ValueError(f"counts need an expert axis, got shape {c.shape}")
    if not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError("counts must be finite and non-negative")
    empty = c.sum(axis=-1) == 0
    if np.any(empty):
        where = f" (rows {np.argwhere(empty).tolist()})" if empty.ndim else ""
        raise ValueError(f"counts sum to zero{where}")
    return c


def _xlogx(x: np.ndarray) -> np.ndarray:
    """x ln x with 0 ln 0 = 0."""
    positive = x > 0
    return np.where(positive, x * np.log(np.where(positive, x, 1.0)), 0.0)


# --- Load and imbalance -------------------------------------------------------------------------------


def load_fraction(counts: Values) -> NDArray[np.float64]:
    """f_i = c_i / (K*T) = c_i / sum_j c_j. counts [..., E] -> [..., E]."""
    c = _counts(counts)
    return c / c.sum(axis=-1, keepdims=True)


def relative_load(counts: Values) -> NDArray[np.float64]:
    """r_i = c_i / c̄ with fair share c̄ = K*T/E = mean_j c_j. counts [..., E] -> [..., E]."""
    c = _counts(counts)
    return c / c.mean(axis=-1, keepdims=True)


def max_vio(counts: Values) -> FloatOrArray:
    """MaxVio = max_i r_i - 1 (arXiv:2408.15664). Over a whole evaluation set pass the counts summed over
    its batches, max_vio(batch_counts.sum(axis=0)), which is not the mean of the per-batch values."""
    return _reduced(relative_load(counts).max(axis=-1) - 1.0)


def coefficient_of_variation(counts: Values) -> FloatOrArray:
    """CV = std(c) / mean(c) with the population std (ddof=0) over the E experts."""
    c = _counts(counts)
    return _reduced(c.std(axis=-1) / c.mean(axis=-1))


def routing_entropy(counts: Values) -> FloatOrArray:
    """H = -sum_i f_i ln f_i in nats, 0 ln 0 = 0; ln E for perfect balance, 0 when one expert takes all."""
    return _reduced(-_xlogx(load_fraction(counts)).sum(axis=-1))


def normalized_entropy(counts: Values) -> FloatOrArray:
    """H / ln E: 1 for perfect balance, ln K / ln E when the router collapses onto K experts."""
    entropy = np.asarray(routing_entropy(counts))
    num_experts = _as_array(counts).shape[-1]
    if num_experts < 2:
        raise ValueError("normalised entropy needs at least 2 experts")
    return _reduced(entropy / math.log(num_experts))


def effective_experts(counts: Values) -> FloatOrArray:
    """exp(H): the number of equally loaded experts that would give the same entropy."""
    return _reduced(np.exp(np.asarray(routing_entropy(counts))))


def dead_experts(counts: Values) -> NDArray[np.bool_]:
    """Mask [..., E] of experts with c_i = 0; np.flatnonzero gives indices, .sum(-1) the count.
    Judge it against expected_dead_under_uniform: at small T uniform routing leaves experts empty too."""
    return _counts(counts) == 0


def starved_experts(counts: Values, threshold: float = 0.1) -> NDArray[np.bool_]:
    """Mask [..., E] of experts with r_i < threshold (a fraction of the fair share c̄); includes dead ones."""
    return relative_load(counts) < threshold


def top_n_coverage(counts: Values, n: int) -> FloatOrArray:
    """Share of all routed tokens handled by the n busiest experts: sum of the n largest c_i / sum_i c_i."""
    c = _counts(counts)
    if not 1 <= n <= c.shape[-1]:
        raise ValueError(f"n must be in 1..{c.shape[-1]} (experts), got {n}")
    busiest = np.sort(c, axis=-1)[..., -n:]
    return _reduced(busiest.sum(axis=-1) / c.sum(axis=-1))


# --- Noise floor under perfectly uniform routing ------------------------------------------------------
# Each token picks K distinct experts uniformly at random, so each c_i ~ Binomial(T, p = K/E) exactly
# (marginally); the c_i are negatively correlated because they sum to K*T.


def _check_routing(tokens: int, num_experts: int, topk: int) -> None:
    if tokens < 1 or not 1 <= topk <= num_experts:
        raise ValueError(f"need tokens >= 1 and 1 <= topk <= num_experts, got T={tokens}, E={num_experts}, "
                         f"K={topk}")


def _binomial_pmf(trials: int, p: float) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Binomial(trials, p) pmf on the window mean ± (12 sd + 40), outside which the mass is below 1e-30;
    renormalised, since lgamma's rounding leaves the sum off 1 by about 1e-16 * trials ln trials."""
    if p == 1.0:
        return np.array([trials]), np.array([1.0])
    mean, sd = trials * p, math.sqrt(trials * p * (1.0 - p))
    lo, hi = max(0, math.floor(mean - 12 * sd - 40)), min(trials, math.ceil(mean + 12 * sd + 40))
    m = np.arange(lo, hi + 1)
    log_choose = np.fromiter((math.lgamma(trials + 1) - math.lgamma(k + 1) - math.lgamma(trials - k + 1)
                              for k in range(lo, hi + 1)), dtype=np.float64, count=m.size)
    pmf = np.exp(log_choose + m * math.log(p) + (trials - m) * math.log1p(-p))
    return m, pmf / pmf.sum()


def noise_floor_max_vio(tokens: int, num_experts: int, topk: int, quantile: float | None = None) -> float:
    """MaxVio of uniform routing at T tokens: E[max_i c_i] / c̄ - 1 (quantile=None) or its quantile, treating
    the c_i as independent, P(max_i c_i <= m) ≈ F(m)^E with F the Binomial(T, K/E) cdf; their negative
    correlation is negligible at E=256, K=4 (mean within 0.5% of simulation at 4k and 16k tokens)."""
    _check_routing(tokens, num_experts, topk)
    m, pmf = _binomial_pmf(tokens, topk / num_experts)
    above = np.clip(np.concatenate([np.cumsum(pmf[::-1])[::-1][1:], [0.0]]), 0.0, 1.0)  # P(c_i > m)
    with np.errstate(divide="ignore"):  # log 0 = -inf is right where some expert surely exceeds m
        log_cdf_of_max = num_experts * np.log1p(-above)
    if quantile is None:
        # E[M] = sum_{m>=0} P(M > m); every m below the window has P(M > m) = 1.
        busiest = m[0] + float(-np.expm1(log_cdf_of_max).sum())
    elif 0.0 < quantile < 1.0:
        busiest = float(m[np.argmax(log_cdf_of_max >= math.log(quantile))])
    else:
        raise ValueError(f"quantile must be in (0, 1) or None, got {quantile}")
    return busiest / (topk * tokens / num_experts) - 1.0


def noise_floor_cv(tokens: int, num_experts: int, topk: int) -> float:
    """Root-mean-square CV of uniform routing, sqrt((1 - p) / (T p)) with p = K/E; exact, because
    Var(c_i) = T p (1 - p) and the mean is exactly c̄. E[CV] is smaller by a factor ≈ 1 - 1/(4(E-1))."""
    _check_routing(tokens, num_experts, topk)
    p = topk / num_experts
    return math.sqrt((1.0 - p) / (tokens * p))


def noise_floor_entropy(tokens: int, num_experts: int, topk: int) -> float:
    """Expected normalised entropy of uniform routing, exact: with x_i = c_i / c̄, H = ln E - (1/E) sum_i
    x_i ln x_i, so E[H] = ln E - E[x ln x - x + 1] (as E[x] = 1), c ~ Binomial(T, K/E). Returns E[H]/ln E."""
    _check_routing(tokens, num_experts, topk)
    if num_experts < 2:
        raise ValueError("normalised entropy needs at least 2 experts")
    m, pmf = _binomial_pmf(tokens, topk / num_experts)
    x = m / (topk * tokens / num_experts)
    # x ln x - x + 1 >= 0 has no cancellation, so the deficit stays accurate when it is ~1e-6 at large T.
    deficit = float((pmf * (_xlogx(x) - x + 1.0)).sum())
    return 1.0 - deficit / math.log(num_experts)


def prob_dead_under_uniform(tokens: int, num_experts: int, topk: int) -> float:
    """P(c_i = 0) = (1 - K/E)^T ≈ exp(-T K/E) under uniform routing."""
    _check_routing(tokens, num_experts, topk)
    return (1.0 - topk / num_experts) ** tokens


def expected_dead_under_uniform(tokens: int, num_experts: int, topk: int) -> float:
    """E[#dead experts] = E (1 - K/E)^T under uniform routing: a dead-expert call needs this << 1."""
    return num_experts * prob_dead_under_uniform(tokens, num_experts, topk)


def uniform_topk_indices(tokens: int, num_experts: int, topk: int,
                         rng: np.random.Generator) -> NDArray[np.int64]:
    """[T, K] distinct experts per token, every K-subset equally likely, by Floyd's sampling (O(T K^2) rather
    than O(T E) for sorting random keys). Only the set is uniform; the order within a row is not."""
    _check_routing(tokens, num_experts, topk)
    chosen = np.empty((tokens, topk), dtype=np.int64)
    for slot, ceiling in enumerate(range(num_experts - topk, num_experts)):
        candidate = rng.integers(0, ceiling + 1, size=tokens)
        taken = (chosen[:, :slot] == candidate[:, None]).any(axis=1)
        chosen[:, slot] = np.where(taken, ceiling, candidate)
    return chosen


def simulate_uniform_routing(tokens: int, num_experts: int, topk: int, trials: int, rng: np.random.Generator,
                             chunk_tokens: int = 1 << 18) -> NDArray[np.int64]:
    """Counts [trials, E] of T tokens each routed to K distinct uniform experts, chunk_tokens at a time."""
    counts = np.zeros((trials, num_experts), dtype=np.int64)
    for trial in range(trials):
        for start in range(0, tokens, chunk_tokens):
            chunk = uniform_topk_indices(min(chunk_tokens, tokens - start), num_experts, topk, rng)
            counts[trial] += np.bincount(chunk.ravel(), minlength=num_experts)
    return counts


# --- Expert bias ----------------------------------------------------------------------------------------


def bias_drift_bound(rate: float, steps: int) -> float:
    """|e_i| <= u * steps exactly from e = 0, since each update e_i <- e_i + u sign(mean(c) - c_i) moves by at
    most u (arXiv:2408.15664)."""
    return rate * steps


@dataclass(frozen=True)
class BiasDrift:
    """Per-expert verdict on a bias history and the two numbers behind it (shapes [..., E])."""

    labels: NDArray[np.str_]
    straightness: NDArray[np.float64]
    sign_change_rate: NDArray[np.float64]


def _move_signs(moves: np.ndarray, previous: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per column of `moves` [steps, ...] (-1, 0, +1): how often a non-zero move has the opposite sign of the
    previous non-zero move, and the sign of the last one (0 if none). `previous` [...] is the sign of the last
    move before these steps (0: none), so that a history cut in two gives the same counts in sum."""
    if previous is not None:
        moves = np.concatenate([np.asarray(previous, dtype=np.int8)[None], moves])
    flat = moves.reshape(moves.shape[0], -1)  # [steps, columns]
    if flat.all():
        # Every step moved (the usual case for sign updates recorded every step): neighbours are the pairs.
        return np.count_nonzero(flat[1:] != flat[:-1], axis=0).reshape(moves.shape[1:]), flat[-1].reshape(
            moves.shape[1:])
    columns = np.ascontiguousarray(flat.T)  # [columns, steps], each in step order
    column, _ = np.nonzero(columns)
    signs = columns[columns != 0]  # non-zero moves, column by column, in step order
    flips = (signs[1:] != signs[:-1]) & (column[1:] == column[:-1])
    counts = np.bincount(column[1:][flips], minlength=columns.shape[0])
    last = np.zeros(columns.shape[0], dtype=np.int8)
    ends = np.append(column[1:] != column[:-1], True)  # the last non-zero move of each column
    last[column[ends]] = signs[ends]
    return counts.reshape(moves.shape[1:]), last.reshape(moves.shape[1:])


def classify_bias_drift(bias_history: Values, rate: float, drift_threshold: float = 0.5) -> BiasDrift:
    """Label each expert of a bias history [steps, ..., E] updated at rate u:
    straightness = |e_last - e_first| / sum_t |e_{t+1} - e_t| (1 = steady drift, near 0 = back and forth);
    sign_change_rate = sign flips between consecutive moves / (moves - 1), a move being |Δe| >= u/2
    (1 = alternating every step, about 0.5 for a random walk, 0 for drift).
    "flat": path length < u/2 (never moved a whole step); "drift": straightness >= drift_threshold;
    "dither": otherwise. Both numbers are nan where undefined (flat; fewer than two moves)."""
    sums = bias_path_sums(bias_history, rate)
    return classify_bias_path(sums["net"], sums["path"], sums["moves"], sums["sign_changes"], rate, drift_threshold)


def bias_path_sums(bias_history: Values, rate: float, previous_move: Values | None = None) -> dict[str, np.ndarray]:
    """Per expert of a bias history [steps >= 2, ..., E] at rate u: net = e_last - e_first, path = sum |Δe|,
    moves = steps with |Δe| >= u/2, sign_changes between consecutive moves and last_move (the sign of the last
    one, 0 if none). With `previous_move` (last_move of the history before), a cut history sums exactly."""
    history = np.asarray(_as_array(bias_history), dtype=np.float64)
    if history.ndim < 2 or history.shape[0] < 2 or rate <= 0:
        raise ValueError(f"need bias_history [steps >= 2, ..., E] and rate > 0, got {history.shape}, {rate}")
    steps = np.diff(history, axis=0)
    sizes = np.abs(steps)
    big = sizes >= rate / 2  # False where a bias is NaN: no move
    moves = np.zeros(steps.shape, dtype=np.int8)  # -1, 0, +1: a byte each keeps the counting passes cheap
    moves[big & (steps > 0)] = 1
    moves[big & (steps < 0)] = -1
    sign_changes, last_move = _move_signs(moves, None if previous_move is None else _as_array(previous_move))
    return {"net": history[-1] - history[0], "path": sizes.sum(axis=0), "moves": np.count_nonzero(moves, axis=0),
            "sign_changes": sign_changes, "last_move": last_move}


def estimated_bias_rate(bias_history: Values) -> float | None:
    """The update rate u read off a bias history [steps, ..., E] when no config gives it: the median size of
    the non-zero one-step changes (a sign update moves every bias by exactly u); None if nothing moved."""
    changes = np.abs(np.diff(_as_array(bias_history).astype(np.float64), axis=0)).ravel()
    changes = changes[changes > 0]
    return float(np.median(changes)) if changes.size else None


def classify_bias_path(net: Values, path: Values, moves: Values, sign_changes: Values, rate: float,
                       drift_threshold: float = 0.5) -> BiasDrift:
    """classify_bias_drift from the per-expert sums of bias_path_sums (which a query returns, so that a
    page need not hold the whole history)."""
    net, path = _as_array(net).astype(np.float64), _as_array(path).astype(np.float64)
    moves, sign_changes = _as_array(moves), _as_array(sign_changes)
    flat = path < rate / 2
    straightness = np.where(flat, np.nan, np.abs(net) / np.where(flat, 1.0, path))
    sign_change_rate = np.where(moves >= 2, sign_changes / np.maximum(moves - 1, 1), np.nan)
    labels = np.where(flat, "flat", np.where(straightness >= drift_threshold, "drift", "dither"))
    return BiasDrift(labels=labels, straightness=straightness, sign_change_rate=sign_change_rate)


def _topk_mask(scores: np.ndarray, topk: int) -> NDArray[np.bool_]:
    """[N, E] mask of each row's top-k entries (ties broken arbitrarily)."""
    chosen = np.argpartition(-scores, topk - 1, axis=-1)[..., :topk]
    mask = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(mask, chosen, True, axis=-1)
    return mask


def bias_override_rate(scores: Values, bias: Values, topk: int) -> float:
    """Share of top-k choices the bias changed: |TopK(s + e) minus TopK(s)| summed over tokens / (N*K).
    Plain top-k over all experts (no group limit), so it isolates the bias from the grouping."""
    s, e = _as_array(scores), _as_array(bias)
    if s.ndim != 2 or e.shape != s.shape[-1:] or not 1 <= topk <= s.shape[-1]:
        raise ValueError(f"need scores [N, E], bias [E], 1 <= topk <= E; got {s.shape}, {e.shape}, {topk}")
    changed = _topk_mask(s + e, topk) & ~_topk_mask(s, topk)
    return float(changed.sum() / (s.shape[0] * topk))


def _routing_mask(routing: np.ndarray, num_experts: int) -> NDArray[np.bool_]:
    """[N, E] mask from a bool map [N, E] or expert indices [N, K], padded to num_experts columns."""
    if routing.dtype == bool:
        return np.pad(routing, ((0, 0), (0, num_experts - routing.shape[1])))
    mask = np.zeros((routing.shape[0], num_experts), dtype=bool)
    np.put_along_axis(mask, routing.astype(np.int64), True, axis=1)
    return mask


def map_disagreement(map_a: Values, map_b: Values) -> float:
    """|A Δ B| / (|A| + |B|) over (token, expert) pairs, each map a bool [N, E] or indices [N, K]: 0 when the
    maps agree, 1 when disjoint; with K per token on both it is 1 - |A ∩ B| / (N K). Used for the aux-loss
    map (plain top-K of normalised scores) against the dispatched map (contract section 5)."""
    a, b = _as_array(map_a), _as_array(map_b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"maps need [N, E] or [N, K] with the same N, got {a.shape} and {b.shape}")
    width = max(m.shape[1] if m.dtype == bool else int(m.max(initial=-1)) + 1 for m in (a, b))
    mask_a, mask_b = _routing_mask(a, width), _routing_mask(b, width)
    routed = mask_a.sum() + mask_b.sum()
    if routed == 0:
        raise ValueError("both maps are empty")
    return float((mask_a ^ mask_b).sum() / routed)


# --- OLMoE routing analyses (arXiv:2409.02060) ----------------------------------------------------------


def _topk_indices(topk_idx: Values, num_experts: int) -> NDArray[np.int64]:
    idx = _as_array(topk_idx).astype(np.int64)
    if idx.ndim != 2 or idx.size == 0 or idx.min() < 0 or idx.max() >= num_experts:
        raise ValueError(f"topk_idx must be [N, K] with values in 0..{num_experts - 1}")
    ordered = np.sort(idx, axis=1)
    if np.any(ordered[:, 1:] == ordered[:, :-1]):
        raise ValueError("topk_idx repeats an expert within a token")
    return idx


def router_saturation(topk_earlier: Values, topk_final: Values) -> float:
    """OLMoE router saturation: (1/N) sum_t |A_t ∩ B_t| / K, the share of the final checkpoint's top-k
    experts B_t per token that the earlier checkpoint also chose (A_t). Both [N, K] on the same tokens."""
    earlier, final = _as_array(topk_earlier), _as_array(topk_final)
    if final.ndim != 2 or earlier.shape[0] != final.shape[0]:
        raise ValueError(f"need [N, K] on the same tokens, got {earlier.shape} and {final.shape}")
    also_chosen = (final[:, :, None] == earlier[:, None, :]).any(axis=2)
    return float(also_chosen.mean())


def coactivation(topk_idx: Values, num_experts: int) -> NDArray[np.int64]:
    """[E, E] counts of tokens routed to both i and j over all K(K-1)/2 slot pairs; symmetric, zero diagonal.
    OLMoE's co-activation share of j given i is coactivation[i, j] / c_i."""
    idx = _topk_indices(topk_idx, num_experts)
    pairs = np.zeros(num_experts * num_experts, dtype=np.int64)
    for a in range(idx.shape[1]):
        for b in range(a + 1, idx.shape[1]):
            pairs += np.bincount(idx[:, a] * num_experts + idx[:, b], minlength=num_experts * num_experts)
    upper = pairs.reshape(num_experts, num_experts)
    return upper + upper.T


def coactivation_lift(coact: Values, counts: Values, tokens: int) -> NDArray[np.float64]:
    """Observed / expected co-activation, expected_ij = c_i c_j / T for i != j (experts chosen independently
    with probability c_i/T). nan on the diagonal and where an expert received no tokens."""
    observed = _as_array(coact).astype(np.float64)
    c = _as_array(counts).astype(np.float64)
    expected = np.outer(c, c) / tokens
    np.fill_diagonal(expected, 0.0)
    return np.where(expected > 0, observed / np.where(expected > 0, expected, 1.0), np.nan)


@dataclass(frozen=True)
class DomainSpecialization:
    """share [D, E]: share of a domain's tokens routed to each expert; lift = share / (K/E), 1 = uniform."""

    share: NDArray[np.float64]
    lift: NDArray[np.float64]


def domain_specialization(topk_idx: Values, domains: Values, num_experts: int,
                          num_domains: int) -> DomainSpecialization:
    """OLMoE domain specialisation: share[d, i] = N_{d,i} / N_d, tokens of domain d routed to expert i (any
    slot) over tokens of domain d, against the uniform baseline K/E. Rows of empty domains are nan."""
    idx = _topk_indices(topk_idx, num_experts)
    domain = _as_array(domains).astype(np.int64)
    if domain.shape != idx.shape[:1] or domain.min() < 0 or domain.max() >= num_domains:
        raise ValueError(f"domains must be [N] with values in 0..{num_domains - 1}")
    routed = np.bincount((domain[:, None] * num_experts + idx).ravel(), minlength=num_domains * num_experts)
    tokens = np.bincount(domain, minlength=num_domains).astype(np.float64)[:, None]
    share = np.where(tokens > 0, routed.reshape(num_domains, num_experts) / np.maximum(tokens, 1.0), np.nan)
    return DomainSpecialization(share=share, lift=share / (idx.shape[1] / num_experts))


@dataclass(frozen=True)
class VocabularySpecialization:
    """Per expert its top_n token ids by share [E, n] (padding: id -1, share nan, routed 0); score [E]."""

    token_ids: NDArray[np.int64]
    share: NDArray[np.float64]
    routed: NDArray[np.int64]
    score: NDArray[np.float64]


def vocabulary_specialization(topk_idx: Values, token_ids: Values, num_experts: int, top_n: int = 10,
                              min_occurrences: int = 10) -> VocabularySpecialization:
    """OLMoE vocabulary specialisation: share(x, i) = N_{x,i} / N_x, occurrences of token id x routed to
    expert i over occurrences of x, for ids seen at least min_occurrences times. score_i is the mean share
    over the tokens routed to i, sum_x N_{x,i} share(x, i) / sum_x N_{x,i} (nan if none); under uniform
    routing it is about K/E + (1 - K/E)/N_x, hence the floor on N_x."""
    idx = _topk_indices(topk_idx, num_experts)
    ids = _as_array(token_ids).astype(np.int64)
    if ids.shape != idx.shape[:1]:
        raise ValueError(f"token_ids must be [N] matching topk_idx, got {ids.shape}")
    vocab, id_position, occurrences = np.unique(ids, return_inverse=True, return_counts=True)
    pair_keys, routed = np.unique((id_position[:, None] * num_experts + idx).ravel(), return_counts=True)
    pair_id, pair_expert = pair_keys // num_experts, pair_keys % num_experts
    eligible = occurrences[pair_id] >= min_occurrences
    pair_id, pair_expert, routed = pair_id[eligible], pair_expert[eligible], routed[eligible]
    share = routed / occurrences[pair_id]
    weighted = np.bincount(pair_expert, weights=routed * share, minlength=num_experts)
    total = np.bincount(pair_expert, weights=routed, minlength=num_experts)
    score = np.where(total > 0, weighted / np.maximum(total, 1.0), np.nan)
    order = np.lexsort((vocab[pair_id], -routed, -share, pair_expert))
    top_ids = np.full((num_experts, top_n), -1, dtype=np.int64)
    top_share = np.full((num_experts, top_n), np.nan)
    top_routed = np.zeros((num_experts, top_n), dtype=np.int64)
    rank = np.arange(order.size) - np.searchsorted(pair_expert[order], pair_expert[order])
    keep = order[rank < top_n]
    slot = rank[rank < top_n]
    top_ids[pair_expert[keep], slot] = vocab[pair_id[keep]]
    top_share[pair_expert[keep], slot] = share[keep]
    top_routed[pair_expert[keep], slot] = routed[keep]
    return VocabularySpecialization(token_ids=top_ids, share=top_share, routed=top_routed, score=score)


# --- Attention summaries ---------------------------------------------------------------------------------
# p [..., Tq, Tk] holds attention probabilities over keys at positions 0..Tk-1 (sink column dropped, so a
# row sums to 1 - sink mass); query q sits at position i = Tk - Tq + q, which is q when Tq = Tk.


def _distance(p: np.ndarray) -> NDArray[np.int64]:
    """[Tq, Tk] matrix of i - j."""
    num_queries, num_keys = p.shape[-2:]
    return (num_keys - num_queries + np.arange(num_queries))[:, None] - np.arange(num_keys)[None, :]


def attention_entropy(p: Values) -> NDArray[np.float64]:
    """H_i = -sum_j p_ij ln p_ij over keys, 0 ln 0 = 0, the sink not counted. [..., Tq, Tk] -> [..., Tq]."""
    return -_xlogx(_as_array(p).astype(np.float64)).sum(axis=-1)


def sink_mass(logits: Values, sink: Values) -> NDArray[np.float64]:
    """exp(s_h) / (exp(s_h) + sum_j exp(l_ij)) (arXiv:2508.10925). logits [..., H, Tq, Tk] (masked = -inf),
    sink [H] or a scalar -> [..., H, Tq]."""
    log_keys = np.logaddexp.reduce(_as_array(logits).astype(np.float64), axis=-1)
    s = _as_array(sink).astype(np.float64)[..., None]
    return np.exp(s - np.logaddexp(s, log_keys))


def mean_attention_distance(p: Values) -> NDArray[np.float64]:
    """d_i = sum_j p_ij (i - j), not renormalised for the sink. [..., Tq, Tk] -> [..., Tq]."""
    probabilities = _as_array(p).astype(np.float64)
    return (probabilities * _distance(probabilities)).sum(axis=-1)


def window_edge_mass(p: Values, window: int, edge_width: int | None = None) -> NDArray[np.float64]:
    """Mass on the oldest keys still inside a local window that includes the query: sum of p_ij over
    window - edge_width <= i - j <= window - 1, edge_width = max(1, window // 8) by default. -> [..., Tq]."""
    width = max(1, window // 8) if edge_width is None else edge_width
    if not 1 <= width <= window:
        raise ValueError(f"edge_width must be in 1..{window}, got {width}")
    probabilities = _as_array(p).astype(np.float64)
    distance = _distance(probabilities)
    return (probabilities * ((distance >= window - width) & (distance <= window - 1))).sum(axis=-1)


def beyond_window_mass(p: Values, window: int) -> NDArray[np.float64]:
    """Mass a global head puts beyond the local window: sum of p_ij over i - j >= window. -> [..., Tq]."""
    probabilities = _as_array(p).astype(np.float64)
    return (probabilities * (_distance(probabilities) >= window)).sum(axis=-1)


# --- Downsampling for charts ------------------------------------------------------------------------------


def span_means(values: np.ndarray, span: int) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Means of `values` [n, ...] over consecutive spans of `span` rows along axis 0 (the last may be
    shorter), ignoring NaN (a span of only NaN gives NaN); returns (means [ceil(n / span), ...], first row
    of each span)."""
    if span < 1:
        raise ValueError(f"span must be at least 1, got {span}")
    starts = np.arange(0, len(values), span)
    seen = ~np.isnan(values)
    if seen.all():
        # Nothing missing: divide by the span lengths instead of counting values a second time.
        lengths = np.diff(np.append(starts, len(values))).reshape(-1, *[1] * (values.ndim - 1))
        return np.add.reduceat(values, starts) / lengths, starts
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.add.reduceat(np.where(seen, values, 0.0), starts) / np.add.reduceat(seen, starts)
    return means, starts
