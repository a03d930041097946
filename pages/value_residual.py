"""Value residual: each layer's lambda (the mix of its own values with the first layer's) over steps,
every layer's lambda at one step, and the picked layers' lambdas as lines (drawn once layers are picked)."""

import streamlit as st

from analysis import queries
from app import figures, panels, state

st.title("Value residual")
selection = state.require_run()
run = str(selection.run)


@st.fragment(run_every=selection.live_every)
def value_residual() -> None:
    """The whole page; re-read at the refresh interval while the run records."""
    reader = selection.run_data()
    lambdas = reader.get(queries.value_residual)
    frame = lambdas.frame
    if frame.empty:
        st.info("This run has recorded no value-residual lambdas yet (or the model has no value residual).")
        return
    steps = sorted(int(step) for step in frame["step"].unique())
    layers = sorted(int(layer) for layer in frame["layer"].unique())
    step = panels.step_picker(steps, key=f"lambda-step:{run}", live=selection.status == "running")
    latest = frame[frame["step"] == step]
    panels.chart(figures.lambda_bars(latest, step), latest, key="lambda-bars", calls=[lambdas.call],
                 caption="Lambda per layer at the chosen step. A layer's attention uses lambda x its own values "
                         "plus (1 - lambda) x the first layer's (ResFormer); 1 means the residual is unused.")
    panels.chart(figures.layer_step_heatmap(frame, "lambda", "Lambda per layer over steps", "lambda"), frame,
                 key="lambda-heatmap", calls=[lambdas.call],
                 caption="Every layer (rows) over steps (columns): where the colour changes, the layer is "
                         "learning how much of the first layer's values to take.")
    chosen = st.multiselect("Layers to draw as lines", layers, key=f"lambda-layers:{run}",
                            placeholder="Pick layers to follow their lambda over steps")
    if not chosen:
        return
    panels.chart(figures.lambda_lines(frame, chosen), frame[frame["layer"].isin(chosen)], key="lambda-lines",
                 calls=[lambdas.call], caption="Lambda of the chosen layers over steps.")


value_residual()
