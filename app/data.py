"""Cached reads for the pages: analysis.queries calls behind st.cache_data, bounded in size and age.

A run's cached results are keyed by its last recorded step (read from file names, which is cheap),
so a page sees new steps of a live run on its next refresh while a finished run is read once.
The one query the read API lacks (load summed over a step range) is here, with parameters only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import streamlit as st

from analysis import queries
from analysis.store import Store, StoreError

CACHE_TTL_S = 600
CACHE_ENTRIES = 96
RUNS_TTL_S = 2.0


@st.cache_resource(max_entries=2, show_spinner=False)
def open_store(root: str) -> Store:
    """The store at `root`, shared by every session (its DuckDB connection is read-only over Parquet)."""
    return Store(root)


def summed_expert_load(store: Store, run: str, step_range: tuple[int, int]) -> pd.DataFrame:
    """Tokens per (layer, expert) summed over a closed step range. Columns: layer, expert, tokens,
    load_fraction, relative_load (both recomputed on the sums)."""
    first, last = (int(bound) for bound in step_range)
    return store.sql(
        "select layer, expert, sum(tokens)::bigint as tokens,"
        " sum(tokens) / sum(sum(tokens)) over (partition by layer) as load_fraction,"
        " sum(tokens) / avg(sum(tokens)) over (partition by layer) as relative_load"
        " from router_load where run_id = $run and step between $first and $last"
        " group by layer, expert order by layer, expert",
        {"run": run, "first": first, "last": last}, run=run, steps=(first, last))


READS: dict[str, Callable[..., pd.DataFrame]] = {read.__name__: read for read in (
    queries.steps, queries.expert_load, queries.load_imbalance, queries.load_summary, queries.expert_bias,
    queries.bias_history, queries.bias_moves, queries.layer_stats, queries.value_residual, queries.attention_stats,
    queries.probe_routing, queries.attention_map, queries.expert_history, queries.expert_top_tokens,
    queries.expert_domains, queries.available_steps, summed_expert_load)}


@st.cache_data(ttl=CACHE_TTL_S, max_entries=CACHE_ENTRIES, show_spinner=False)
def _read(root: str, name: str, run: str, version: int | None, params: tuple[tuple[str, Any], ...]) -> pd.DataFrame:
    """One read's result; `version` (the run's last step) only keys the cache."""
    return READS[name](open_store(root), run, **dict(params))


@st.cache_data(ttl=RUNS_TTL_S, max_entries=4, show_spinner=False)
def runs(root: str) -> pd.DataFrame:
    """Every run of the store (queries.runs) plus `name` and `description` from each manifest."""
    store = open_store(root)
    table = queries.runs(store)
    manifests = [_manifest(store, run) for run in table["run_id"]]
    return table.assign(name=[str(m.get("name", "")) for m in manifests],
                        description=[str(m.get("description", "")) for m in manifests])


def _manifest(store: Store, run: str) -> dict[str, Any]:
    """The run's manifest, or an empty one when it cannot be read."""
    try:
        return store.manifest(run)
    except (StoreError, OSError):
        return {}


@dataclass(frozen=True)
class Result:
    """A read's rows and the call that produced them, as shown under each chart."""

    frame: pd.DataFrame
    call: str


@dataclass(frozen=True)
class RunData:
    """Cached reads of one run at one version (its last recorded step when this was made)."""

    root: str
    run: str
    version: int | None

    def get(self, read: Callable[..., pd.DataFrame], **params: Any) -> Result:
        """read(store, run, **params) from the cache, with the call written out."""
        if read.__name__ not in READS:
            raise ValueError(f"{read.__name__} is not a dashboard read; known reads: {sorted(READS)}")
        frame = _read(self.root, read.__name__, self.run, self.version, tuple(sorted(params.items())))
        arguments = "".join(f", {name}={value!r}" for name, value in params.items())
        module = "queries" if read.__module__ == queries.__name__ else "app.data"
        return Result(frame, f"{module}.{read.__name__}(store, {self.run!r}{arguments})")

    def steps_of(self, table: str) -> list[int]:
        """The steps recorded in one table of the run, ascending."""
        return [int(step) for step in self.get(queries.available_steps, table=table).frame["step"]]

    def manifest(self) -> dict[str, Any]:
        """The run's manifest (empty when unreadable)."""
        return _manifest(open_store(self.root), self.run)


def run_data(root: str, run: str) -> RunData:
    """Reads of `run` keyed by its current last step, so new steps of a live run are never served stale."""
    return RunData(root, run, queries.last_step(open_store(root), run))
