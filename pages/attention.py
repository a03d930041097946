"""Attention: a layers x heads grid coloured by one statistic with local and global layers marked, and
one head's attention pattern on a probe prompt, drawn once a head is clicked (or picked), with the window
edge of local heads."""

import streamlit as st

from analysis import queries
from app import derived, figures, panels, state

st.title("Attention")
selection = state.require_run()
run = str(selection.run)
LAYER_KEY, HEAD_KEY, GRID_KEY = f"attn-layer:{run}", f"attn-head:{run}", "attn-grid"
CAPTIONS = {
    "entropy": "entropy of each head's attention over keys (nats, sink not counted): low is focused, high is spread",
    "sink_mass": "attention mass each head gives its learned sink (attending to nothing)",
    "mean_distance": "mean distance i - j from a query to the keys it attends to",
    "window_mass": "local heads: mass at the far edge of the window; global heads: mass beyond the window",
}


def pick_head() -> None:
    """Copy the clicked grid cell into the pattern's layer and head."""
    cell = panels.selected_cell(GRID_KEY)
    if cell is not None:
        st.session_state[HEAD_KEY], st.session_state[LAYER_KEY] = cell


@st.fragment(run_every=selection.live_every)
def attention() -> None:
    """The whole page; re-read at the refresh interval while the run records."""
    reader = selection.run_data()
    steps = reader.steps_of("attention_stats")
    if not steps:
        st.info("This run has recorded no attention statistics yet.")
        return
    step = panels.step_picker(steps, key=f"attn-step:{run}", live=selection.status == "running")
    metric = st.radio("Colour by", list(figures.HEAD_METRIC_LABELS), horizontal=True, key="attn-metric",
                      format_func=figures.HEAD_METRIC_LABELS.get)
    stats = reader.get(queries.attention_stats, step=step)
    panels.chart(figures.head_grid(stats.frame, metric, f"Heads at step {step}"), stats.frame, key=GRID_KEY,
                 on_select=pick_head, calls=[stats.call],
                 caption=f"One cell per head: {CAPTIONS[metric]}. Outlined rows are global-attention layers, "
                         "the rest slide a local window. Click a head to see its pattern below.")

    st.subheader("One head on a probe prompt")
    map_steps = reader.steps_of("attention_maps")
    map_step = derived.step_at_or_before(map_steps, step)
    if map_step is None:
        st.info("No attention maps were recorded for this run's probe prompts.")
        return
    layers = sorted(int(layer) for layer in stats.frame["layer"].unique())
    heads = sorted(int(head) for head in stats.frame["head"].unique())
    probe = reader.get(queries.probe_routing, step=map_step, layer=layers[-1]).frame
    prompts = derived.prompt_summaries(probe)
    choices = st.columns(3)
    with choices[0]:
        layer = panels.choose_later("Layer", layers, key=LAYER_KEY, placeholder="Click a head above")
    with choices[1]:
        head = panels.choose_later("Head", heads, key=HEAD_KEY, placeholder="Click a head above")
    with choices[2]:
        prompt_ids = prompts["prompt_id"].astype(int).tolist() or [0]
        prompt_id = panels.choose("Probe prompt", prompt_ids, key=f"attn-prompt:{run}", default=prompt_ids[0])
    if len(prompts):
        st.text(f"Prompt {prompt_id}: " + prompts.loc[prompts["prompt_id"] == prompt_id, "text"].iloc[0])
    if layer is None or head is None:
        st.caption("Click a head in the grid, or pick a layer and a head, to draw its attention on this prompt.")
        return
    kind = stats.frame.loc[stats.frame["layer"] == layer, "kind"].iloc[0]
    window = derived.run_shape(reader.manifest().get("config", {})).window_size if kind == "local" else None
    pattern = reader.get(queries.attention_map, step=map_step, prompt_id=prompt_id, layer=layer, head=head)
    tokens = derived.prompt_tokens(probe, prompt_id)
    title = f"Layer {layer} ({kind}), head {head}, step {map_step}"
    panels.chart(figures.attention_pattern(pattern.frame, tokens, window, title), pattern.frame,
                 key="attn-pattern", calls=[stats.call, pattern.call],
                 caption="Rows are query positions, columns the keys they attend to (only earlier keys: causal). "
                         "For a local head the dashed red line is the window's oldest key; nothing left of it is "
                         "visible to the head.")
    if kind == "local" and window is None:
        st.caption("The run's config does not give the window size, so the window edge is not drawn.")


attention()
