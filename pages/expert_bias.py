"""Expert bias: the bias per layer and expert at a step, then on demand one layer's biases over steps, drift
against dithering per expert, and how often the bias changed the routing (override rate, map disagreement)."""

import streamlit as st

from analysis import queries
from app import data, derived, figures, panels, state

st.title("Expert bias")
selection = state.require_run()
run = str(selection.run)
LAYER_KEY, HEATMAP_KEY = f"bias-layer:{run}", "bias-heatmap"
# layer_stats column -> (chart title, colour bar title, caption); one is drawn at a time.
ROUTING_VIEWS = {
    "bias_override_rate": (
        "Bias override rate", "override",
        "Share of top-k choices the bias changed (TopK(s + e) against TopK(s)), per MoE layer over steps. High "
        "early is expected; it should settle low once loads balance."),
    "aux_map_disagreement": (
        "Aux-loss map vs dispatched", "disagreement",
        "How far the routing map the aux loss sees (plain top-K of normalised scores) differs from the experts "
        "tokens were dispatched to: 0 = same map, 1 = disjoint. They differ by design; a rise means the aux loss "
        "is balancing a map that is not used."),
}


def pick_layer() -> None:
    """Follow a click on the bias heatmap: its layer becomes the layer shown below."""
    cell = panels.selected_cell(HEATMAP_KEY)
    if cell is not None:
        st.session_state[LAYER_KEY] = cell[1]


@st.fragment(run_every=selection.live_every)
def expert_bias() -> None:
    """The whole page; re-read at the refresh interval while the run records."""
    reader = selection.run_data()
    steps = reader.steps_of("expert_bias")
    if not steps:
        st.info("This run has recorded no expert bias yet.")
        return
    shape = derived.run_shape(reader.manifest().get("config", {}))
    step = panels.step_picker(steps, key=f"bias-step:{run}", live=selection.status == "running")
    bias = reader.get(queries.expert_bias, step=step)
    panels.chart(figures.bias_heatmap(bias.frame, f"Bias at step {step}"), bias.frame, key=HEATMAP_KEY,
                 on_select=pick_layer, calls=[bias.call],
                 caption="The bias added to each expert's routing score (for choosing experts only). Red: raised "
                         "because the expert was underloaded; blue: lowered because it was overloaded. With a sign "
                         "update of rate u, |bias| <= u x steps. Hover a row for its range; click it to study the "
                         "layer below.")

    layers = sorted(int(layer) for layer in bias.frame["layer"].unique())
    layer = panels.choose_later("Layer", layers, key=LAYER_KEY, placeholder="Click a heatmap row or pick one")
    if layer is None:
        st.caption("Click a row of the heatmap (or pick a layer here) for that layer's biases over steps and "
                   "which of its experts drift and which dither.")
    else:
        layer_detail(reader, layer, steps, shape)
    routing_view(reader)


def layer_detail(reader: data.RunData, layer: int, steps: list[int], shape: derived.RunShape) -> None:
    """One layer's biases over steps beside its experts' drift against dithering."""
    history = reader.get(queries.bias_history, layer=layer, max_steps=figures.STEP_COLUMNS)
    left, right = st.columns(2)
    with left:
        panels.chart(figures.bias_over_steps(history.frame, layer), history.frame, key="bias-history",
                     calls=[history.call],
                     caption="Every expert of this layer (rows) over steps (columns; long runs averaged over equal "
                             "spans of steps). A steady colour gradient along a row is drift; speckle is an expert "
                             "dithering around its balance point.")
    with right:
        moves = reader.get(queries.bias_moves, layer=layer, rate=shape.bias_update_rate or None)
        drift = derived.bias_drift(moves.frame)
        panels.chart(figures.drift_scatter(drift, layer), drift, key="bias-drift",
                     calls=[moves.call, "app.derived.bias_drift(frame)  # analysis.metrics.classify_bias_path"],
                     caption="Per expert, over every recorded step: straightness (1 = moved one way all along) "
                             "against how often a move reversed the last one (about 0.5 for a random walk). Drift: "
                             "straightness >= 0.5; flat: never moved a whole step of u.")
        if len(steps) < 2:
            st.info("Drift needs at least two recorded steps.")
        elif not shape.bias_update_rate:
            st.caption("The config does not give the bias update rate u; it is estimated from the moves "
                       "(the median non-zero change of a bias in one step).")


def routing_view(reader: data.RunData) -> None:
    """Bias override rate or aux-map disagreement per layer over steps, one at a time, drawn once one is picked."""
    column = st.radio("Per layer over steps", list(ROUTING_VIEWS), horizontal=True, key="bias-routing-view",
                      index=None, format_func=lambda name: ROUTING_VIEWS[name][0])
    if column is None:
        st.caption("Pick one to draw it for every MoE layer over steps: how often the bias changed the routing, "
                   "or how far the map the aux loss balances is from the one tokens were dispatched by.")
        return
    stats = reader.get(queries.layer_stats)
    title, colorbar, caption = ROUTING_VIEWS[column]
    panels.chart(figures.layer_step_heatmap(stats.frame, column, title, colorbar),
                 stats.frame[["step", "layer", column]], key="bias-routing", calls=[stats.call], caption=caption)


expert_bias()
