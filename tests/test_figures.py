"""Figure builders on small frames: trace types, shapes, axis titles, the noise floor, point caps, escaping."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from app import figures
from app.figures import MAX_POINTS, count_points

HOSTILE = "<img src=x onerror=alert(1)>"


def grid(layers: range, experts: int, value: str, values: np.ndarray | None = None, **extra: object) -> pd.DataFrame:
    """Long rows over layers x experts with one value column."""
    layer = np.repeat(np.array(layers), experts)
    expert = np.tile(np.arange(experts), len(layers))
    data = values if values is not None else np.linspace(0.5, 1.5, len(layer))
    return pd.DataFrame({"layer": layer, "expert": expert, value: data, **extra})


def trace_types(figure: go.Figure) -> list[str]:
    """The type of every trace, in order."""
    return [trace.type for trace in figure.data]


def test_safe_label_makes_markup_and_controls_inert() -> None:
    assert figures.safe_label("<script>alert(1)</script>") == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert figures.safe_label("a\nb\u202ec") == "a\\nb\\u202ec"
    long = figures.safe_label("x" * 500)
    assert len(long) == figures.LABEL_LIMIT and long.endswith("\u2026")
    assert "<" not in figures.safe_label("<" * 100)


def test_thin_rows_keeps_the_ends_and_the_cap() -> None:
    frame = pd.DataFrame({"step": np.arange(10_001)})
    thin = figures.thin_rows(frame, 100)
    assert len(thin) <= 100 and thin["step"].iloc[0] == 0 and thin["step"].iloc[-1] == 10_000
    assert figures.thin_rows(frame.head(5), 100).equals(frame.head(5))


def test_pool_columns_averages_blocks_to_fit() -> None:
    matrix = np.arange(40, dtype=np.float32).reshape(2, 20)
    pooled, labels = figures.pool_columns(matrix, np.arange(20) * 10, 20)
    assert pooled.shape == (2, 10) and labels.tolist() == list(range(0, 200, 20))
    assert pooled[0, 0] == pytest.approx(0.5)
    same, _ = figures.pool_columns(matrix, np.arange(20), 40)
    assert same is matrix


def test_pool_columns_keeps_evenly_spaced_labels() -> None:
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(3, 495)).astype(np.float32)
    matrix[1, 7] = np.nan
    pooled, labels = figures.pool_columns(matrix, np.arange(495) * 4, 3 * 250)
    assert pooled.shape == (3, 248) and pooled.size <= 3 * 250
    assert set(np.diff(labels).tolist()) == {8}, "plotly draws a heatmap as one image only on even spacing"
    for block, label in enumerate(labels):
        first = label // 4
        expected = [np.nanmean(matrix[row, first:first + 2]) for row in range(3)]
        np.testing.assert_allclose(pooled[:, block], expected, rtol=1e-6)


def test_count_points_counts_cells_and_points() -> None:
    figure = go.Figure([go.Heatmap(z=np.zeros((3, 4))), go.Scatter(x=[1, 2, 3], y=[1, 2, 3])])
    assert count_points(figure) == 15


def steps_frame(steps: int) -> pd.DataFrame:
    """A steps table of `steps` rows with an eval loss every 10 steps."""
    step = np.arange(steps)
    return pd.DataFrame({"step": step, "lm_loss": 10 / (1 + step), "aux_loss": 0.01, "tokens_per_s": 1e4,
                         "eval_loss": np.where(step % 10 == 0, 5.0, np.nan)})


def test_loss_curves_overlay_two_runs() -> None:
    figure = figures.loss_curves({"a": steps_frame(50), "b": steps_frame(30)})
    assert set(trace_types(figure)) == {"scatter"}
    names = [trace.name for trace in figure.data]
    assert names.count("a") == 3 and names.count("b") == 3 and "a eval" in names
    assert figure.layout.xaxis3.title.text == "step" and figure.layout.yaxis.title.text == "loss"
    assert figure.layout.yaxis3.title.text == "tokens/s"


def test_loss_curves_are_capped() -> None:
    figure = figures.loss_curves({"long": steps_frame(300_000)})
    assert count_points(figure) <= MAX_POINTS


def test_load_heatmap_has_clickable_cells() -> None:
    load = grid(range(2, 9), 16, "relative_load", tokens=100)
    figure = figures.load_heatmap(load, "load")
    assert trace_types(figure) == ["heatmap", "scatter"]
    assert np.asarray(figure.data[0].z).shape == (7, 16)
    assert len(figure.data[1].x) == 7 * 16
    assert [row[-1] for row in figure.data[1].customdata] == list(range(16)) * 7, "a click picks its own expert"
    assert figure.layout.xaxis.title.text == "expert" and figure.layout.yaxis.title.text == "layer"
    assert (figure.data[0].zmin, figure.data[0].zmax) == (0.0, 2.0)


def test_matrix_is_pandas_pivot_table_mean() -> None:
    rng = np.random.default_rng(8)
    frame = pd.DataFrame({"layer": rng.integers(2, 9, 400), "expert": rng.integers(0, 30, 400),
                          "value": rng.normal(size=400)})
    frame.loc[rng.choice(400, 60, replace=False), "value"] = np.nan  # some cells only NaN, some duplicated
    frame = pd.concat([frame, pd.DataFrame({"layer": [20], "expert": [40], "value": [np.nan]})])
    z, rows, columns = figures._matrix(frame, "layer", "expert", "value")
    oracle = frame.pivot_table(index="layer", columns="expert", values="value", aggfunc="mean", dropna=False)
    assert list(rows) == list(oracle.index) and list(columns) == list(oracle.columns)
    np.testing.assert_allclose(z, oracle.to_numpy(dtype=np.float32), rtol=1e-6, equal_nan=True)
    words = pd.DataFrame({"domain": ["b", "a", "b"], "expert": [1, 0, 1], "lift": [1.0, 2.0, 3.0]})
    z, rows, _ = figures._matrix(words, "domain", "expert", "lift")
    assert list(rows) == ["a", "b"]
    np.testing.assert_array_equal(z, [[2.0, np.nan], [np.nan, 2.0]])  # b's two rows averaged


def check_row_targets(rows: go.Bar, z: np.ndarray, layers: list[int], centre: float) -> None:
    """Each row target spans its row of `z` and points at the row's value furthest from `centre`."""
    assert rows.type == "bar" and rows.orientation == "h" and list(rows.y) == layers
    for layer, custom in zip(rows.y, rows.customdata, strict=True):
        values = z[layer - 2]
        if np.isnan(values).all():
            assert list(custom) == ["no values", 0]
            continue
        assert custom[-1] == np.nanargmax(np.abs(values - centre)), "the expert furthest from the centre"
        assert f"expert {custom[-1]} at" in custom[0]
    assert rows.base == -0.5 and set(rows.x) == {z.shape[1]}


def test_load_heatmap_of_the_locked_shape_clicks_by_row_and_exactly_in_the_chosen_row() -> None:
    rng = np.random.default_rng(4)
    load = grid(range(2, 81), 256, "relative_load", rng.gamma(4.0, 0.25, 79 * 256), tokens=64)
    figure = figures.load_heatmap(load, "locked", layer=40)
    cells, rows, row = figure.data
    assert trace_types(figure) == ["heatmap", "bar", "scatter"], "no WebGL: a context per draw costs 0.3-0.7 s"
    check_row_targets(rows, np.asarray(cells.z), [layer for layer in range(2, 81) if layer != 40], 1.0)
    assert list(row.y) == [40] * 256 and [r[-1] for r in row.customdata] == list(range(256))
    assert len(figure.layout.shapes) == 1 and figure.layout.shapes[0].y0 == 39.5
    assert figure.layout.hoverdistance is None, "bars need a hover distance, else the last bar always wins"
    untouched = figures.load_heatmap(load, "locked")
    assert trace_types(untouched) == ["heatmap", "bar"] and len(untouched.data[1].y) == 79
    assert count_points(figure) < 79 * 256 + 500


def test_load_heatmap_of_a_huge_grid_is_pooled_and_capped() -> None:
    load = grid(range(2, 102), 4096, "relative_load", tokens=1)
    figure = figures.load_heatmap(load, "huge")
    assert trace_types(figure) == ["heatmap", "bar"]
    pooled = np.asarray(figure.data[0].x)
    rows = figure.data[1]
    spacing = pooled[1] - pooled[0]
    assert rows.base == pooled[0] - spacing / 2 and set(rows.x) == {pooled[-1] - pooled[0] + spacing}
    assert count_points(figure) <= MAX_POINTS


def imbalance_frame(steps: int, layers: int = 7) -> pd.DataFrame:
    """load_imbalance rows: MaxVio falling over steps."""
    step = np.repeat(np.arange(steps), layers)
    layer = np.tile(np.arange(2, 2 + layers), steps)
    falling = 1.0 / (1 + step) + 0.01 * layer
    return pd.DataFrame({"step": step, "layer": layer, "max_vio": falling, "cv": falling / 2,
                         "entropy_norm": 1 - falling / 10})


def summary_frame(imbalance: pd.DataFrame) -> pd.DataFrame:
    """queries.load_summary's metric columns computed by pandas from load_imbalance rows."""
    grouped = imbalance.groupby("step")
    columns = {"step": grouped.size().index}
    for metric in ("max_vio", "cv", "entropy_norm"):
        columns[f"{metric}_median"] = grouped[metric].median().to_numpy()
        worst = grouped[metric].min() if metric == "entropy_norm" else grouped[metric].max()
        columns[f"{metric}_worst"] = worst.to_numpy()
    return pd.DataFrame(columns)


def layer_frames(imbalance: pd.DataFrame, layers: list[int]) -> dict[int, pd.DataFrame]:
    """The rows of the chosen layers, as queries.load_imbalance(layer=...) gives them."""
    return {layer: imbalance[imbalance["layer"] == layer] for layer in layers}


def test_imbalance_over_steps_draws_the_noise_floor() -> None:
    imbalance = imbalance_frame(20)
    floors = pd.DataFrame({"step": np.arange(20), "max_vio": 0.2, "cv": 0.1, "entropy_norm": 0.99})
    figure = figures.imbalance_over_steps(summary_frame(imbalance), layer_frames(imbalance, [3]), floors, "max_vio")
    names = [trace.name for trace in figure.data]
    assert names == ["median over layers", "worst layer", "layer 3", "noise floor (uniform routing)"]
    assert figure.data[-1].line.dash == "dash"
    assert figure.layout.yaxis.title.text == "MaxVio" and figure.layout.xaxis.title.text == "step"
    assert list(figure.data[2].y) == imbalance[imbalance["layer"] == 3]["max_vio"].tolist()
    worst_entropy = figures.imbalance_over_steps(summary_frame(imbalance), {}, floors, "entropy_norm")
    assert min(worst_entropy.data[1].y) == pytest.approx(imbalance["entropy_norm"].min())


def test_imbalance_without_a_floor_and_capped() -> None:
    imbalance = imbalance_frame(200_000, layers=2)
    figure = figures.imbalance_over_steps(summary_frame(imbalance), layer_frames(imbalance, [2]), None, "cv")
    assert "noise floor (uniform routing)" not in [trace.name for trace in figure.data]
    assert count_points(figure) <= MAX_POINTS


def test_expert_history_has_load_and_bias_panels() -> None:
    history = pd.DataFrame({"step": np.arange(10), "tokens": 5, "relative_load": 1.1, "bias": np.linspace(0, 1, 10)})
    figure = figures.expert_history(history, 3, 7)
    assert [trace.name for trace in figure.data] == ["relative load", "fair share", "bias"]
    assert figure.layout.yaxis2.title.text == "bias" and "Layer 3, expert 7" in figure.layout.title.text


def test_domain_bars_escape_domain_labels() -> None:
    domains = pd.DataFrame({"domain": [HOSTILE, "code"], "tokens": [10, 10], "routed": [3, 1], "share": [0.3, 0.1],
                            "lift": [1.2, 0.4]})
    figure = figures.domain_lift_bars(domains, "domains")
    assert trace_types(figure) == ["bar"]
    assert all("<" not in label for label in figure.data[0].x)


def test_bias_figures() -> None:
    bias = grid(range(2, 9), 16, "bias", np.linspace(-0.1, 0.1, 7 * 16))
    heatmap = figures.bias_heatmap(bias, "bias")
    assert trace_types(heatmap) == ["heatmap", "bar"] and heatmap.data[0].zmid == 0.0
    history = pd.DataFrame({"step": np.repeat(np.arange(30_000), 16), "expert": np.tile(np.arange(16), 30_000),
                            "bias": 0.0})
    over_steps = figures.bias_over_steps(history, 4)
    assert trace_types(over_steps) == ["heatmap"] and count_points(over_steps) <= MAX_POINTS
    assert over_steps.layout.xaxis.title.text == "step" and over_steps.layout.yaxis.title.text == "expert"
    drift = pd.DataFrame({"expert": [0, 1, 2], "label": ["drift", "dither", "drift"], "straightness": [0.9, 0.1, 0.8],
                          "sign_change_rate": [0.0, 0.9, 0.1]})
    scatter = figures.drift_scatter(drift, 4)
    assert sorted(trace.name for trace in scatter.data) == ["dither", "drift"]


def test_bias_heatmap_clicks_by_row() -> None:
    rng = np.random.default_rng(3)
    bias = grid(range(2, 81), 256, "bias", rng.normal(0, 0.05, 79 * 256))
    bias.loc[bias.layer == 7, "bias"] = np.nan  # a layer with no bias yet
    figure = figures.bias_heatmap(bias, "bias")
    cells, rows = figure.data
    assert rows.type == "bar", "SVG bars: a WebGL layer costs the browser a context on every draw"
    z = np.asarray(cells.z)
    check_row_targets(rows, z, list(range(2, 81)), 0.0)
    assert rows.customdata[list(rows.y).index(7)][0] == "no values"
    low, high = np.nanmin(z[0]), np.nanmax(z[0])
    assert rows.customdata[0][0].startswith(f"bias from {low:+.3g} to {high:+.3g}; furthest from 0: expert ")
    assert figure.layout.hoverdistance is None and figure.layout.clickmode == "event+select"
    assert list(figure.layout.xaxis.range) == [-0.5, 255.5], "no blank strip for the bars' padding"


def test_layer_step_heatmap_drops_dense_layer_nulls_and_caps() -> None:
    frame = pd.DataFrame({"step": np.repeat(np.arange(50_000), 8), "layer": np.tile(np.arange(1, 9), 50_000),
                          "bias_override_rate": np.tile([np.nan, *[0.1] * 7], 50_000)})
    figure = figures.layer_step_heatmap(frame, "bias_override_rate", "override", "rate")
    assert list(figure.data[0].y) == list(range(2, 9))
    assert count_points(figure) <= MAX_POINTS


def test_value_residual_figures() -> None:
    frame = pd.DataFrame({"step": np.repeat(np.arange(5), 7), "layer": np.tile(np.arange(2, 9), 5), "lambda": 0.9})
    lines = figures.lambda_lines(frame, [2, 8])
    assert [trace.name for trace in lines.data] == ["layer 2", "layer 8"]
    bars = figures.lambda_bars(frame[frame["step"] == 4], 4)
    assert trace_types(bars) == ["bar"] and len(bars.data[0].x) == 7
    assert bars.layout.xaxis.title.text == "layer" and bars.layout.yaxis.title.text == "lambda"


def head_stats(layers: int = 8, heads: int = 4) -> pd.DataFrame:
    """attention_stats rows: every 4th layer global."""
    layer = np.repeat(np.arange(1, layers + 1), heads)
    return pd.DataFrame({"layer": layer, "head": np.tile(np.arange(heads), layers),
                         "kind": np.where(layer % 4 == 0, "global", "local"), "entropy": np.linspace(0, 3, len(layer))})


def test_head_grid_marks_global_layers_from_the_kind_column() -> None:
    figure = figures.head_grid(head_stats(), "entropy", "heads")
    assert trace_types(figure) == ["heatmap", "scatter"]
    (outlines,) = figure.layout.shapes
    rectangles = re.findall(r"M(-?[\d.]+),(-?[\d.]+)H(-?[\d.]+)V(-?[\d.]+)H(-?[\d.]+)Z", outlines.path)
    assert [tuple(float(value) for value in rectangle) for rectangle in rectangles] == [
        (-0.5, 3.5, 3.5, 4.5, -0.5), (-0.5, 7.5, 3.5, 8.5, -0.5)], "one rectangle around each global layer"
    assert not figures.head_grid(head_stats(layers=3), "entropy", "no global layer").layout.shapes
    assert figure.layout.xaxis.title.text == "head"
    cells = figure.data[1]
    assert sorted(zip(cells.y, cells.x, strict=True)) == [(layer, head) for layer in range(1, 9) for head in range(4)]
    assert cells.mode == "text" and cells.text is None, "a clickable point per cell that draws nothing"


def pattern(size: int) -> pd.DataFrame:
    """A uniform causal attention pattern over `size` positions."""
    query, key = np.tril_indices(size)
    return pd.DataFrame({"query_pos": query, "key_pos": key, "prob": 1.0 / (query + 1)})


def test_attention_pattern_draws_the_window_edge_for_local_heads() -> None:
    tokens = [HOSTILE, *[f"t{i}" for i in range(11)]]
    local = figures.attention_pattern(pattern(12), tokens, 4, "local")
    assert trace_types(local) == ["heatmap", "scatter"] and local.data[1].name == "window edge (W=4)"
    assert list(local.data[1].x) == [0, 8] and list(local.data[1].y) == [3, 11]
    assert all("<" not in text for text in local.layout.yaxis.ticktext)
    assert trace_types(figures.attention_pattern(pattern(12), tokens, None, "global")) == ["heatmap"]


def test_margins_are_fixed_and_fit_the_text_tick_labels() -> None:
    tokens = [f"token-{i:02d}-xxxxxxxxxx" for i in range(12)]
    local = figures.attention_pattern(pattern(12), tokens, 4, "local")
    longest = max(len(text) for text in local.layout.yaxis.ticktext)
    assert local.layout.margin.l >= 7 * longest + 30, "the token labels and the axis title fit the left margin"
    domains = pd.DataFrame({"domain": ["a rather long domain name", "code"], "tokens": [10, 10], "routed": [3, 1],
                            "share": [0.3, 0.1], "lift": [1.2, 0.4]})
    bars = figures.domain_lift_bars(domains, "domains")
    assert max(len(text) for text in bars.layout.xaxis.ticktext) <= 16 and bars.layout.margin.b >= 7 * 16 + 30
    assert list(bars.layout.xaxis.tickvals) == list(bars.data[0].x), "hover keeps the whole name"
    numbers = figures.load_heatmap(grid(range(2, 9), 16, "relative_load", tokens=100), "load")
    for figure in (local, bars, numbers):
        axes = [figure.layout[name] for name in figure.layout if name.startswith(("xaxis", "yaxis"))]
        assert axes and all(axis.automargin is False for axis in axes), "automargin lays a chart out twice"
    assert numbers.layout.margin.l == 80


def test_attention_pattern_of_a_long_prompt_is_capped() -> None:
    figure = figures.attention_pattern(pattern(1000), [], 128, "long")
    assert count_points(figure) <= MAX_POINTS


def test_specialisation_figures() -> None:
    lift = pd.DataFrame({"domain": np.repeat([HOSTILE, "code"], 16), "expert": np.tile(np.arange(16), 2),
                         "share": 0.25, "lift": np.linspace(0, 2, 32)})
    domains = figures.domain_lift_heatmap(lift, "domains")
    assert trace_types(domains) == ["heatmap"] and all("<" not in label for label in domains.data[0].y)
    pairs = pd.DataFrame({"expert_a": np.repeat(np.arange(16), 16), "expert_b": np.tile(np.arange(16), 16),
                          "count": 1, "lift": 1.0})
    assert np.asarray(figures.coactivation_heatmap(pairs, "pairs").data[0].z).shape == (16, 16)
    vocabulary = pd.DataFrame({"expert": np.arange(3), "score": [0.5, 0.2, np.nan],
                               "top_tokens": [HOSTILE, "'a'", ""]})
    scores = figures.vocabulary_scores(vocabulary, 0.25, "vocabulary")
    assert trace_types(scores) == ["bar"] and all("<" not in text for text in scores.data[0].hovertext)


@pytest.mark.parametrize("build", [
    lambda empty: figures.load_heatmap(empty, "t"), lambda empty: figures.bias_heatmap(empty, "t"),
    lambda empty: figures.head_grid(empty, "entropy", "t"), lambda empty: figures.attention_pattern(empty, [], 4, "t"),
    lambda empty: figures.domain_lift_bars(empty, "t"), lambda empty: figures.coactivation_heatmap(empty, "t"),
])
def test_builders_accept_no_rows(build) -> None:
    figure = build(pd.DataFrame())
    assert len(figure.data) == 0 and figure.layout.title.text == "t"
