"""What the pages compute from query results with analysis.metrics: noise floors, starved experts,
bias drift verdicts and the OLMoE specialisation analyses of the probe routing. Pure functions on
DataFrames, no Streamlit, so they are tested and cached like any other code.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis import metrics

STARVED_BELOW = 0.1  # a fraction of the fair share c̄, as metrics.starved_experts


@dataclass(frozen=True)
class RunShape:
    """The model facts a page needs, read from the run's config; None where the config does not say."""

    num_experts: int | None
    topk: int | None
    window_size: int | None
    bias_update_rate: float | None


def _number(config: Mapping[str, Any], table: str, key: str, kind: type) -> Any:
    """config[table][key] if it is a number of `kind` (bools refused), else None."""
    section = config.get(table)
    value = section.get(key) if isinstance(section, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return kind(value) if kind is float or float(value).is_integer() else None


def run_shape(config: Mapping[str, Any]) -> RunShape:
    """The run's experts, top-k, attention window and bias update rate from its manifest config."""
    return RunShape(num_experts=_number(config, "moe", "num_experts", int), topk=_number(config, "moe", "topk", int),
                    window_size=_number(config, "attention", "window_size", int),
                    bias_update_rate=_number(config, "moe", "router_bias_update_rate", float))


def nearest_step(steps: Sequence[int], target: int) -> int:
    """The recorded step closest to `target` (ties go to the earlier one); steps sorted, not empty."""
    index = bisect.bisect_left(steps, target)
    candidates = steps[max(0, index - 1): index + 1]
    return min(candidates, key=lambda step: (abs(step - target), step))


def step_at_or_before(steps: Sequence[int], target: int) -> int | None:
    """The latest recorded step <= target, else the earliest one; None when there are none."""
    if not steps:
        return None
    index = bisect.bisect_right(steps, target)
    return steps[index - 1] if index else steps[0]


# --- Expert load ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _floors(tokens: int, num_experts: int, topk: int) -> tuple[float, float, float]:
    """(MaxVio, CV, normalised entropy) of uniform routing at T tokens."""
    return (metrics.noise_floor_max_vio(tokens, num_experts, topk), metrics.noise_floor_cv(tokens, num_experts, topk),
            metrics.noise_floor_entropy(tokens, num_experts, topk))


def noise_floors(imbalance: pd.DataFrame, topk: int) -> pd.DataFrame:
    """Per step, the imbalance that uniform routing shows at that step's token count T = sum c / K.
    imbalance: step, experts, tokens (queries.load_summary or load_imbalance rows). Columns: step,
    tokens (T), max_vio, cv, entropy_norm."""
    per_step = imbalance.groupby("step").agg(routed=("tokens", "max"), experts=("experts", "max")).reset_index()
    per_step = per_step[per_step["routed"] >= topk]
    rows = [(step, routed // topk, *_floors(int(routed // topk), int(experts), topk))
            for step, routed, experts in per_step.itertuples(index=False)]
    return pd.DataFrame(rows, columns=["step", "tokens", "max_vio", "cv", "entropy_norm"])


def starved_experts(load: pd.DataFrame, threshold: float = STARVED_BELOW) -> pd.DataFrame:
    """Experts below `threshold` of the fair share (dead ones included), busiest first within a layer.
    load: layer, expert, tokens, relative_load. Columns: layer, expert, tokens, relative_load, dead."""
    starved = load[load["relative_load"] < threshold]
    return (starved.assign(dead=starved["tokens"] == 0)[["layer", "expert", "tokens", "relative_load", "dead"]]
            .sort_values(["layer", "expert"], ignore_index=True))


def expected_dead(load: pd.DataFrame, topk: int) -> float:
    """Dead experts per layer that uniform routing would leave at this token count, E (1 - K/E)^T."""
    per_layer = load.groupby("layer")["tokens"].agg(["sum", "size"])
    routed, experts = int(per_layer["sum"].max()), int(per_layer["size"].max())
    return metrics.expected_dead_under_uniform(max(1, routed // topk), experts, topk)


# --- Expert bias ---------------------------------------------------------------------------------------------


def bias_drift(moves: pd.DataFrame) -> pd.DataFrame:
    """Each expert's verdict (drift, dither or flat) by metrics.classify_bias_path from queries.bias_moves;
    no rows without a rate or with fewer than two steps.
    Columns: expert, label, straightness, sign_change_rate, first_bias, last_bias."""
    columns = ["expert", "label", "straightness", "sign_change_rate", "first_bias", "last_bias"]
    rate = moves["rate"].iloc[0] if len(moves) else None
    if moves.empty or moves["steps"].max() < 2 or not rate or not np.isfinite(rate):
        return pd.DataFrame(columns=columns)
    verdict = metrics.classify_bias_path(moves["last_bias"] - moves["first_bias"], moves["path"], moves["moves"],
                                         moves["sign_changes"], float(rate))
    return moves.assign(label=verdict.labels, straightness=verdict.straightness,
                        sign_change_rate=verdict.sign_change_rate)[columns]


# --- Specialisation from the probe routing ---------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRouting:
    """One layer's probe routing as arrays: topk [N, K] experts per token, token ids [N], domain codes [N]
    indexing `domains`, and each token id's text."""

    topk: np.ndarray
    token_ids: np.ndarray
    domain_codes: np.ndarray
    domains: list[str]
    token_text: dict[int, str]


def probe_arrays(probe: pd.DataFrame) -> ProbeRouting | None:
    """The rows of queries.probe_routing for one layer and step as arrays; None when there are none.
    Tokens with fewer than K recorded choices are left out."""
    if probe.empty:
        return None
    wide = probe.pivot_table(index=["prompt_id", "position"], columns="rank", values="expert", aggfunc="first")
    wide = wide.dropna()
    if wide.empty:
        return None
    tokens = probe.drop_duplicates(["prompt_id", "position"]).set_index(["prompt_id", "position"]).loc[wide.index]
    domains = sorted(tokens["domain"].unique().tolist())
    codes = tokens["domain"].map({domain: code for code, domain in enumerate(domains)}).to_numpy(dtype=np.int64)
    texts = probe.drop_duplicates("token_id").set_index("token_id")["token_text"].to_dict()
    return ProbeRouting(topk=wide.to_numpy(dtype=np.int64), token_ids=tokens["token_id"].to_numpy(dtype=np.int64),
                        domain_codes=codes, domains=domains, token_text=texts)


def domain_lift(routing: ProbeRouting, num_experts: int) -> pd.DataFrame:
    """OLMoE domain specialisation: share of each domain's tokens routed to each expert and its lift over
    the uniform K/E. Columns: domain, expert, share, lift."""
    found = metrics.domain_specialization(routing.topk, routing.domain_codes, num_experts, len(routing.domains))
    domain_index, expert_index = np.meshgrid(np.arange(len(routing.domains)), np.arange(num_experts), indexing="ij")
    return pd.DataFrame({"domain": np.asarray(routing.domains, dtype=object)[domain_index.ravel()],
                         "expert": expert_index.ravel(), "share": found.share.ravel(), "lift": found.lift.ravel()})


def vocabulary(routing: ProbeRouting, num_experts: int, top_n: int = 5, min_occurrences: int = 2) -> pd.DataFrame:
    """OLMoE vocabulary specialisation per expert: its score and its top tokens by share (ids seen at
    least `min_occurrences` times). Columns: expert, score, top_tokens, top_shares."""
    found = metrics.vocabulary_specialization(routing.topk, routing.token_ids, num_experts, top_n, min_occurrences)
    rows = []
    for expert in range(num_experts):
        ids, shares = found.token_ids[expert], found.share[expert]
        kept = ids >= 0
        rows.append({"expert": expert, "score": found.score[expert],
                     "top_tokens": " | ".join(repr(routing.token_text.get(int(i), "")) for i in ids[kept]),
                     "top_shares": " | ".join(f"{share:.2f}" for share in shares[kept])})
    return pd.DataFrame(rows)


def coactivation(routing: ProbeRouting, num_experts: int) -> pd.DataFrame:
    """Co-activation over all K(K-1)/2 slot pairs and its lift over independent choice.
    Columns: expert_a, expert_b, count, lift (NaN on the diagonal and for experts with no tokens)."""
    counts = np.bincount(routing.topk.ravel(), minlength=num_experts)
    pairs = metrics.coactivation(routing.topk, num_experts)
    lift = metrics.coactivation_lift(pairs, counts, routing.topk.shape[0])
    a, b = np.meshgrid(np.arange(num_experts), np.arange(num_experts), indexing="ij")
    return pd.DataFrame({"expert_a": a.ravel(), "expert_b": b.ravel(), "count": pairs.ravel(), "lift": lift.ravel()})


def prompt_tokens(probe: pd.DataFrame, prompt_id: int) -> list[str]:
    """The token texts of one probe prompt in position order (from its probe_routing rows)."""
    rows = probe[probe["prompt_id"] == prompt_id].drop_duplicates("position").sort_values("position")
    return rows["token_text"].astype(str).tolist()


def prompt_summaries(probe: pd.DataFrame) -> pd.DataFrame:
    """One row per probe prompt. Columns: prompt_id, domain, tokens, text (the token texts joined)."""
    rows = probe.drop_duplicates(["prompt_id", "position"]).sort_values(["prompt_id", "position"])
    return (rows.groupby("prompt_id")
            .agg(domain=("domain", "first"), tokens=("position", "size"), text=("token_text", "".join))
            .reset_index())


def topk_from_probe(probe: pd.DataFrame) -> int | None:
    """K read off probe routing rows (ranks 0..K-1) when the config does not give it."""
    return None if probe.empty else int(probe["rank"].max()) + 1
