"""Runs: every run in the store with its status, the chosen run's curves and config, and a comparison."""

import streamlit as st

from analysis import queries
from app import figures, panels, state

RUN_COLUMNS = ["run_id", "status", "steps", "last_step", "created_at", "finished_at", "tokens", "name", "description",
               "config_hash", "code_revision", "writer_host"]

st.title("Runs")
selection = state.require_store()


@st.fragment(run_every=selection.refresh_s)
def run_table() -> None:
    """Every run with its live status (re-read at the refresh interval)."""
    runs = selection.fresh_runs()
    if runs.empty:
        st.info("No runs in this store yet. Start a training run with recording on; it appears here as it records.")
        return
    st.dataframe(runs[[column for column in RUN_COLUMNS if column in runs]], hide_index=True, key="runs-table")
    st.caption("Status: running (the writer is alive), complete, failed, or incomplete (the writer stopped "
               "without closing the run). Steps counts recorded steps; name and description come from the manifest.")


run_table()
if selection.run is None:
    st.stop()

others = [run for run in selection.runs["run_id"] if run != selection.run]
compare = st.selectbox("Compare with", [None, *others], key="compare-run",
                       format_func=lambda run: "(no other run)" if run is None else run,
                       help="Overlay a second run's curves on the chosen run's.")


@st.fragment(run_every=selection.live_every)
def curves() -> None:
    """The chosen run's numbers and curves (and the comparison run's), live while it records."""
    reader = selection.run_data()
    result = reader.get(queries.steps)
    frame = result.frame
    status = selection.fresh_status()
    cells = st.columns(4)
    cells[0].metric("Status", status)
    cells[1].metric("Recorded steps", f"{len(frame):,}")
    cells[2].metric("Last step", "none yet" if frame.empty else f"{int(frame['step'].iloc[-1]):,}")
    cells[3].metric("Tokens/s (last step)", "-" if frame.empty else f"{frame['tokens_per_s'].iloc[-1]:,.0f}")
    if frame.empty:
        st.info("This run has no recorded steps yet.")
        return
    lines = {selection.run: frame}
    calls = [result.call]
    if compare is not None:
        other = selection.run_data(compare).get(queries.steps)
        lines[compare] = other.frame
        calls.append(other.call)
    panels.chart(figures.loss_curves(lines), frame.assign(run_id=selection.run), key="loss-curves", calls=calls,
                 caption="LM loss (lines; eval loss as diamonds), the summed aux loss and throughput per recorded "
                         "step. Lower loss is better; the aux loss should stay small and flat; a drop in tokens/s "
                         "points at the data loader or a slow step.")


curves()

# A popover draws its JSON only when opened; inside an expander it was drawn, folded, on every page load.
with st.popover("Config and provenance of the chosen run", icon=":material/data_object:"):
    manifest = selection.run_data().manifest()
    st.json(manifest.get("config", {}), expanded=2)
    st.json({key: value for key, value in manifest.items() if key != "config"}, expanded=1)
