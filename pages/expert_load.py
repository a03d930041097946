"""Expert load: layer x expert load at a step, dead and starved experts, and on demand imbalance over steps
against the noise floor and (on click) one expert's history, top tokens and domains."""

import streamlit as st

from analysis import queries
from app import data, derived, figures, panels, state

st.title("Expert load")
selection = state.require_run()
run = str(selection.run)
LAYER_KEY, EXPERT_KEY, HEATMAP_KEY = f"load-layer:{run}", f"load-expert:{run}", "load-heatmap"


def pick_cell() -> None:
    """Copy the clicked heatmap layer and expert (the target's customdata ends with it) into the drill-down."""
    point = panels.selected_point(HEATMAP_KEY)
    if point is not None:
        st.session_state[LAYER_KEY], st.session_state[EXPERT_KEY] = round(point["y"]), int(point["customdata"][-1])


def top_k(reader: data.RunData, shape: derived.RunShape, probe_steps: list[int]) -> int | None:
    """K from the config, else from the probe routing, else None."""
    if shape.topk is not None or not probe_steps:
        return shape.topk
    return derived.topk_from_probe(reader.get(queries.probe_routing, step=probe_steps[-1]).frame)


def imbalance(reader: data.RunData, layer: int, metric: str, topk: int | None) -> None:
    """One imbalance measure over steps: median, worst and the chosen layer, beside the noise floor."""
    summary = reader.get(queries.load_summary)
    floors = derived.noise_floors(summary.frame, topk) if topk else None
    floor_call = f"app.derived.noise_floors(frame, topk={topk})  # analysis.metrics.noise_floor_*"
    one_layer = reader.get(queries.load_imbalance, layer=layer)
    panels.chart(figures.imbalance_over_steps(summary.frame, {layer: one_layer.frame}, floors, metric),
                 summary.frame.merge(one_layer.frame[["step", metric]].rename(columns={metric: f"layer_{layer}"}),
                                     on="step", how="left"),
                 key="load-imbalance", calls=[summary.call, one_layer.call, floor_call],
                 caption="MaxVio = max r - 1, CV = std/mean of the loads, normalised entropy H/ln E (1 = "
                         "perfectly even). The dashed grey line is what perfectly uniform random routing shows "
                         "at the same token count: values near it are noise, not imbalance.")
    if floors is None:
        st.info("The noise floor needs top-k, which this run's config and probe rows do not give.")


@st.fragment(run_every=selection.live_every)
def expert_load() -> None:
    """The whole page; re-read at the refresh interval while the run records."""
    reader = selection.run_data()
    steps = reader.steps_of("router_load")
    if not steps:
        st.info("This run has recorded no router loads yet (dense-only so far, or recording just started).")
        return
    shape = derived.run_shape(reader.manifest().get("config", {}))
    probe_steps = reader.steps_of("probe_routing")
    topk = top_k(reader, shape, probe_steps)

    pick, mode = st.columns([4, 1])
    summed = len(steps) > 1 and mode.toggle("Sum a step range", key=f"load-sum:{run}",
                                            help="Add up the tokens of every step in a range instead of one step.")
    with pick:
        if summed:
            first, last = panels.step_range_picker(steps, key=f"load-range:{run}")
            load = reader.get(data.summed_expert_load, step_range=(first, last))
            step, title = last, f"Relative load, steps {first} to {last} summed"
        else:
            step = panels.step_picker(steps, key=f"load-step:{run}", live=selection.status == "running")
            load = reader.get(queries.expert_load, step=step)
            title = f"Relative load at step {step}"
    panels.chart(figures.load_heatmap(load.frame, title, layer=st.session_state.get(LAYER_KEY)), load.frame,
                 key=HEATMAP_KEY, on_select=pick_cell, calls=[load.call],
                 caption="Each cell is one expert of one MoE layer: its tokens c over the fair share c̄ = K·T/E. "
                         "1 (white) is a fair share, red is overloaded, blue underused (colours saturate at 0 and 2; "
                         "hover for the values). Click a cell to see that expert below. With many experts, a row's "
                         "hover gives its range and a click opens its most unbalanced expert; the chosen layer's "
                         "row (outlined) then takes clicks and hovers expert by expert.")

    layers = sorted(int(layer) for layer in load.frame["layer"].unique())
    experts = sorted(int(expert) for expert in load.frame["expert"].unique())
    left, right = st.columns([3, 2])
    with left:
        layer = panels.choose("Layer", layers, key=LAYER_KEY, default=layers[0],
                              help="The layer drawn beside the median and worst layer, and drilled into below.")
        metric = st.radio("Imbalance over steps", list(figures.METRIC_LABELS), horizontal=True, key="load-metric",
                          index=None, format_func=figures.METRIC_LABELS.get)
        if metric is None:
            st.caption("Pick a measure to draw it over steps for the median, the worst and the chosen layer, beside "
                       "the noise floor of uniform routing.")
        else:
            imbalance(reader, layer, metric, topk)
    with right:
        starved = derived.starved_experts(load.frame)
        st.subheader("Dead and starved experts")
        # A line of text, not two st.metric cells: one kind of element fewer for the browser to load.
        st.markdown(f"**{int(starved['dead'].sum())}** dead (c = 0), **{len(starved)}** starved "
                    "(below 10% of the fair share c̄, dead ones included)")
        # In a popover the table is drawn when opened, not on every load of the page.
        with st.popover("List them", icon=":material/table_rows:", disabled=starved.empty):
            st.dataframe(starved, hide_index=True, height=240, key="load-starved")
        expected = "" if not topk else (f" Uniform random routing at this token count would leave "
                                        f"{derived.expected_dead(load.frame, topk):.2g} dead experts per layer "
                                        "(E (1 - K/E)^T): a dead expert means little unless that is far below 1.")
        st.caption("Experts below a tenth of their fair share at the shown step(s), dead ones included." + expected)

    st.subheader("One expert")
    expert = panels.choose_later("Expert", experts, key=EXPERT_KEY, placeholder="Click a heatmap cell or pick one",
                                 help="Click a heatmap cell, or pick the expert here (the layer is picked above).")
    if expert is None:
        st.caption(f"Click a cell of the heatmap (or pick an expert of layer {layer} here) for its load and bias "
                   "over steps, its top probe tokens and its data domains.")
        return
    history = reader.get(queries.expert_history, layer=layer, expert=expert)
    panels.chart(figures.expert_history(history.frame, layer, expert), history.frame, key="load-history",
                 calls=[history.call],
                 caption="Top: this expert's load over the fair share at every recorded step (dashed: 1 = fair). "
                         "Bottom: its routing bias; the bias rises while the expert is underloaded and falls while "
                         "it is overloaded.")
    probe_step = derived.step_at_or_before(probe_steps, step)
    if probe_step is None:
        st.info("No probe routing recorded for this run, so there are no top tokens or domains to show.")
        return
    tokens, domains = st.columns(2)
    with tokens:
        top = reader.get(queries.expert_top_tokens, layer=layer, expert=expert, step=probe_step, n=15)
        st.markdown(f"**Top probe tokens at step {probe_step}**")
        st.dataframe(top.frame, hide_index=True, key="load-top-tokens")
        with st.expander("Query behind this table"):
            st.text(top.call)
    with domains:
        spread = reader.get(queries.expert_domains, layer=layer, expert=expert, step=probe_step)
        panels.chart(figures.domain_lift_bars(spread.frame, f"Domains at step {probe_step}"), spread.frame,
                     key="load-domains", calls=[spread.call],
                     caption="Share of each domain's probe tokens sent to this expert, over the uniform K/E: "
                             "above 1 the expert prefers that domain.")


expert_load()
