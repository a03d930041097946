"""The shared sidebar (store folder, run picker, and the refresh interval while some run records) and the
selection it hands to pages.

`?run=ID&refresh=SECONDS` in the address pick the initial run and refresh interval, so a link can
open a page on a given run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st

from analysis.schema import SchemaError
from analysis.store import StoreError
from app import data
from app.serve import STORE_ENV

CONTEXT_KEY = "vpmoe_context"
REFRESH_KEY = "refresh-choice"
REFRESH_CHOICES: dict[str, float | None] = {"off": None, "1 s": 1.0, "2 s": 2.0, "5 s": 5.0, "10 s": 10.0,
                                            "30 s": 30.0}
DEFAULT_REFRESH = "5 s"


@dataclass(frozen=True)
class Context:
    """What the sidebar selected: the store folder, its runs, the chosen run and the refresh interval."""

    root: Path | None
    runs: pd.DataFrame
    run: str | None
    refresh_s: float | None
    problem: str | None = None
    detail: str | None = None

    @property
    def status(self) -> str | None:
        """The chosen run's status (running, complete, failed or incomplete)."""
        if self.run is None:
            return None
        return str(self.runs.loc[self.runs["run_id"] == self.run, "status"].iloc[0])

    @property
    def live_every(self) -> float | None:
        """Seconds between refreshes of the live parts: the chosen interval while the run records, else None."""
        return self.refresh_s if self.status == "running" else None

    def run_data(self, run: str | None = None) -> data.RunData:
        """Cached reads of the chosen run (or `run`), keyed by its last step as of now."""
        return data.run_data(str(self.root), run or str(self.run))

    def fresh_runs(self) -> pd.DataFrame:
        """The store's runs re-read now (for live parts; the sidebar's list is from the last full rerun)."""
        return _read_runs(self.root)[0]

    def fresh_status(self) -> str | None:
        """The chosen run's status re-read now."""
        runs = self.fresh_runs()
        found = runs.loc[runs["run_id"] == self.run, "status"]
        return str(found.iloc[0]) if len(found) else self.status


def _store_root() -> Path | None:
    """The store folder the server was started on."""
    value = os.environ.get(STORE_ENV)
    return Path(value) if value else None


def _read_runs(root: Path | None) -> tuple[pd.DataFrame, str | None, str | None]:
    """(runs, problem, detail): the store's runs, or none, a fixed message saying why and the error text."""
    empty = pd.DataFrame(columns=["run_id", "status", "steps", "last_step"])
    if root is None:
        hint = f"No store folder was given: start the dashboard with `vpmoe serve --store DIR` ({STORE_ENV})."
        return empty, hint, None
    if not root.is_dir():
        return empty, "The store folder does not exist yet; it appears when the first run starts recording.", None
    try:
        return data.runs(str(root)), None, None
    except (StoreError, SchemaError) as error:
        return empty, "The store cannot be read:", str(error)


def _initial(options: list[str], key: str, wanted: str | None, fallback: str) -> None:
    """Give widget `key` a valid value before it is drawn: the query parameter, else its last value, else fallback."""
    if wanted in options and key not in st.session_state:
        st.session_state[key] = wanted
    if st.session_state.get(key) not in options:
        st.session_state[key] = fallback


def draw_sidebar() -> Context:
    """Draw the sidebar, remember the selection for the pages, and return it."""
    root = _store_root()
    runs, problem, detail = _read_runs(root)
    wanted_run = st.query_params.get("run")
    if wanted_run is not None and "run" not in st.session_state and wanted_run not in set(runs["run_id"]):
        data.runs.clear()  # a link to a run younger than the cached list: list again
        runs, problem, detail = _read_runs(root)
    sidebar = st.sidebar
    sidebar.caption("Store folder (set by the server)")
    sidebar.text(str(root) if root else "(none)")
    run_ids = runs["run_id"].tolist()
    run = None
    if run_ids:
        statuses = dict(zip(runs["run_id"], runs["status"], strict=True))
        _initial(run_ids, "run", wanted_run, run_ids[-1])
        run = sidebar.selectbox("Run", run_ids, key="run", format_func=lambda rid: f"{rid} ({statuses[rid]})",
                                help="Runs in the store, oldest first, with their status when the page was drawn.")
    wanted_refresh = next((label for label, seconds in REFRESH_CHOICES.items()
                           if seconds is not None and str(st.query_params.get("refresh")) in (label, f"{seconds:g}")),
                          None)
    _initial(list(REFRESH_CHOICES), REFRESH_KEY, wanted_refresh, DEFAULT_REFRESH)
    if (runs["status"] == "running").any():
        # Streamlit drops a widget's state while it is not drawn, so the choice lives under a key of its own.
        st.session_state.setdefault("refresh", st.session_state[REFRESH_KEY])
        sidebar.selectbox("Refresh a running run every", list(REFRESH_CHOICES), key="refresh",
                          on_change=lambda: st.session_state.update({REFRESH_KEY: st.session_state["refresh"]}),
                          help="How often the live parts of a page re-read a run that is still recording.")
    refresh = st.session_state[REFRESH_KEY]
    context = Context(root=root, runs=runs, run=run, refresh_s=REFRESH_CHOICES[refresh], problem=problem,
                      detail=detail)
    st.session_state[CONTEXT_KEY] = context
    return context


def context() -> Context:
    """The selection the sidebar made in this script run."""
    return st.session_state[CONTEXT_KEY]


def require_store() -> Context:
    """The selection, after telling the reader and stopping the page when the store cannot be read."""
    selection = context()
    if selection.problem:
        st.info(selection.problem)
        if selection.detail:
            st.text(selection.detail)
        st.stop()
    return selection


def require_run() -> Context:
    """The selection, after telling the reader and stopping the page when there is no run to show."""
    selection = require_store()
    if selection.run is None:
        st.info("No runs in this store yet. Start a training run with recording on; it appears here as it records.")
        st.stop()
    return selection
