"""Building blocks every page uses: a chart with its caption, CSV download and the query behind it,
and a step picker that follows a live run. Captions are fixed text; user text never reaches Markdown.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import derived

PLOTLY_CONFIG = {"displaylogo": False, "modeBarButtonsToRemove": ["lasso2d", "select2d"]}


def chart(figure: go.Figure, frame: pd.DataFrame, *, key: str, caption: str, calls: Sequence[str],
          on_select: Callable[[], None] | None = None) -> None:
    """Show a figure, then its caption, a CSV download of `frame` and the calls that produced it.
    With `on_select`, clicking a point reruns the page after calling it (read st.session_state[key])."""
    selection = {} if on_select is None else {"on_select": on_select, "selection_mode": "points"}
    st.plotly_chart(figure, key=key, config=PLOTLY_CONFIG, **selection)
    st.caption(caption)
    row = st.container(horizontal=True, vertical_alignment="center")
    row.download_button("CSV", data=lambda: frame.to_csv(index=False), file_name=f"{key}.csv", mime="text/csv",
                        key=f"{key}-csv", on_click="ignore", icon=":material/download:",
                        help="Download the rows behind this chart")
    with row.expander("Query behind this chart"):
        # Plain text, not st.code: four syntax-highlighted blocks cost a page load about 0.5 s here.
        st.text("\n".join(calls))


def selected_point(key: str) -> dict | None:
    """The point clicked in the chart with `key` (x, y, customdata, ...); None if nothing is selected."""
    state = st.session_state.get(key)
    points = state.selection.points if state is not None else []
    return points[0] if points else None


def selected_cell(key: str) -> tuple[int, int] | None:
    """(x, y) of the point clicked in the chart with `key`, rounded to the cell; None if nothing is selected."""
    point = selected_point(key)
    return None if point is None else (round(point["x"]), round(point["y"]))


def step_picker(steps: Sequence[int], *, key: str, label: str = "Step", live: bool = False) -> int:
    """Pick one recorded step with a slider (snapped to a recorded step). A `live` run (still recording) also
    gets `Follow the latest step`, on at first: while it is on, the newest step is shown and the slider rests.
    A finished run gets the slider alone, at its last step. `steps` ascending, not empty."""
    if len(steps) == 1:
        st.caption(f"One step recorded: {steps[0]}")
        return steps[0]
    following = live and st.toggle("Follow the latest step", value=True, key=f"{key}-follow",
                                   help="Keep showing the newest recorded step while the run records.")
    if following or st.session_state.get(key) is None:
        st.session_state[key] = steps[-1]
    st.session_state[key] = min(max(st.session_state[key], steps[0]), steps[-1])
    wanted = st.slider(label, min_value=steps[0], max_value=steps[-1], key=key, disabled=following)
    step = derived.nearest_step(steps, wanted)
    if step != wanted:
        st.caption(f"Showing step {step}, the recorded step nearest to {wanted}.")
    return step


def step_range_picker(steps: Sequence[int], *, key: str) -> tuple[int, int]:
    """Pick a closed range of steps (two recorded steps at least)."""
    low, high = st.session_state.get(key, (steps[0], steps[-1]))
    low = min(max(low, steps[0]), steps[-1])
    st.session_state[key] = (low, min(max(high, low), steps[-1]))
    return st.slider("Steps to sum", min_value=steps[0], max_value=steps[-1], key=key)


def choose(label: str, options: Sequence[int], *, key: str, default: int, help: str | None = None) -> int:
    """A select box over numbers whose value survives reruns and clicks elsewhere (a click sets `key`)."""
    if st.session_state.get(key) not in options:
        st.session_state[key] = default if default in options else options[0]
    return st.selectbox(label, options, key=key, help=help)


def choose_later(label: str, options: Sequence[int], *, key: str, placeholder: str,
                 help: str | None = None) -> int | None:
    """A select box over numbers that starts empty (showing `placeholder`): a drill-down drawn only once
    something is picked here or clicked (a click sets `key`); None until then."""
    if st.session_state.get(key) not in options:
        st.session_state[key] = None
    return st.selectbox(label, options, key=key, help=help, placeholder=placeholder)
