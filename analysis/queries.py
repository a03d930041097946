"""The read API that pages and notebooks use: one function per question, each returning a DataFrame.

Table and column names come only from this module's SQL; every value a caller passes (run ids
included, which are hostile text to us) goes in as a SQL parameter. A run that does not exist gives
an empty frame. Where a function takes `step=None` and no `step_range`, it means the latest step
recorded in that table. Nothing is cached here: the dashboard does its own time-limited caching,
so a live reader sees each new segment on its next call.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from analysis import drift, metrics
from analysis.schema import LOAD_SUMMARY_SQL, TABLES
from analysis.store import Store

NO_STEP = -1  # steps are never negative, so this selects nothing when a table has no rows yet


def _int(name: str, value: Any) -> int:
    """`value` as an int, or a ValueError naming the parameter."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value.__index__())


def _run(run: Any) -> str:
    """`run` if it is a string (any string: an unknown run simply matches no rows)."""
    if not isinstance(run, str):
        raise ValueError(f"run must be a run id string, got {run!r}")
    return run


def _all_steps(step_range: tuple[int, int] | None) -> tuple[int, int] | None:
    """A validated closed step range, or None for every step."""
    if step_range is None:
        return None
    if len(step_range) != 2:
        raise ValueError(f"step_range must be (first, last), got {step_range!r}")
    first, last = (_int("step_range", bound) for bound in step_range)
    if first > last:
        raise ValueError(f"step_range must be (first, last) with first <= last, got {step_range!r}")
    return first, last


def _step_window(store: Store, run: str, table: str, step: int | None,
                 step_range: tuple[int, int] | None) -> tuple[int, int]:
    """The closed step range a query reads: `step_range`, one `step`, or the table's latest step."""
    if step is not None and step_range is not None:
        raise ValueError("give step or step_range, not both")
    window = _all_steps(step_range)
    if window is not None:
        return window
    if step is None:
        latest = store.last_step(run, table)
        step = NO_STEP if latest is None else latest
    step = _int("step", step)
    return step, step


def _range_clause(steps: tuple[int, int] | None) -> tuple[str, dict[str, int]]:
    """SQL `and step between ...` with its parameters, or nothing for every step."""
    if steps is None:
        return "", {}
    return " and step between $first and $last", {"first": steps[0], "last": steps[1]}


def _optional(column: str, value: Any) -> tuple[str, dict[str, int]]:
    """SQL `and <column> = $<column>` when a filter value is given (column names are this module's own)."""
    if value is None:
        return "", {}
    return f" and {column} = ${column}", {column: _int(column, value)}


def runs(store: Store) -> pd.DataFrame:
    """All runs. Columns: run_id, status (running/complete/failed/incomplete), created_at,
    finished_at, steps (recorded), last_step, tokens (final), config_hash, code_revision,
    writer_host, schema_version."""
    return store.runs()


def last_step(store: Store, run: str) -> int | None:
    """The last step recorded in the run's steps table, read from file names (cheap: for live refresh)."""
    return store.last_step(_run(run))


def steps(store: Store, run: str, step_range: tuple[int, int] | None = None) -> pd.DataFrame:
    """Loss curves and throughput. Columns: step, lm_loss, aux_loss, eval_loss (null between evals),
    lr, tokens_per_s, tokens (cumulative), step_time_s, wall_time."""
    window = _all_steps(step_range)
    where, params = _range_clause(window)
    return store.sql(
        "select step, lm_loss, aux_loss, eval_loss, lr, tokens_per_s, tokens, step_time_s, wall_time"
        f" from steps where run_id = $run{where} order by step",
        {"run": _run(run), **params}, run=run, steps=window)


def expert_load(store: Store, run: str, step: int | None = None, step_range: tuple[int, int] | None = None,
                layer: int | None = None) -> pd.DataFrame:
    """Tokens per expert. Columns: step, layer, expert, tokens, load_fraction (c_i / sum c, i.e.
    c_i / (K T)), relative_load (c_i / mean c, i.e. c_i / c with fair share c = K T / E)."""
    window = _step_window(store, _run(run), "router_load", step, step_range)
    layer_where, layer_params = _optional("layer", layer)
    return store.sql(
        "select step, layer, expert, tokens,"
        " tokens / sum(tokens) over layer_step as load_fraction,"
        " tokens / avg(tokens) over layer_step as relative_load"
        f" from router_load where run_id = $run and step between $first and $last{layer_where}"
        " window layer_step as (partition by step, layer) order by step, layer, expert",
        {"run": run, "first": window[0], "last": window[1], **layer_params}, run=run, steps=window,
        layer=layer_params.get("layer"))


def load_imbalance(store: Store, run: str, layer: int | None = None,
                   step_range: tuple[int, int] | None = None) -> pd.DataFrame:
    """Imbalance over steps from the load roll-up (no raw rows read). Columns: step, layer, experts (E),
    tokens (sum c = K T), max_load, min_load, mean_load, std_load (population), dead (c_i = 0),
    entropy (nats), entropy_norm (H / ln E), effective_experts (exp H), max_vio (max c / mean c - 1), cv."""
    window = _all_steps(step_range)
    where, params = _range_clause(window)
    layer_where, layer_params = _optional("layer", layer)
    return store.sql(
        "select step, layer, experts, tokens, max_load, min_load, mean_load, std_load, dead, entropy,"
        " entropy_norm, exp(entropy) as effective_experts, max_vio, cv"
        f" from load_rollup where run_id = $run{where}{layer_where} order by step, layer",
        {"run": _run(run), **params, **layer_params}, run=run, steps=window)


def load_summary(store: Store, run: str, step_range: tuple[int, int] | None = None) -> pd.DataFrame:
    """Imbalance over steps summarised over the MoE layers (one row per step, from the roll-up).
    Columns: step, layers, experts (E), tokens (sum c of a layer = K T), dead (over all layers),
    max_vio_median, max_vio_worst, cv_median, cv_worst, entropy_norm_median, entropy_norm_worst
    (median over layers; worst = largest MaxVio and CV, smallest normalised entropy)."""
    window = _all_steps(step_range)
    where, params = _range_clause(window)
    source = "load_summary" if _has_summary(store, _run(run)) else f"({LOAD_SUMMARY_SQL.format(source='load_rollup')})"
    return store.sql(
        "select step, layers, experts, tokens, dead, max_vio_median, max_vio_worst, cv_median, cv_worst,"
        f" entropy_norm_median, entropy_norm_worst from {source} where run_id = $run{where} order by step",
        {"run": run, **params}, run=run, steps=window)


def _has_summary(store: Store, run: str) -> bool:
    """True unless the run has load roll-ups but no per-step summary (recorded before summaries existed);
    such runs get their summary computed from the roll-up."""
    return store.last_step(run, "load_summary") is not None or store.last_step(run, "load_rollup") is None


def expert_bias(store: Store, run: str, step: int | None = None, step_range: tuple[int, int] | None = None,
                layer: int | None = None) -> pd.DataFrame:
    """Expert-bias values. Columns: step, layer, expert, bias."""
    window = _step_window(store, _run(run), "expert_bias", step, step_range)
    layer_where, layer_params = _optional("layer", layer)
    return store.sql(
        "select step, layer, expert, bias from expert_bias"
        f" where run_id = $run and step between $first and $last{layer_where} order by step, layer, expert",
        {"run": run, "first": window[0], "last": window[1], **layer_params}, run=run, steps=window)


def bias_history(store: Store, run: str, layer: int, expert: int | None = None,
                 step_range: tuple[int, int] | None = None, max_steps: int | None = None) -> pd.DataFrame:
    """One layer's expert biases over steps (one expert's if given), ordered by expert, then step (the order
    of the per-layer copies, which makes the sort cheap). With `max_steps`, biases are averaged over at most
    that many spans of the same number of recorded steps (the last may be shorter), each labelled with its
    first step: a chart's worth of columns instead of every step. Columns: step, layer, expert, bias."""
    window = _all_steps(step_range)
    if max_steps is None:
        where, params = _range_clause(window)
        expert_where, expert_params = _optional("expert", expert)
        return store.sql(
            "select step, layer, expert, bias from expert_bias"
            f" where run_id = $run and layer = $layer{where}{expert_where} order by expert, step",
            {"run": _run(run), "layer": _int("layer", layer), **params, **expert_params}, run=run, steps=window,
            layer=_int("layer", layer))
    if _int("max_steps", max_steps) < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    steps, experts, grid = _bias_grid(store, run, layer, expert, window)
    if not len(steps):
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "layer": pd.Series(dtype="int16"),
                             "expert": pd.Series(dtype="int16"), "bias": pd.Series(dtype="float32")})
    means, starts = metrics.span_means(grid, -(-len(steps) // max_steps))  # [spans, E]; NaN where never seen
    frame = pd.DataFrame({"step": np.tile(steps[starts], len(experts)), "layer": np.int16(layer),
                          "expert": np.repeat(experts, len(starts)).astype(np.int16),
                          "bias": means.T.ravel().astype(np.float32)})
    return frame[frame["bias"].notna()].reset_index(drop=True)


def _bias_rows(store: Store, run: str, layer: int, expert: int | None = None,
               window: tuple[int, int] | None = None) -> pd.DataFrame:
    """One layer's (step, expert, bias) rows in file order, from its per-layer copies where they exist."""
    where, params = _range_clause(window)
    expert_where, expert_params = _optional("expert", expert)
    return store.sql(f"select step, expert, bias from expert_bias where run_id = $run and layer = $layer{where}"
                     f"{expert_where}", {"run": _run(run), "layer": _int("layer", layer), **params, **expert_params},
                     run=run, steps=window, layer=_int("layer", layer))


def _bias_grid(store: Store, run: str, layer: int, expert: int | None = None,
               window: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer's biases as drift.bias_grid: (recorded steps [S], experts [E], grid [S, E], NaN where missing)."""
    rows = _bias_rows(store, run, layer, expert, window)
    return drift.bias_grid(rows["step"].to_numpy(), rows["expert"].to_numpy(), rows["bias"].to_numpy())


def bias_moves(store: Store, run: str, layer: int, rate: float | None = None) -> pd.DataFrame:
    """Per expert of one layer, metrics.bias_path_sums over every step recorded for all its experts: steps,
    first_bias, last_bias, path (sum of |Δe|), moves (steps with |Δe| >= u/2), sign_changes between moves,
    last_move (the sign of the last move, 0 if none); u is `rate`, or metrics.estimated_bias_rate of the layer
    when None (returned as `rate`, NaN if nothing moved). Read from the bias_drift roll-up when it covers the run's
    last step at this rate; at a given rate a roll-up of earlier steps is extended by the rows after it; otherwise
    computed from the layer's rows. Columns: expert, steps, first_bias, last_bias, path, moves, sign_changes,
    last_move, rate."""
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be a positive number, got {rate!r}")
    rolled = store.sql("select * from bias_drift where run_id = $run and layer = $layer order by expert",
                       {"run": _run(run), "layer": _int("layer", layer)}, run=run)
    last = store.last_step(run, "expert_bias")
    if (not rolled.empty and rolled["rate_given"].iloc[0] == (rate is not None)
            and (rate is None or rolled["rate"].iloc[0] == rate)):
        if rolled["step"].iloc[0] == last:
            return rolled.reindex(columns=drift.DRIFT_COLUMNS)
        if last is not None and drift.extendable(rolled, rate):
            rows = _bias_rows(store, run, layer, window=(int(rolled["step"].iloc[0]) + 1, last))
            extended = drift.extend_drift(rolled, rows["step"].to_numpy(), rows["expert"].to_numpy(),
                                          rows["bias"].to_numpy(), rate)
            if extended is not None:
                return extended
    rows = _bias_rows(store, run, layer)
    return drift.drift_sums(rows["step"].to_numpy(), rows["expert"].to_numpy(), rows["bias"].to_numpy(), rate)


def layer_stats(store: Store, run: str, layer: int | None = None,
                step_range: tuple[int, int] | None = None) -> pd.DataFrame:
    """Per-layer statistics over steps (router columns null on dense layers). Columns: step, layer,
    aux_loss, bias_override_rate, aux_map_disagreement, value_residual_lambda."""
    window = _all_steps(step_range)
    where, params = _range_clause(window)
    layer_where, layer_params = _optional("layer", layer)
    return store.sql(
        "select step, layer, aux_loss, bias_override_rate, aux_map_disagreement, value_residual_lambda"
        f" from layer_stats where run_id = $run{where}{layer_where} order by step, layer",
        {"run": _run(run), **params, **layer_params}, run=run, steps=window)


def value_residual(store: Store, run: str, step_range: tuple[int, int] | None = None) -> pd.DataFrame:
    """Value-residual lambda per layer over steps (layers that have one). Columns: step, layer, lambda."""
    window = _all_steps(step_range)
    where, params = _range_clause(window)
    return store.sql(
        'select step, layer, value_residual_lambda as "lambda" from layer_stats'
        f" where run_id = $run and value_residual_lambda is not null{where} order by step, layer",
        {"run": _run(run), **params}, run=run, steps=window)


def attention_stats(store: Store, run: str, step: int | None = None, step_range: tuple[int, int] | None = None,
                    layer: int | None = None) -> pd.DataFrame:
    """Attention summaries per head. Columns: step, layer, head, kind (local/global), entropy,
    sink_mass, mean_distance, window_mass (local: mass at the window edge; global: beyond it)."""
    window = _step_window(store, _run(run), "attention_stats", step, step_range)
    layer_where, layer_params = _optional("layer", layer)
    return store.sql(
        "select step, layer, head, kind, entropy, sink_mass, mean_distance, window_mass from attention_stats"
        f" where run_id = $run and step between $first and $last{layer_where} order by step, layer, head",
        {"run": run, "first": window[0], "last": window[1], **layer_params}, run=run, steps=window)


def probe_routing(store: Store, run: str, step: int | None = None, prompt_id: int | None = None,
                  layer: int | None = None) -> pd.DataFrame:
    """Top-k routing of the probe prompts at one step. Columns: step, prompt_id, position, token_id,
    token_text, domain, layer, rank (0 = highest gate), expert, gate."""
    window = _step_window(store, _run(run), "probe_routing", step, None)
    prompt_where, prompt_params = _optional("prompt_id", prompt_id)
    layer_where, layer_params = _optional("layer", layer)
    return store.sql(
        "select step, prompt_id, position, token_id, token_text, domain, layer, rank, expert, gate"
        f" from probe_routing where run_id = $run and step = $step{prompt_where}{layer_where}"
        " order by prompt_id, position, layer, rank",
        {"run": run, "step": window[0], **prompt_params, **layer_params}, run=run, steps=window)


def attention_map(store: Store, run: str, step: int, prompt_id: int, layer: int, head: int) -> pd.DataFrame:
    """One head's attention probabilities on one probe prompt. Columns: query_pos, key_pos, prob."""
    window = _step_window(store, _run(run), "attention_maps", step, None)
    return store.sql(
        "select query_pos, key_pos, prob from attention_maps where run_id = $run and step = $step"
        " and prompt_id = $prompt_id and layer = $layer and head = $head order by query_pos, key_pos",
        {"run": run, "step": window[0], "prompt_id": _int("prompt_id", prompt_id), "layer": _int("layer", layer),
         "head": _int("head", head)}, run=run, steps=window)


def expert_history(store: Store, run: str, layer: int, expert: int,
                   step_range: tuple[int, int] | None = None) -> pd.DataFrame:
    """One expert over steps. Columns: step, tokens, load_fraction, relative_load, bias (null where a
    table has no row for that step)."""
    window = _all_steps(step_range)
    where, params = _range_clause(window)
    return store.sql(
        "with loads as (select step, tokens from router_load"
        f"  where run_id = $run and layer = $layer and expert = $expert{where}),"
        " totals as (select step, tokens as layer_tokens, experts from load_rollup"
        f"  where run_id = $run and layer = $layer{where}),"
        " biases as (select step, bias from expert_bias"
        f"  where run_id = $run and layer = $layer and expert = $expert{where})"
        " select step, loads.tokens, loads.tokens / totals.layer_tokens as load_fraction,"
        " loads.tokens * totals.experts / totals.layer_tokens as relative_load, biases.bias"
        " from loads left join totals using (step) full outer join biases using (step) order by step",
        {"run": _run(run), "layer": _int("layer", layer), "expert": _int("expert", expert), **params},
        run=run, steps=window, layer=_int("layer", layer))


def expert_top_tokens(store: Store, run: str, layer: int, expert: int, step: int | None = None,
                      n: int = 20) -> pd.DataFrame:
    """The probe tokens routed most often to one expert at one step. Columns: token_id, token_text,
    count, share (of this expert's routed probe tokens), mean_gate."""
    window = _step_window(store, _run(run), "probe_routing", step, None)
    return store.sql(
        "select token_id, any_value(token_text) as token_text, count(*) as count,"
        " count(*) / sum(count(*)) over () as share, avg(gate) as mean_gate from probe_routing"
        " where run_id = $run and step = $step and layer = $layer and expert = $expert"
        " group by token_id order by count desc, token_id limit $n",
        {"run": run, "step": window[0], "layer": _int("layer", layer), "expert": _int("expert", expert),
         "n": _int("n", n)}, run=run, steps=window)


def expert_domains(store: Store, run: str, layer: int, expert: int, step: int | None = None) -> pd.DataFrame:
    """How often one expert is chosen per data domain at one step, against uniform routing.
    Columns: domain, tokens (probe positions of the domain), routed (positions that chose the expert),
    share (routed / tokens), baseline (K / E), lift (share / baseline)."""
    window = _step_window(store, _run(run), "probe_routing", step, None)
    return store.sql(
        "with picks as (select domain, prompt_id, position, rank, expert from probe_routing"
        "  where run_id = $run and step = $step and layer = $layer),"
        " shape as (select max(rank) + 1 as k,"
        "  (select max(experts) from load_rollup where run_id = $run and layer = $layer) as e from picks)"
        " select domain, count(distinct (prompt_id, position)) as tokens,"
        " count(distinct (prompt_id, position)) filter (where expert = $expert) as routed,"
        " routed / tokens as share, any_value(shape.k) / any_value(shape.e) as baseline, share / baseline as lift"
        " from picks, shape group by domain order by domain",
        {"run": run, "step": window[0], "layer": _int("layer", layer), "expert": _int("expert", expert)},
        run=run, steps=window)


def available_steps(store: Store, run: str, table: str) -> pd.DataFrame:
    """The steps recorded in one table of a run (router_load's come from its per-step summary). Columns: step."""
    if table not in TABLES:
        raise ValueError(f"table must be one of {sorted(TABLES)}, got {table!r}")
    source = table
    if table in ("router_load", "load_rollup", "load_summary"):
        source = "load_summary" if _has_summary(store, _run(run)) else "load_rollup"
    return store.sql(f"select distinct step from {source} where run_id = $run order by step",
                     {"run": _run(run)}, run=run)


def audits(store: Store, run: str | None = None) -> pd.DataFrame:
    """Expert-load audit verdicts (all runs if run is None). Columns: run_id, step, created_at,
    checkpoint, checkpoint_sha256, verdict, tokens, report_json."""
    where, params = ("", {}) if run is None else (" where run_id = $run", {"run": _run(run)})
    return store.sql(
        "select run_id, step, created_at, checkpoint, checkpoint_sha256, verdict, tokens, report_json"
        f" from audits{where} order by created_at, run_id", params, run=run)
