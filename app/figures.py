"""Pure figure builders: a DataFrame in, a plotly Figure out; no Streamlit, testable on their own.

Every figure stays under MAX_POINTS plotted values (line points plus heatmap cells): long series
are thinned to evenly spaced rows and wide heatmaps are averaged over blocks of columns. Text that
users control (token texts, domains, prompts, run descriptions) goes through `safe_label` before it
reaches plotly, because plotly renders a subset of HTML in labels and hover text.
"""

from __future__ import annotations

import html
import math
import unicodedata
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis import metrics

MAX_POINTS = 200_000
LABEL_LIMIT = 48
METRIC_LABELS = {"max_vio": "MaxVio", "cv": "CV", "entropy_norm": "normalised entropy"}
HEAD_METRIC_LABELS = {"entropy": "entropy (nats)", "sink_mass": "sink mass", "mean_distance": "mean distance",
                      "window_mass": "window mass"}
DIVERGING = "RdBu_r"
# Ratios to a fair or uniform share (relative load, lift): white at 1, saturating at 0 and 2; hover has the value.
RATIO_COLOURS = {"colorscale": DIVERGING, "zmin": 0.0, "zmax": 2.0}
SEQUENTIAL = "Viridis"
# Clicks on a heatmap cell reach Streamlit only through a point trace (plotly heatmaps send no
# selection data), so selectable heatmaps carry a point per cell (_cell_targets) or a bar per row (_row_targets).
INVISIBLE = {"opacity": 0}
# A click anywhere in a cell picks that cell's point: with no hover distance cut-off the nearest centre wins.
SELECTABLE = {"clickmode": "event+select", "hoverdistance": -1}
# Row targets (_row_targets) need plotly's default hover distance: with none, every bar is as near as any other.
ROW_SELECTABLE = {"clickmode": "event+select"}
# Bigger grids click by row (_row_targets), not by cell: a point per cell costs bytes and hover search.
CELL_TARGET_LIMIT = 2000
# The widest margin text tick labels get (longer labels are cut by plotly's clipping, hover has them whole).
MAX_LABEL_MARGIN = 260
# Heatmaps over steps keep at most this many step columns (a chart is about 1000 px wide; more only costs bytes).
STEP_COLUMNS = 250


def _visible(char: str) -> str:
    """A control or format character (newline, tab, direction override) written as an escape."""
    if unicodedata.category(char) not in ("Cc", "Cf"):
        return char
    return {"\n": "\\n", "\t": "\\t"}.get(char, f"\\u{ord(char):04x}")


def safe_label(text: object, limit: int = LABEL_LIMIT) -> str:
    """User text made inert for plotly: control and direction-override characters written as escapes,
    cut to `limit` characters, then HTML-escaped so no tag or link survives."""
    cleaned = "".join(_visible(char) for char in str(text))
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 1] + "\u2026"
    return html.escape(cleaned, quote=False)


def count_points(figure: go.Figure) -> int:
    """Plotted values in a figure: heatmap cells plus points of every other trace."""
    total = 0
    for trace in figure.data:
        z = getattr(trace, "z", None)
        if z is not None:
            total += int(np.size(z))
            continue
        values = next((v for v in (getattr(trace, "x", None), getattr(trace, "y", None)) if v is not None), ())
        total += len(values)
    return total


def thin_rows(frame: pd.DataFrame, max_rows: int) -> pd.DataFrame:
    """At most `max_rows` evenly spaced rows of `frame`, the first and last always kept."""
    if len(frame) <= max_rows:
        return frame
    keep = np.unique(np.linspace(0, len(frame) - 1, max(2, max_rows)).round().astype(int))
    return frame.iloc[keep]


def pool_columns(matrix: np.ndarray, columns: np.ndarray, max_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Average blocks of the same number of neighbouring columns until rows x columns <= max_cells (the
    last block may be narrower); each block is labelled with its first column value, so evenly spaced
    columns give evenly spaced labels. Returns (matrix, column labels) unchanged when it already fits."""
    rows, width = matrix.shape
    if rows * width <= max_cells:
        return matrix, columns
    blocks = max(1, max_cells // max(rows, 1))
    # Equal widths keep the labels evenly spaced: plotly then draws the heatmap as one scaled image
    # (one pixel per cell) instead of cell by cell, several times faster in the browser.
    pooled, starts = metrics.span_means(matrix.T, math.ceil(width / blocks))
    return pooled.T.astype(matrix.dtype), columns[starts]


def _matrix(frame: pd.DataFrame, rows: str, columns: str, value: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(matrix [rows x columns] as float32, the mean of each cell's values, NaN where it has none; sorted row
    labels; sorted column labels) from long rows: pandas' pivot_table by bincount, several times faster."""
    row_labels, row = np.unique(frame[rows].to_numpy(), return_inverse=True)
    column_labels, column = np.unique(frame[columns].to_numpy(), return_inverse=True)
    values = frame[value].to_numpy(dtype=np.float64)
    seen = ~np.isnan(values)
    cell = (row * len(column_labels) + column)[seen]
    size = len(row_labels) * len(column_labels)
    counts = np.bincount(cell, minlength=size)
    sums = np.bincount(cell, weights=values[seen], minlength=size)
    means = np.divide(sums, counts, out=np.full(size, np.nan), where=counts > 0)
    return means.reshape(len(row_labels), len(column_labels)).astype(np.float32), row_labels, column_labels


def _cell_targets(x: np.ndarray, y: np.ndarray, hovertemplate: str, customdata: np.ndarray | None = None) -> go.Scatter:
    """A point on every cell centre so that clicking a cell selects it. Text mode with no text: plotly draws
    nothing for such a point, yet hovers and selects it like a marker; an invisible marker per cell cost 40 ms
    per draw on the 80 x 8 head grid (styled one by one), and Streamlit draws each chart twice per page load."""
    xx, yy = np.meshgrid(x, y)
    return go.Scatter(x=xx.ravel(), y=yy.ravel(), mode="text", name="cells", showlegend=False,
                      hovertemplate=hovertemplate, customdata=customdata)


def _cell_range(x: np.ndarray) -> list[float]:
    """[left edge, right edge] of the cells of evenly spaced column labels."""
    half = float(x[1] - x[0]) / 2 if len(x) > 1 else 0.5
    return [float(x[0]) - half, float(x[-1]) + half]


def _row_targets(z: np.ndarray, x: np.ndarray, y: np.ndarray, label: str, *, centre: float, value_format: str,
                 skip_row: object = None) -> go.Bar:
    """One invisible bar across each row (rows other than `skip_row`), so that a click anywhere in a row selects
    it; the hover sums the row up, and the customdata ends with the column of its value furthest from `centre`.
    79 bars draw in a few milliseconds where a marker per block of a 79 x 256 grid took 0.15 s per draw, and
    Streamlit draws every chart twice on a page load."""
    rows = np.array([label_y != skip_row for label_y in y], dtype=bool)
    values = z[rows]
    spread = np.where(np.isnan(values), -1.0, np.abs(values - centre))
    furthest = spread.argmax(axis=1)
    low, high = np.fmin.reduce(values, axis=1), np.fmax.reduce(values, axis=1)  # NaN only for an empty row
    custom = [[f"{label} from {format(a, value_format)} to {format(b, value_format)}; furthest from "
               f"{format(centre, 'g')}: expert {x[far]} at {format(row[far], value_format)}"
               if not np.isnan(a) else "no values", x[far]]
              for a, b, far, row in zip(low, high, furthest, values, strict=True)]
    left, right = _cell_range(x)
    return go.Bar(x=np.full(rows.sum(), right - left), y=y[rows], base=left, orientation="h",
                  width=1.0, name="rows", showlegend=False, marker=INVISIBLE, selected={"marker": INVISIBLE},
                  unselected={"marker": INVISIBLE}, customdata=np.array(custom, dtype=object),
                  hovertemplate="layer %{y}: %{customdata[0]}<extra></extra>")


def _empty(title: str) -> go.Figure:
    """A figure with a title and no traces, for a builder given no rows."""
    return go.Figure(layout={"title": {"text": title}})


def _label_margin(labels: Sequence[str], least: int) -> int:
    """Pixels of margin that tick labels of these lengths (12 px font, about 7 px a character) and an axis title
    need, at least `least`."""
    longest = max((len(label) for label in labels), default=0)
    return min(MAX_LABEL_MARGIN, max(least, 30 + 7 * longest))


def _layout(figure: go.Figure, title: str, height: int = 420, *, left_labels: Sequence[str] = (),
            bottom_labels: Sequence[str] = (), **layout: object) -> go.Figure:
    """Shared layout: title, closest-point hover, and margins fixed from the tick labels given (text ones; numbers
    fit the defaults): plotly's automargin lays a chart out a second time, which doubled its drawing time."""
    figure.update_xaxes(automargin=False)
    figure.update_yaxes(automargin=False)
    margin = {"l": _label_margin(left_labels, 80), "r": 20, "t": 50, "b": _label_margin(bottom_labels, 50)}
    figure.update_layout(title={"text": title}, height=height, margin=margin, **{"hovermode": "closest", **layout})
    return figure


# --- Runs --------------------------------------------------------------------------------------------------


def loss_curves(curves: Mapping[str, pd.DataFrame]) -> go.Figure:
    """LM loss (eval loss as markers), aux loss and tokens/s over steps, one colour per run.
    curves: run label -> frame with step, lm_loss, aux_loss, eval_loss, tokens_per_s."""
    figure = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                           subplot_titles=("LM loss (eval loss as markers)", "aux loss", "tokens/s"))
    budget = MAX_POINTS // max(1, 4 * len(curves))
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")
    for index, (label, frame) in enumerate(curves.items()):
        name, color = safe_label(label), palette[index % len(palette)]
        thin = thin_rows(frame, budget)
        for row, column in ((1, "lm_loss"), (2, "aux_loss"), (3, "tokens_per_s")):
            figure.add_trace(go.Scatter(x=thin["step"], y=thin[column], mode="lines", name=name, legendgroup=name,
                                        line={"color": color}, showlegend=row == 1), row=row, col=1)
        evals = thin_rows(frame.dropna(subset=["eval_loss"]), budget)
        if len(evals):
            figure.add_trace(go.Scatter(x=evals["step"], y=evals["eval_loss"], mode="markers", name=f"{name} eval",
                                        legendgroup=name, marker={"color": color, "symbol": "diamond"}), row=1, col=1)
    figure.update_xaxes(title_text="step", row=3, col=1)
    figure.update_yaxes(title_text="loss", row=1, col=1)
    figure.update_yaxes(title_text="aux loss", row=2, col=1)
    figure.update_yaxes(title_text="tokens/s", row=3, col=1)
    return _layout(figure, "Training curves", height=640)


# --- Expert load -------------------------------------------------------------------------------------------


def load_heatmap(load: pd.DataFrame, title: str, layer: int | None = None) -> go.Figure:
    """Relative load r = c / c̄ per layer (rows) and expert (columns), 1 = fair share. A click selects a layer
    and an expert (the selected point's customdata ends with the expert): on a small grid the expert clicked;
    on a big one the row's most unbalanced expert (largest |r - 1|), which the row's hover names, except in
    `layer`'s row (outlined), which takes clicks expert by expert.
    load: layer, expert, tokens, relative_load (one step, or steps already summed)."""
    if load.empty:
        return _empty(title)
    z, layers, experts = _matrix(load, "layer", "expert", "relative_load")
    tokens, _, _ = _matrix(load, "layer", "expert", "tokens")
    if z.size > MAX_POINTS // 2:
        z, experts = pool_columns(z, experts, MAX_POINTS // 2)
        tokens = None
    figure = go.Figure(go.Heatmap(z=z, x=experts, y=layers, **RATIO_COLOURS, colorbar={"title": {"text": "c / c̄"}},
                                  hoverinfo="skip"))
    if tokens is None:
        figure.add_trace(_row_targets(z, experts, layers, "mean relative load of pooled experts", centre=1.0,
                                      value_format=".2f"))
    else:
        exact = layers if z.size <= CELL_TARGET_LIMIT else layers[layers == layer]
        if len(exact) < len(layers):
            figure.add_trace(_row_targets(z, experts, layers, "relative load", centre=1.0, value_format=".2f",
                                          skip_row=layer))
        if len(exact):
            rows = np.isin(layers, exact)
            # An object array goes to the browser as plain lists: Streamlit hands a typed array's row back as a
            # dict, and the page reads the expert from the end of the selected point's customdata.
            custom = np.stack([z[rows].ravel(), tokens[rows].ravel(), np.tile(experts, len(exact))], axis=1,
                              dtype=object)
            figure.add_trace(_cell_targets(experts, exact, "layer %{y}, expert %{x}<br>relative load "
                                           "%{customdata[0]:.2f}, tokens %{customdata[1]:,.0f}<extra></extra>",
                                           custom))
        if 0 < len(exact) < len(layers):
            figure.add_shape(type="rect", x0=experts[0] - 0.5, x1=experts[-1] + 0.5, y0=layer - 0.5, y1=layer + 0.5,
                             line={"color": "black", "width": 1.5})
    # Pinned to the cells: plotly pads an axis for bars, which would leave a blank strip beside the heatmap.
    figure.update_xaxes(title_text="expert", range=_cell_range(experts))
    figure.update_yaxes(title_text="layer", autorange="reversed")
    by_row = any(trace.name == "rows" for trace in figure.data)
    return _layout(figure, title, height=max(320, min(900, 60 + 9 * len(layers))),
                   **(ROW_SELECTABLE if by_row else SELECTABLE))


def imbalance_over_steps(summary: pd.DataFrame, layers: Mapping[int, pd.DataFrame], floors: pd.DataFrame | None,
                         metric: str) -> go.Figure:
    """One imbalance metric over steps: median and worst layer, chosen layers, and the noise floor of
    uniform routing at the same token count (dashed). summary: step, <metric>_median, <metric>_worst
    (queries.load_summary); layers: layer -> step, <metric>; floors: step, <metric> (None: no floor)."""
    label = METRIC_LABELS[metric]
    title = f"{label} over steps"
    if summary.empty:
        return _empty(title)
    series = {"median over layers": summary[["step", f"{metric}_median"]].set_axis(["step", metric], axis=1),
              "worst layer": summary[["step", f"{metric}_worst"]].set_axis(["step", metric], axis=1)}
    series.update({f"layer {int(layer)}": frame[["step", metric]] for layer, frame in layers.items()})
    budget = MAX_POINTS // (len(series) + 1)
    figure = go.Figure()
    for name, values in series.items():
        thin = thin_rows(values, budget)
        dash = "dot" if name == "worst layer" else None
        figure.add_trace(go.Scatter(x=thin["step"], y=thin[metric], mode="lines", name=name, line={"dash": dash}))
    if floors is not None and not floors.empty:
        thin = thin_rows(floors, budget)
        figure.add_trace(go.Scatter(x=thin["step"], y=thin[metric], mode="lines", name="noise floor (uniform routing)",
                                    line={"dash": "dash", "color": "grey"}))
    figure.update_xaxes(title_text="step")
    figure.update_yaxes(title_text=label)
    return _layout(figure, title, height=380)


def expert_history(history: pd.DataFrame, layer: int, expert: int) -> go.Figure:
    """One expert over steps: relative load (tokens / fair share) above, its routing bias below.
    history: step, tokens, relative_load, bias."""
    title = f"Layer {layer}, expert {expert} over steps"
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                           subplot_titles=("relative load c / c̄", "bias"))
    thin = thin_rows(history, MAX_POINTS // 3)
    figure.add_trace(go.Scatter(x=thin["step"], y=thin["relative_load"], mode="lines", name="relative load"), 1, 1)
    figure.add_trace(go.Scatter(x=thin["step"], y=np.ones(len(thin)), mode="lines", name="fair share",
                                line={"dash": "dash", "color": "grey"}), 1, 1)
    figure.add_trace(go.Scatter(x=thin["step"], y=thin["bias"], mode="lines", name="bias"), 2, 1)
    figure.update_xaxes(title_text="step", row=2, col=1)
    figure.update_yaxes(title_text="c / c̄", row=1, col=1)
    figure.update_yaxes(title_text="bias", row=2, col=1)
    return _layout(figure, title, height=420)


def domain_lift_bars(domains: pd.DataFrame, title: str) -> go.Figure:
    """Lift per data domain (share of the domain's tokens routed here / uniform K/E); 1 = no preference.
    domains: domain, tokens, routed, share, lift."""
    if domains.empty:
        return _empty(title)
    labels = [safe_label(domain) for domain in domains["domain"]]
    figure = go.Figure(go.Bar(x=labels, y=domains["lift"], customdata=domains[["routed", "tokens"]].to_numpy(),
                              hovertemplate="%{x}: lift %{y:.2f} (%{customdata[0]} of %{customdata[1]} tokens)"
                                            "<extra></extra>", name="lift"))
    figure.add_hline(y=1.0, line_dash="dash", line_color="grey")
    short = [safe_label(domain, 16) for domain in domains["domain"]]  # the hover has the whole name
    figure.update_xaxes(title_text="domain", type="category", tickmode="array", tickvals=labels, ticktext=short)
    figure.update_yaxes(title_text="lift (1 = uniform)")
    return _layout(figure, title, height=320, bottom_labels=short)


# --- Expert bias -------------------------------------------------------------------------------------------


def bias_heatmap(bias: pd.DataFrame, title: str) -> go.Figure:
    """Routing bias per layer (rows) and expert (columns), centred on 0; a click selects a layer, whose bias
    range and largest |bias| the hover gives.
    bias: layer, expert, bias."""
    if bias.empty:
        return _empty(title)
    z, layers, experts = _matrix(bias, "layer", "expert", "bias")
    z, experts = pool_columns(z, experts, MAX_POINTS // 2)
    figure = go.Figure(go.Heatmap(z=z, x=experts, y=layers, colorscale=DIVERGING, zmid=0.0,
                                  colorbar={"title": {"text": "bias"}}, hoverinfo="skip"))
    figure.add_trace(_row_targets(z, experts, layers, "bias", centre=0.0, value_format="+.3g"))
    figure.update_xaxes(title_text="expert", range=_cell_range(experts))
    figure.update_yaxes(title_text="layer", autorange="reversed")
    return _layout(figure, title, height=max(320, min(900, 60 + 9 * len(layers))), **ROW_SELECTABLE)


def bias_over_steps(history: pd.DataFrame, layer: int) -> go.Figure:
    """One layer's biases: experts (rows) over steps (columns), centred on 0. history: step, expert, bias."""
    title = f"Layer {layer}: bias over steps"
    if history.empty:
        return _empty(title)
    z, experts, steps = _matrix(history, "expert", "step", "bias")
    z, steps = pool_columns(z, steps, min(MAX_POINTS // 2, STEP_COLUMNS * len(experts)))
    figure = go.Figure(go.Heatmap(z=z, x=steps, y=experts, colorscale=DIVERGING, zmid=0.0,
                                  colorbar={"title": {"text": "bias"}},
                                  hovertemplate="step %{x}, expert %{y}<br>bias %{z:.4g}<extra></extra>"))
    figure.update_xaxes(title_text="step")
    figure.update_yaxes(title_text="expert", autorange="reversed")
    return _layout(figure, title, height=max(320, min(700, 60 + 3 * len(experts))))


def drift_scatter(drift: pd.DataFrame, layer: int) -> go.Figure:
    """Each expert's bias path: straightness (1 = steady drift) against sign-change rate (1 = flips every
    move), coloured by verdict. drift: expert, label, straightness, sign_change_rate."""
    title = f"Layer {layer}: drift or dithering per expert"
    if drift.empty:
        return _empty(title)
    figure = go.Figure()
    for label, group in drift.groupby("label"):
        figure.add_trace(go.Scatter(x=group["straightness"], y=group["sign_change_rate"], mode="markers",
                                    name=str(label), customdata=group["expert"],
                                    hovertemplate="expert %{customdata}<br>straightness %{x:.2f}, "
                                                  "sign changes %{y:.2f}<extra></extra>"))
    figure.update_xaxes(title_text="straightness |e_last - e_first| / path", range=[-0.05, 1.05])
    figure.update_yaxes(title_text="sign-change rate", range=[-0.05, 1.05])
    return _layout(figure, title, height=380)


def layer_step_heatmap(frame: pd.DataFrame, value: str, title: str, colorbar: str) -> go.Figure:
    """One per-layer statistic as layers (rows) over steps (columns). frame: step, layer, <value>."""
    rows = frame.dropna(subset=[value])
    if rows.empty:
        return _empty(title)
    z, layers, steps = _matrix(rows, "layer", "step", value)
    z, steps = pool_columns(z, steps, min(MAX_POINTS // 2, STEP_COLUMNS * len(layers)))
    figure = go.Figure(go.Heatmap(z=z, x=steps, y=layers, colorscale=SEQUENTIAL, colorbar={"title": {"text": colorbar}},
                                  hovertemplate="step %{x}, layer %{y}<br>%{z:.4g}<extra></extra>"))
    figure.update_xaxes(title_text="step")
    figure.update_yaxes(title_text="layer", autorange="reversed")
    return _layout(figure, title, height=max(300, min(700, 60 + 6 * len(layers))))


# --- Value residual ----------------------------------------------------------------------------------------


def lambda_lines(frame: pd.DataFrame, layers: Sequence[int]) -> go.Figure:
    """Value-residual lambda of chosen layers over steps. frame: step, layer, lambda."""
    title = "Value-residual lambda over steps"
    chosen = frame[frame["layer"].isin(list(layers))]
    if chosen.empty:
        return _empty(title)
    budget = MAX_POINTS // max(1, len(layers))
    figure = go.Figure()
    for layer, group in chosen.groupby("layer"):
        thin = thin_rows(group, budget)
        figure.add_trace(go.Scatter(x=thin["step"], y=thin["lambda"], mode="lines", name=f"layer {int(layer)}"))
    figure.update_xaxes(title_text="step")
    figure.update_yaxes(title_text="lambda")
    return _layout(figure, title, height=360)


def lambda_bars(latest: pd.DataFrame, step: int) -> go.Figure:
    """Value-residual lambda per layer at one step. latest: layer, lambda."""
    title = f"Lambda per layer at step {step}"
    if latest.empty:
        return _empty(title)
    figure = go.Figure(go.Bar(x=latest["layer"], y=latest["lambda"], name="lambda",
                              hovertemplate="layer %{x}: lambda %{y:.4f}<extra></extra>"))
    figure.update_xaxes(title_text="layer")
    figure.update_yaxes(title_text="lambda")
    return _layout(figure, title, height=320)


# --- Attention ---------------------------------------------------------------------------------------------


def head_grid(stats: pd.DataFrame, metric: str, title: str) -> go.Figure:
    """Layers (rows) x heads (columns) coloured by one attention statistic; global layers are outlined
    and cells are clickable. stats: layer, head, kind, <metric>."""
    if stats.empty:
        return _empty(title)
    z, layers, heads = _matrix(stats, "layer", "head", metric)
    kinds = stats.drop_duplicates("layer").set_index("layer")["kind"].reindex(layers).fillna("?").to_numpy()
    custom = np.stack([np.repeat(kinds, len(heads)), z.ravel()], axis=1)
    figure = go.Figure(go.Heatmap(z=z, x=heads, y=layers, colorscale=SEQUENTIAL, hoverinfo="skip",
                                  colorbar={"title": {"text": HEAD_METRIC_LABELS[metric]}}))
    figure.add_trace(_cell_targets(heads, layers, "layer %{y} (%{customdata[0]}), head %{x}<br>"
                                   f"{HEAD_METRIC_LABELS[metric]} %{{customdata[1]:.3g}}<extra></extra>", custom))
    # Every outline in one SVG path: a shape per global layer took plotly 25 ms more per draw (20 layers).
    left, right = heads[0] - 0.5, heads[-1] + 0.5
    outlines = " ".join(f"M{left},{layer - 0.5}H{right}V{layer + 0.5}H{left}Z" for layer in layers[kinds == "global"])
    if outlines:
        figure.add_shape(type="path", path=outlines, line={"color": "black", "width": 2})
    # Labelling every layer costs the browser more than the whole grid; outlines and hover carry the kind.
    figure.update_xaxes(title_text="head", dtick=1)
    figure.update_yaxes(title_text="layer (outlined: global attention)", autorange="reversed")
    return _layout(figure, title, height=max(320, min(900, 60 + 9 * len(layers))), **SELECTABLE)


def attention_pattern(pattern: pd.DataFrame, tokens: Sequence[str], window: int | None, title: str) -> go.Figure:
    """One head's attention probabilities, queries (rows, labelled with their tokens) x keys (columns); for a
    local head the dashed line is the oldest key inside the window (key = query - window + 1).
    pattern: query_pos, key_pos, prob."""
    if pattern.empty:
        return _empty(title)
    size = int(max(pattern["query_pos"].max(), pattern["key_pos"].max())) + 1
    z = np.full((size, size), np.nan, dtype=np.float32)
    z[pattern["query_pos"].to_numpy(), pattern["key_pos"].to_numpy()] = pattern["prob"].to_numpy()
    positions = np.arange(size)
    pooled, keys = pool_columns(z, positions, MAX_POINTS // 2)
    labels = [f"{position} {safe_label(token, 16)}" for position, token in zip(positions, tokens, strict=False)]
    labels += [str(position) for position in positions[len(labels):]]
    figure = go.Figure(go.Heatmap(z=pooled, x=keys, y=positions, colorscale=SEQUENTIAL,
                                  colorbar={"title": {"text": "p"}},
                                  hovertemplate="query %{y}, key %{x}<br>p %{z:.3f}<extra></extra>"))
    if window is not None and window < size:
        figure.add_trace(go.Scatter(x=[0, size - window], y=[window - 1, size - 1], mode="lines",
                                    name=f"window edge (W={window})", line={"dash": "dash", "color": "red"}))
    tokened = size <= 64  # tokens on the query axis only: rotated labels on both axes double the drawing time
    if tokened:
        figure.update_yaxes(tickmode="array", tickvals=positions, ticktext=labels)
    figure.update_xaxes(title_text="key position")
    figure.update_yaxes(title_text="query position", autorange="reversed")
    return _layout(figure, title, height=560, left_labels=labels if tokened else ())


# --- Specialisation ----------------------------------------------------------------------------------------


def domain_lift_heatmap(lift: pd.DataFrame, title: str) -> go.Figure:
    """Domains (rows) x experts (columns) coloured by lift = share / (K/E); 1 = uniform routing.
    lift: domain, expert, share, lift."""
    if lift.empty:
        return _empty(title)
    frame = lift.assign(domain=[safe_label(domain) for domain in lift["domain"]])
    z, domains, experts = _matrix(frame, "domain", "expert", "lift")
    z, experts = pool_columns(z, experts, MAX_POINTS)
    figure = go.Figure(go.Heatmap(z=z, x=experts, y=domains, **RATIO_COLOURS, colorbar={"title": {"text": "lift"}},
                                  hovertemplate="%{y}, expert %{x}<br>lift %{z:.2f}<extra></extra>"))
    figure.update_xaxes(title_text="expert")
    figure.update_yaxes(title_text="domain", type="category")
    return _layout(figure, title, height=max(260, 80 + 40 * len(domains)), left_labels=list(domains))


def coactivation_heatmap(pairs: pd.DataFrame, title: str) -> go.Figure:
    """Expert x expert co-activation lift (observed / expected if chosen independently); 1 = independent,
    blank where an expert got no probe tokens. pairs: expert_a, expert_b, count, lift."""
    if pairs.empty:
        return _empty(title)
    z, rows, columns = _matrix(pairs, "expert_a", "expert_b", "lift")
    z, columns = pool_columns(z, columns, MAX_POINTS)
    figure = go.Figure(go.Heatmap(z=z, x=columns, y=rows, **RATIO_COLOURS, colorbar={"title": {"text": "lift"}},
                                  hovertemplate="experts %{y} and %{x}<br>lift %{z:.2f}<extra></extra>"))
    figure.update_xaxes(title_text="expert")
    figure.update_yaxes(title_text="expert", autorange="reversed")
    return _layout(figure, title, height=520)


def vocabulary_scores(vocabulary: pd.DataFrame, baseline: float, title: str) -> go.Figure:
    """Vocabulary specialisation score per expert (mean share of each routed token's occurrences that
    went to this expert) against the uniform baseline K/E. vocabulary: expert, score, top_tokens."""
    if vocabulary.empty:
        return _empty(title)
    hover = [safe_label(tokens, 80) for tokens in vocabulary["top_tokens"]]
    figure = go.Figure(go.Bar(x=vocabulary["expert"], y=vocabulary["score"], name="score", hovertext=hover,
                              hovertemplate="expert %{x}: score %{y:.2f}<br>%{hovertext}<extra></extra>"))
    figure.add_hline(y=baseline, line_dash="dash", line_color="grey")
    figure.update_xaxes(title_text="expert")
    figure.update_yaxes(title_text="score (dashed: uniform K/E)")
    return _layout(figure, title, height=340)
