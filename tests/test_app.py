"""Every dashboard page under streamlit's AppTest on tiny stores: complete, one-step, running, killed and
empty runs, an empty store and a missing one; the run picker, step slider and drill-downs change what is shown."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from app_fixtures import PROMPTS, Prompt, build_killed_run, build_run
from streamlit.testing.v1 import AppTest

from analysis import queries
from analysis.store import RunWriter, Store
from app import data, serve, state
from app.serve import STORE_ENV

MAIN = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
PAGES = ["../pages/runs.py", "../pages/expert_load.py", "../pages/expert_bias.py", "../pages/value_residual.py",
         "../pages/attention.py", "../pages/specialisation.py"]
RUNS = ["tiny", "one-step", "live", "killed", "no-steps"]
HOSTILE = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A store with a complete run, a second complete run, a one-step run, a run still recording (its writer
    open in this process), a killed run and a running run with no steps yet."""
    root = tmp_path_factory.mktemp("store")
    store = Store(root)
    hostile_prompts = [Prompt(HOSTILE, (HOSTILE, " <img src=x onerror=alert(1)>", "\u202eevil")), *PROMPTS[:1]]
    build_run(store, "tiny", 25, probe_every=10, name="tiny", description=HOSTILE, prompts=hostile_prompts)
    build_run(store, "other", 12, seed=5)
    build_run(store, "one-step", 1)
    open_writers: list[RunWriter] = [build_run(store, "live", 6, close=False),
                                     store.create_run("no-steps", {"config": {}})]
    build_killed_run(root, "killed", 4)
    yield root
    for writer in open_writers:
        writer.close()


def app(root: Path, monkeypatch: pytest.MonkeyPatch, page: str | None = None, run: str | None = None) -> AppTest:
    """The dashboard on `root`, run once on the Runs page, then switched to `page` (and run) if given."""
    monkeypatch.setenv(STORE_ENV, str(root))
    test = AppTest.from_file(MAIN, default_timeout=60)
    if run is not None:
        test.query_params["run"] = run
    test.run()
    if page is not None:
        test.switch_page(page).run()
    assert not test.exception, [error.message for error in test.exception]
    return test


def charts(test: AppTest) -> list[dict]:
    """The plotly figures on the page, as their JSON specs."""
    return [json.loads(chart.proto.spec) for chart in test.get("plotly_chart")]


def titles(test: AppTest) -> list[str]:
    """The titles of the figures on the page."""
    return [spec["layout"].get("title", {}).get("text", "") for spec in charts(test)]


def text_of(test: AppTest) -> str:
    """Every Markdown-rendered string on the page (markdown, captions, alerts, metric labels)."""
    parts = [element.value for kind in ("markdown", "caption", "info", "warning", "error", "success")
             for element in getattr(test, kind)]
    return "\n".join(str(part) for part in parts) + "\n".join(metric.label for metric in test.metric)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_every_kind_of_run(store_root: Path, monkeypatch: pytest.MonkeyPatch, page: str) -> None:
    test = app(store_root, monkeypatch, page, run="tiny")
    assert len(test.get("plotly_chart")) >= 1
    assert len(test.get("download_button")) == len(test.get("plotly_chart"))
    assert len(test.expander) >= len(test.get("plotly_chart"))
    for run in RUNS[1:]:
        test.selectbox(key="run").set_value(run).run()
        assert not test.exception, (run, [error.message for error in test.exception])
        assert test.get("plotly_chart") or test.info, run


def test_sidebar_shows_the_store_and_every_run(store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    test = app(store_root, monkeypatch)
    assert str(store_root) in [text.value for text in test.sidebar.text]
    assert set(test.selectbox(key="run").options) >= {f"{run} ({status})" for run, status in [
        ("tiny", "complete"), ("live", "running"), ("killed", "incomplete"), ("no-steps", "running")]}
    table = test.dataframe[0].value
    assert set(table["run_id"]) == {"tiny", "other", "one-step", "live", "killed", "no-steps"}


def test_refresh_interval_is_offered_while_a_run_records(store_root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    test = app(store_root, monkeypatch, "../pages/expert_bias.py", run="live")
    assert test.selectbox(key="refresh").value == state.DEFAULT_REFRESH
    assert test.session_state[state.CONTEXT_KEY].live_every == 5.0
    test.selectbox(key="refresh").set_value("1 s").run()
    assert test.session_state[state.CONTEXT_KEY].live_every == 1.0
    test.selectbox(key="run").set_value("tiny").run()
    assert test.session_state[state.CONTEXT_KEY].live_every is None, "a finished run does not refresh"
    assert test.selectbox(key="refresh").value == "1 s", "kept while another run records"
    finished = Store(tmp_path)
    build_run(finished, "done", 3)
    quiet = app(tmp_path, monkeypatch, run="done")
    assert "refresh" not in [box.key for box in quiet.selectbox], "nothing records: nothing to refresh"
    assert quiet.session_state[state.CONTEXT_KEY].refresh_s == 5.0, "the run table still looks for new runs"


def test_run_picker_changes_what_the_runs_page_shows(store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    test = app(store_root, monkeypatch, run="tiny")
    last_step = {metric.label: metric.value for metric in test.metric}["Last step"]
    assert last_step == "24"
    test.selectbox(key="run").set_value("killed").run()
    metrics = {metric.label: metric.value for metric in test.metric}
    assert metrics["Last step"] == "3" and metrics["Status"] == "incomplete"


def test_runs_page_shows_the_config_and_provenance(store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    test = app(store_root, monkeypatch, run="tiny")
    config, provenance = (element.value for element in test.json)
    manifest = Store(store_root).manifest("tiny")
    assert json.loads(config) == manifest["config"]
    assert json.loads(provenance)["description"] == manifest["description"]


def test_comparison_overlays_a_second_run(store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    test = app(store_root, monkeypatch, run="tiny")
    assert {trace["name"] for trace in charts(test)[0]["data"]} == {"tiny", "tiny eval"}
    test.selectbox(key="compare-run").set_value("other").run()
    assert {trace["name"] for trace in charts(test)[0]["data"]} >= {"tiny", "other", "other eval"}


def test_step_slider_and_range_change_the_load_heatmap(store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    test = app(store_root, monkeypatch, "../pages/expert_load.py", run="tiny")
    assert titles(test)[0] == "Relative load at step 24"
    test.slider(key="load-step:tiny").set_value(7).run()
    assert titles(test)[0] == "Relative load at step 7"
    test.toggle(key="load-sum:tiny").set_value(True).run()
    test.slider(key="load-range:tiny").set_value((3, 9)).run()
    assert titles(test)[0] == "Relative load, steps 3 to 9 summed"


def test_drill_down_follows_the_chosen_expert(store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    test = app(store_root, monkeypatch, "../pages/expert_load.py", run="tiny")
    assert len(charts(test)) == 1 and test.selectbox(key="load-expert:tiny").value is None, "no drill-down yet"
    assert test.radio(key="load-metric").value is None, "no imbalance chart until a measure is picked"
    assert any("Click a cell of the heatmap" in caption.value for caption in test.caption)
    assert "dead (c = 0)" in text_of(test)
    starved = next(table.value for table in test.dataframe if "dead" in table.value.columns)
    assert len(starved) and (starved["relative_load"] < 0.1).all(), "the popover lists the starved experts"
    test.selectbox(key="load-layer:tiny").set_value(5)
    test.selectbox(key="load-expert:tiny").set_value(3).run()
    assert titles(test)[1:2] == ["Layer 5, expert 3 over steps"]
    test.radio(key="load-metric").set_value("cv").run()
    assert titles(test)[1] == "CV over steps"
    assert {"layer 5", "noise floor (uniform routing)"} <= {trace["name"] for trace in charts(test)[1]["data"]}
    tables = [table.value for table in test.dataframe]
    assert any(set(table.columns) == {"token_id", "token_text", "count", "share", "mean_gate"} for table in tables)
    queries_shown = "\n".join(text.value for text in test.text)
    assert "queries.expert_history(store, 'tiny', layer=5, expert=3)" in queries_shown
    assert "queries.expert_top_tokens(store, 'tiny', layer=5, expert=3" in queries_shown


def test_only_a_recording_run_offers_to_follow_the_latest_step(store_root: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    finished = app(store_root, monkeypatch, "../pages/expert_bias.py", run="tiny")
    assert not [toggle for toggle in finished.toggle if toggle.key == "bias-step:tiny-follow"]
    assert finished.slider(key="bias-step:tiny").value == 24 and not finished.slider(key="bias-step:tiny").disabled
    live = app(store_root, monkeypatch, "../pages/expert_bias.py", run="live")
    assert live.toggle(key="bias-step:live-follow").value is True
    assert live.slider(key="bias-step:live").value == 5 and live.slider(key="bias-step:live").disabled
    live.toggle(key="bias-step:live-follow").set_value(False).run()
    live.slider(key="bias-step:live").set_value(2).run()
    assert titles(live)[0] == "Bias at step 2"


def test_summed_load_matches_the_per_step_rows(store_root: Path) -> None:
    store = Store(store_root)
    summed = data.summed_expert_load(store, "tiny", (3, 9))
    rows = queries.expert_load(store, "tiny", step_range=(3, 9)).groupby(["layer", "expert"])["tokens"].sum()
    assert summed.set_index(["layer", "expert"])["tokens"].equals(rows.astype(summed["tokens"].dtype))
    per_layer = summed.groupby("layer")["relative_load"].mean()
    assert np.allclose(per_layer, 1.0)


def test_bias_page_follows_the_chosen_layer(store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    test = app(store_root, monkeypatch, "../pages/expert_bias.py", run="tiny")
    assert titles(test) == ["Bias at step 24"], "the layer's drill-down and the routing view wait for a pick"
    test.selectbox(key="bias-layer:tiny").set_value(6).run()
    assert {"Layer 6: bias over steps", "Layer 6: drift or dithering per expert"} <= set(titles(test))
    test.radio(key="bias-routing-view").set_value("bias_override_rate").run()
    assert "Bias override rate" in titles(test) and "Aux-loss map vs dispatched" not in titles(test)
    test.radio(key="bias-routing-view").set_value("aux_map_disagreement").run()
    assert "Aux-loss map vs dispatched" in titles(test) and "Bias override rate" not in titles(test)


def test_attention_pattern_draws_the_window_edge_of_local_heads(store_root: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    test = app(store_root, monkeypatch, "../pages/attention.py", run="tiny")
    assert len(charts(test)) == 1 and test.selectbox(key="attn-head:tiny").value is None, "no pattern before a pick"
    test.selectbox(key="attn-layer:tiny").set_value(1)
    test.selectbox(key="attn-head:tiny").set_value(0)
    test.selectbox(key="attn-prompt:tiny").set_value(1).run()
    assert len(charts(test)) == 2
    pattern = charts(test)[-1]
    assert pattern["layout"]["title"]["text"].startswith("Layer 1 (local), head 0")
    assert pattern["data"][-1]["name"] == "window edge (W=8)"
    test.selectbox(key="attn-layer:tiny").set_value(4).run()
    pattern = charts(test)[-1]
    assert pattern["layout"]["title"]["text"].startswith("Layer 4 (global)")
    assert all(trace["type"] == "heatmap" for trace in pattern["data"])
    test.radio(key="attn-metric").set_value("sink_mass").run()
    assert charts(test)[0]["data"][0]["colorbar"]["title"]["text"] == "sink mass"


def test_value_residual_lines_are_drawn_for_the_picked_layers(store_root: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    test = app(store_root, monkeypatch, "../pages/value_residual.py", run="tiny")
    assert len(charts(test)) == 2, "no lines before layers are picked"
    test.multiselect(key="lambda-layers:tiny").set_value([2, 5]).run()
    lines = charts(test)[-1]
    assert len(charts(test)) == 3 and [trace["name"] for trace in lines["data"]] == ["layer 2", "layer 5"]


def test_specialisation_page_switches_layer_and_analysis(store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    test = app(store_root, monkeypatch, "../pages/specialisation.py", run="tiny")
    assert titles(test) == ["Domain lift, layer 5, step 24"], "one analysis at a time, domain lift first"
    test.selectbox(key="spec-layer:tiny").set_value(2).run()
    assert titles(test) == ["Domain lift, layer 2, step 24"]
    test.radio(key="spec-analysis").set_value("vocabulary").run()
    assert titles(test) == ["Vocabulary specialisation, layer 2"] and len(test.dataframe) == 1
    assert "<script>" not in json.dumps(charts(test)), "hostile tokens reach the hover escaped"
    before = test.dataframe[0].value
    test.slider(key="spec-min-occurrences").set_value(1).run()
    assert len(test.dataframe[0].value) >= len(before), "counting rarer tokens keeps every expert scored before"
    test.radio(key="spec-analysis").set_value("coactivation").run()
    assert titles(test) == ["Co-activation lift, layer 2"] and not test.dataframe


def test_hostile_text_never_reaches_markdown(store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for page in PAGES:
        test = app(store_root, monkeypatch, page, run="tiny")
        assert "<script>" not in text_of(test) and "onerror" not in text_of(test), page
        for spec in charts(test):
            assert "<script>" not in json.dumps(spec) and "<img" not in json.dumps(spec), page


@pytest.mark.parametrize("page", PAGES)
def test_an_empty_store_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, page: str) -> None:
    Store(tmp_path)
    test = app(tmp_path, monkeypatch, page)
    assert "No runs in this store yet" in text_of(test)


def test_a_missing_store_folder_is_not_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "not-yet"
    test = app(missing, monkeypatch, "../pages/expert_load.py")
    assert "does not exist yet" in text_of(test)
    assert not missing.exists()


def test_serve_locks_the_server_down() -> None:
    command = serve.streamlit_command("127.0.0.1", 8600, headless=True)
    flags = dict(zip(command[5::2], command[6::2], strict=True))
    assert command[1:5] == ["-m", "streamlit", "run", str(serve.ENTRY)]
    assert flags["--server.address"] == "127.0.0.1" and flags["--server.port"] == "8600"
    assert flags["--server.enableXsrfProtection"] == flags["--server.enableCORS"] == "true"
    assert flags["--browser.gatherUsageStats"] == "false" and flags["--server.fileWatcherType"] == "none"
    hosts = [value for flag, value in zip(command[5::2], command[6::2], strict=True) if flag == "--server.allowedHosts"]
    assert hosts == ["localhost", "127.0.0.1", "::1"]
    assert "0.0.0.0" not in serve.allowed_hosts("0.0.0.0")


def test_serve_refuses_a_file_as_the_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_folder = tmp_path / "runs.txt"
    not_a_folder.write_text("")
    assert serve.serve(not_a_folder) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_the_app_imports_neither_torch_nor_the_model() -> None:
    check = ("import sys, app.data, app.derived, app.figures, app.page_hints, app.panels, app.serve, app.state; "
             "loaded = {'torch', 'vpmoe'} & {name.split('.')[0] for name in sys.modules}; "
             "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", check], check=True, timeout=120)
