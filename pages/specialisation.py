"""Specialisation (OLMoE analyses on the probe routing of one layer): domain lift per expert, each
expert's top tokens, and co-activation of expert pairs against independent choice, one at a time."""

import streamlit as st

from analysis import queries
from app import derived, figures, panels, state

st.title("Specialisation")
selection = state.require_run()
run = str(selection.run)
ANALYSES = {"domains": "Domain lift", "vocabulary": "Vocabulary", "coactivation": "Co-activation"}


def domains(routing: derived.ProbeRouting, num_experts: int, layer: int, step: int, call: str) -> None:
    """Share of each domain's probe tokens per expert over the uniform share."""
    lift = derived.domain_lift(routing, num_experts)
    panels.chart(figures.domain_lift_heatmap(lift, f"Domain lift, layer {layer}, step {step}"), lift,
                 key="spec-domains", calls=[call, "app.derived.domain_lift(routing, num_experts)  "
                                                  "# analysis.metrics.domain_specialization"],
                 caption="Share of each domain's probe tokens routed to each expert, over the uniform K/E. Red (> 1) "
                         "is an expert the domain prefers, blue one it avoids; a row of white is no specialisation.")


def vocabulary(routing: derived.ProbeRouting, num_experts: int, layer: int, call: str) -> None:
    """Per expert, how much of its tokens' occurrences it owns, with its top tokens."""
    baseline = routing.topk.shape[1] / num_experts
    occurrences = st.slider("Count a token id seen at least", 1, 20, 2, key="spec-min-occurrences",
                            help="Rare tokens make the score noisy: under uniform routing a token seen N times "
                                 "scores about K/E + (1 - K/E)/N.")
    scores = derived.vocabulary(routing, num_experts, top_n=5, min_occurrences=occurrences)
    panels.chart(figures.vocabulary_scores(scores, baseline, f"Vocabulary specialisation, layer {layer}"), scores,
                 key="spec-vocabulary",
                 calls=[call, f"app.derived.vocabulary(routing, num_experts, top_n=5, min_occurrences={occurrences})"
                              "  # analysis.metrics.vocabulary_specialization"],
                 caption="Per expert, the mean share of its tokens' occurrences that it received: high means it owns "
                         "the tokens it gets. Dashed: uniform K/E. Hover a bar, or read the table, for its top tokens.")
    st.dataframe(scores, hide_index=True, height=260, key="spec-vocabulary-table")


def coactivation(routing: derived.ProbeRouting, num_experts: int, layer: int, call: str) -> None:
    """How often pairs of experts are chosen together, over independent choice."""
    pairs = derived.coactivation(routing, num_experts)
    panels.chart(figures.coactivation_heatmap(pairs, f"Co-activation lift, layer {layer}"), pairs,
                 key="spec-coactivation",
                 calls=[call, "app.derived.coactivation(routing, num_experts)  "
                              "# analysis.metrics.coactivation, coactivation_lift"],
                 caption="How often two experts are chosen for the same token, over all K(K-1)/2 pairs, divided by "
                         "what independent choice would give. Red pairs work together; blank rows are experts that "
                         "got no probe tokens.")


@st.fragment(run_every=selection.live_every)
def specialisation() -> None:
    """The whole page; re-read at the refresh interval while the run records."""
    reader = selection.run_data()
    steps = reader.steps_of("probe_routing")
    if not steps:
        st.info("No probe routing was recorded for this run yet; specialisation is computed from the probe set.")
        return
    step = panels.step_picker(steps, key=f"spec-step:{run}", live=selection.status == "running",
                              label="Probe step")
    every_layer = reader.get(queries.probe_routing, step=step)
    layers = sorted(int(layer) for layer in every_layer.frame["layer"].unique())
    pick, view = st.columns([1, 2])
    with pick:
        layer = panels.choose("Layer", layers, key=f"spec-layer:{run}", default=layers[len(layers) // 2])
    with view:
        analysis = st.radio("Analysis", list(ANALYSES), horizontal=True, key="spec-analysis",
                            format_func=ANALYSES.get, help="One analysis of this layer's probe routing at a time.")
    probe = reader.get(queries.probe_routing, step=step, layer=layer)
    routing = derived.probe_arrays(probe.frame)
    if routing is None:
        st.info("The probe rows of this layer have no complete top-k choices.")
        return
    shape = derived.run_shape(reader.manifest().get("config", {}))
    num_experts = shape.num_experts or int(probe.frame["expert"].max()) + 1
    topk = routing.topk.shape[1]
    st.caption(f"{routing.topk.shape[0]} probe tokens in {len(routing.domains)} domains; K = {topk}, "
               f"E = {num_experts}, uniform share K/E = {topk / num_experts:.3f}.")
    if analysis == "domains":
        domains(routing, num_experts, layer, step, probe.call)
    elif analysis == "vocabulary":
        vocabulary(routing, num_experts, layer, probe.call)
    else:
        coactivation(routing, num_experts, layer, probe.call)


specialisation()
