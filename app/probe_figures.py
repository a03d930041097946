"""Pure plotly figure builders for probe and audit results, shared by the notebook and the dashboard pages.

Each takes the DataFrame that `analysis.probing.Probe` or an audit report gives and returns a figure; nothing
here reads files or models. Token texts are hostile: they are HTML-escaped before plotly renders them.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

EXPERT_COLOURS = qualitative.Light24
VERDICT_COLOURS = {"PASS": "#2ca02c", "WARN": "#ff7f0e", "FAIL": "#d62728"}


def token_label(text: str) -> str:
    """A token's text made visible and safe for plotly: escaped, with newlines and tabs spelled out."""
    return html.escape(text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r"))


def _position_ticks(tokens: pd.Series) -> dict:
    """x-axis ticks at positions 0..T-1 labelled `position:token` (positions keep repeated tokens apart)."""
    return {"tickvals": list(tokens.index), "ticktext": [f"{i}:{token_label(t)}" for i, t in tokens.items()],
            "tickangle": -60}


def _expert_colourscale(num_experts: int) -> list[list]:
    """A stepped colourscale giving each integer expert id its own band, cycling through the palette."""
    scale = []
    for expert in range(num_experts):
        colour = EXPERT_COLOURS[expert % len(EXPERT_COLOURS)]
        scale += [[expert / num_experts, colour], [(expert + 1) / num_experts, colour]]
    return scale


def routing_figure(routing: pd.DataFrame, num_experts: int | None = None) -> go.Figure:
    """Token x layer grid of `Probe.routing` rows: each cell is coloured and labelled by the expert with the
    largest gate; the hover lists all top-k experts with gates and scores."""
    if routing.empty:
        return go.Figure().update_layout(title="no routing to show")
    experts = num_experts or int(routing["expert"].max()) + 1
    layers = sorted(routing["layer"].unique())
    tokens = routing.drop_duplicates("position").set_index("position")["token"].sort_index()
    T = len(tokens)
    top = routing[routing["rank"] == 0].pivot(index="layer", columns="position", values="expert")
    top = top.reindex(index=layers, columns=range(T))
    hover = np.full((len(layers), T), "", dtype=object)
    row_of = {layer: i for i, layer in enumerate(layers)}
    for (layer, position), group in routing.sort_values("rank").groupby(["layer", "position"]):
        choices = "<br>".join(f"expert {e}: gate {g:.3f}, score {s:.3f}"
                              for e, g, s in zip(group["expert"], group["gate"], group["score"], strict=True))
        hover[row_of[layer], position] = f"{position}:{token_label(tokens[position])} | layer {layer}<br>{choices}"
    figure = go.Figure(go.Heatmap(
        z=top.to_numpy(dtype=float), x=list(range(T)), y=[str(layer) for layer in layers],
        text=top.to_numpy(dtype=float), texttemplate="%{text:.0f}", customdata=hover,
        hovertemplate="%{customdata}<extra></extra>", colorscale=_expert_colourscale(experts), zmin=-0.5,
        zmax=experts - 0.5, showscale=False, xgap=1, ygap=1))
    figure.update_layout(title="top expert per token and MoE layer (hover: all top-k with gates)",
                         xaxis={"title": "token", **_position_ticks(tokens)},
                         yaxis={"title": "layer", "type": "category", "autorange": "reversed"},
                         height=max(300, 40 * len(layers) + 160))
    return figure


def attention_figure(attention: pd.DataFrame, window: int | None = None) -> go.Figure:
    """Query x key heatmap of `Probe.attention` rows with the sink mass per query beside it; for a local head
    the window edge (the oldest key a query still sees) is drawn. `window` None takes `attention.attrs`."""
    if attention.empty:
        return go.Figure().update_layout(title="no attention to show")
    window = attention.attrs.get("window") if window is None else window
    T = int(attention["query_pos"].max()) + 1
    probs = np.full((T, T), np.nan)
    probs[attention["query_pos"], attention["key_pos"]] = attention["prob"]
    labels = attention.drop_duplicates("key_pos").set_index("key_pos")["key_token"].sort_index()
    names = [f"{i}:{token_label(t)}" for i, t in labels.items()]
    sink = attention.drop_duplicates("query_pos").set_index("query_pos")["sink_mass"].sort_index()
    figure = make_subplots(rows=1, cols=2, column_widths=[0.92, 0.08], shared_yaxes=True, horizontal_spacing=0.02)
    figure.add_trace(go.Heatmap(
        z=probs, x=list(range(T)), y=list(range(T)), coloraxis="coloraxis",
        customdata=np.array([[f"{names[q]} -> {names[k]}" for k in range(T)] for q in range(T)], dtype=object),
        hovertemplate="%{customdata}<br>p = %{z:.4f}<extra></extra>"), row=1, col=1)
    figure.add_trace(go.Heatmap(
        z=sink.to_numpy()[:, None], x=["sink"], y=list(range(T)), coloraxis="coloraxis",
        customdata=np.array(names, dtype=object)[:, None],
        hovertemplate="%{customdata}<br>sink mass %{z:.4f}<extra></extra>"), row=1, col=2)
    if window is not None and window < T:
        queries = np.arange(window - 1, T)
        figure.add_trace(go.Scatter(x=queries - window + 0.5, y=queries, mode="lines", name=f"window edge ({window})",
                                    line={"color": "red", "width": 2, "dash": "dot"}, hoverinfo="skip"),
                         row=1, col=1)
    attrs = attention.attrs
    title = (f"layer {attrs['layer']} head {attrs['head']} ({attrs.get('kind', '')})" if "layer" in attrs
             else "attention")
    figure.update_layout(title=title, coloraxis={"colorscale": "Viridis", "cmin": 0, "cmax": 1},
                         height=max(400, 12 * T + 200), showlegend=window is not None and window < T,
                         legend={"orientation": "h", "x": 0, "y": 1.02, "yanchor": "bottom"})
    ticks = {"tickvals": list(range(T)), "ticktext": names}
    figure.update_xaxes(title="key", tickangle=-60, **ticks, row=1, col=1)
    figure.update_yaxes(title="query", autorange="reversed", **ticks, row=1, col=1)
    return figure


def expert_importance_figure(importance: pd.DataFrame) -> go.Figure:
    """Loss change when each expert is ablated (top) above its load fraction against the uniform 1/E (bottom)."""
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                           subplot_titles=("loss change when ablated (nats/token)", "load fraction"))
    experts = importance["expert"]
    figure.add_trace(go.Bar(x=experts, y=importance["loss_delta"], name="loss delta", marker_color="#636efa"),
                     row=1, col=1)
    figure.add_trace(go.Bar(x=experts, y=importance["load_fraction"], name="load fraction", marker_color="#00cc96"),
                     row=2, col=1)
    if len(importance):
        figure.add_hline(y=1 / len(importance), line_dash="dash", annotation_text="uniform 1/E", row=2, col=1)
    layer = importance.attrs.get("layer")
    figure.update_layout(title=f"expert importance, layer {layer}" if layer else "expert importance",
                         showlegend=False, height=500)
    figure.update_xaxes(title="expert", row=2, col=1)
    return figure


def audit_max_vio_figure(layers: pd.DataFrame, warn_margin: float, fail_margin: float) -> go.Figure:
    """MaxVio per layer (coloured by verdict) against uniform routing's floor and the WARN / FAIL lines.
    `layers` needs columns layer, max_vio, max_vio_floor, verdict (an audit report's layers)."""
    figure = go.Figure()
    if layers.empty:
        return figure.update_layout(title="no layers audited")
    x = layers["layer"]
    for name, offset, dash in (("noise floor", 0.0, "solid"), ("WARN line", warn_margin, "dot"),
                               ("FAIL line", fail_margin, "dash")):
        figure.add_trace(go.Scatter(x=x, y=layers["max_vio_floor"] + offset, mode="lines", name=name,
                                    line={"dash": dash, "color": "grey"}))
    colours = [VERDICT_COLOURS.get(verdict, "black") for verdict in layers["verdict"]]
    figure.add_trace(go.Scatter(x=x, y=layers["max_vio"], mode="markers", name="MaxVio",
                                marker={"size": 10, "color": colours}, customdata=layers["verdict"],
                                hovertemplate="layer %{x}: MaxVio %{y:.3f} (%{customdata})<extra></extra>"))
    figure.update_layout(title="MaxVio per MoE layer against its noise floor", xaxis_title="layer",
                         yaxis_title="MaxVio", height=400)
    return figure
