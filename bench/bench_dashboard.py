"""Dashboard latency and bytes in Chromium, per page, on a store of the locked model's shape (not a test).

For each page: the first load (nothing cached), then repeated loads (a new navigation: the browser boots
Streamlit's front end again), switches to the page from the sidebar (how one moves between pages: the
front end stays up), clicks on the first heatmap that open a drill-down (Expert load, Expert bias) and
step-slider reruns with the drill-down open and the server's caches warm, as p50/p95 seconds from
navigation (or from the click) until the script run is over and every chart is drawn; the bytes the
page received (websocket frames, the data; HTTP bodies, mostly the JavaScript bundles the browser
caches); and the most points any one figure holds (must stay <= 200k). Chromium runs with a fresh profile
on disk, like a person's browser: warm loads are timed from the third on, when the scripts come from the
HTTP cache and their compiled code from V8's code cache, which Chromium writes on the second load
(--incognito times an off-the-record window, which keeps no compiled code).

    .venv/bin/python -m bench.bench_dashboard [--rows 10e6] [--repeats 8] [--dir DIR] [--incognito]
    .venv/bin/python -m bench.bench_dashboard --shape tiny --screenshots docs/screenshots

The store is built once into --dir (kept; delete it to rebuild) with the synthetic recorder of
tests/app_fixtures.py: 80 layers, 79 MoE layers x 256 experts, 8 heads, probe rows every 250 steps.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from playwright.sync_api import BrowserContext, Page, Playwright, Request, sync_playwright

from analysis.store import Store
from app.figures import MAX_POINTS
from tests.app_fixtures import LOCKED, PROMPTS, TINY, Prompt, SyntheticRun, build_killed_run, build_run, config, record

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
RUN = "bench"
GOAL_P95_S = 1.5
VIEWPORT = {"width": 1500, "height": 1200}


@dataclass(frozen=True)
class PageSpec:
    """A page: its URL path, the charts it draws, whether it has a step slider to move, and the charts a click
    on its first heatmap adds (its drill-down, drawn only once something is clicked)."""

    title: str
    path: str
    charts: int
    slider: bool
    drill: int = 0


PAGES = [PageSpec("Runs", "", 1, False), PageSpec("Expert load", "expert_load", 1, True, drill=2),
         PageSpec("Expert bias", "expert_bias", 1, True, drill=2),
         PageSpec("Value residual", "value_residual", 2, True), PageSpec("Attention", "attention", 1, True, drill=1),
         PageSpec("Specialisation", "specialisation", 1, True)]

# Plotted values per figure, counted like app.figures.count_points, from plotly's decoded copy of the data.
POINTS_JS = """() => {
    const size = values => (values && values.length) || 0;
    const cells = z => Array.from(z).reduce((total, row) => total + (size(row) || 1), 0);
    return [...document.querySelectorAll('.js-plotly-plot')].map(plot => (plot._fullData || []).reduce(
        (total, trace) => total + (trace.z ? cells(trace.z) : size(trace.x) || size(trace.y)), 0));
}"""
# Records every change of Streamlit's script state with its time, so a rerun's end can be timed exactly.
WATCH_JS = """() => {
    window.__states = [];
    const app = document.querySelector('[data-testid="stApp"]');
    new MutationObserver(() => window.__states.push([app.dataset.testScriptState, performance.now()]))
        .observe(app, {attributes: true, attributeFilter: ['data-test-script-state']});
}"""
DRAWN_JS = """charts => document.querySelector('[data-testid="stApp"][data-test-script-state="notRunning"]')
    && !document.querySelector('[data-stale="true"]')
    && [...document.querySelectorAll('.js-plotly-plot')].filter(plot => plot.querySelector('.main-svg')).length
       >= charts"""
RERUN_DONE_JS = """([since, charts]) => {
    const states = window.__states.filter(([, t]) => t >= since);
    const ran = states.findIndex(([state]) => state === 'running');
    return ran >= 0 && states.slice(ran).some(([state]) => state === 'notRunning')
        && !document.querySelector('[data-stale="true"]')
        && [...document.querySelectorAll('.js-plotly-plot')].filter(plot => plot.querySelector('.main-svg')).length
           >= charts;
}"""
# A page switch in the sidebar is done when a script run that began after the click ended on the new
# page (its title shown) with its charts drawn.
SWITCH_DONE_JS = """([since, charts, title]) => {
    const states = window.__states.filter(([, t]) => t >= since);
    const ran = states.findIndex(([state]) => state === 'running');
    const heading = document.querySelector('[data-testid="stMain"] h1');
    return ran >= 0 && states.slice(ran).some(([state]) => state === 'notRunning')
        && heading && heading.textContent.trim() === title
        && !document.querySelector('[data-stale="true"]')
        && [...document.querySelectorAll('.js-plotly-plot')].filter(plot => plot.querySelector('.main-svg')).length
           >= charts;
}"""
SCRIPT_ENDED_JS = """since => window.__states.find(([state, t]) => t >= since && state === 'notRunning')[1]"""
# Two animation frames after the DOM is done: plotly has painted by then.
NEXT_FRAME_JS = """() => new Promise(done => requestAnimationFrame(
    () => requestAnimationFrame(() => done(performance.now()))))"""


@contextmanager
def browser_context(playwright: Playwright, incognito: bool) -> Iterator[BrowserContext]:
    """A Chromium window to time pages in: by default with a profile on disk, as a person's browser has, so
    loads after the first reuse the HTTP cache and V8's compiled-code cache; `incognito` gives an off-the-record
    context, which keeps no compiled code and so compiles the 4.7 MB plotly bundle again on every load."""
    if incognito:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            yield browser.new_context(viewport=VIEWPORT)
        finally:
            browser.close()
        return
    with tempfile.TemporaryDirectory(prefix="vpmoe-bench-chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(profile, executable_path="/usr/bin/chromium",
                                                                args=CHROMIUM_ARGS, viewport=VIEWPORT)
        try:
            yield context
        finally:
            context.close()


def build_locked_store(root: Path, rows: int) -> None:
    """A complete locked-shape run with at least `rows` router_load rows, unless one is already there."""
    store = Store(root)
    if RUN in set(store.runs()["run_id"]):
        return
    steps = math.ceil(rows / (len(LOCKED.moe_layers) * LOCKED.experts))
    prompts = [Prompt(prompt.domain, prompt.tokens * 4) for prompt in PROMPTS]
    started = time.perf_counter()
    writer = store.create_run(RUN, {"config": config(LOCKED), "description": "synthetic locked-shape run"},
                              flush_every_steps=25)
    record(writer, SyntheticRun(LOCKED, seed=0, prompts=prompts), range(steps), probe_every=250)
    writer.close()
    print(f"built {steps} locked-shape steps ({steps * len(LOCKED.moe_layers) * LOCKED.experts / 1e6:.1f}M "
          f"router_load rows) in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def build_demo_store(root: Path) -> None:
    """The tiny-shape demo store for screenshots: two complete runs and one killed mid-run."""
    store = Store(root)
    if "demo-baseline" in set(store.runs()["run_id"]):
        return
    build_run(store, "demo-baseline", 200, shape=TINY, seed=1, probe_every=50, name="baseline",
              description="tiny shape, synthetic trends")
    build_run(store, "demo-higher-lr", 150, shape=TINY, seed=2, probe_every=50, name="higher lr")
    build_killed_run(root, "demo-killed", 40)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def served(store: Path) -> Iterator[str]:
    """The dashboard served by app.serve on a free port, stopped (its process group) on exit."""
    port = free_port()
    with serving([sys.executable, "-c", "import sys; from app.serve import serve; "
                  "raise SystemExit(serve(sys.argv[1], port=int(sys.argv[2])))", str(store), str(port)], port) as url:
        yield url


@contextmanager
def serving(command: list[str], port: int) -> Iterator[str]:
    """Run a Streamlit server `command` listening on `port`; its URL once healthy, stopped on exit."""
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the dashboard server did not start") from None
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


# The least a Streamlit page with a plotly chart costs to load here: the floor under every page's load time.
FLOOR_APP = """import plotly.graph_objects as go
import streamlit as st

st.title("Floor")
st.plotly_chart(go.Figure(go.Scatter(x=[0, 1], y=[0, 1])))
"""


def floor_loads(repeats: int, folder: Path, incognito: bool) -> list[float]:
    """Seconds per warm full load of FLOOR_APP served with the dashboard's server settings."""
    script = folder / "floor_app.py"
    script.write_text(FLOOR_APP)
    port = free_port()
    command = [sys.executable, "-m", "streamlit", "run", str(script), "--server.port", str(port), "--server.address",
               "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer"]
    spec = PageSpec("Floor", "", 1, False)
    with (serving(command, port) as url, sync_playwright() as playwright,
          browser_context(playwright, incognito) as context):
        page = context.new_page()
        load(page, url, spec)
        return [load(page, url, spec) for _ in range(repeats)]


@dataclass
class Traffic:
    """Bytes a page received since the last reset."""

    websocket: int = 0
    http: int = 0

    def watch(self, page: Page) -> None:
        """Count websocket frames and HTTP response bodies of `page`."""
        page.on("websocket", lambda socket_: socket_.on("framereceived", self._frame))
        page.on("requestfinished", self._response)

    def _frame(self, payload: str | bytes) -> None:
        self.websocket += len(payload)

    def _response(self, request: Request) -> None:
        self.http += max(0, request.sizes()["responseBodySize"])


def load(page: Page, url: str, spec: PageSpec) -> float:
    """Open `url` and return seconds from navigation start until the run is over and its charts drawn."""
    page.goto(url)
    page.wait_for_function(DRAWN_JS, arg=spec.charts, timeout=120_000)
    return page.evaluate(NEXT_FRAME_JS) / 1e3


def rerun_after(page: Page, action: Callable[[], None], charts: int) -> float:
    """Do `action` (a click, a key press) and wait until the script run it starts is over with `charts` charts
    drawn; returns when the action began (performance.now(), ms)."""
    page.evaluate(WATCH_JS)
    since = page.evaluate("() => performance.now()")
    action()
    page.wait_for_function(RERUN_DONE_JS, arg=[since, charts], timeout=120_000)
    return since


def rerun(page: Page, spec: PageSpec, key: str) -> tuple[float, float]:
    """Press `key` on the step slider; seconds until the server's script run ended, and until drawn again."""
    slider = page.locator('[data-testid="stSlider"] input[type="range"]').first
    since = rerun_after(page, partial(slider.press, key), spec.charts)
    drawn = page.evaluate(NEXT_FRAME_JS)
    ended = page.evaluate(SCRIPT_ENDED_JS, since)
    return (ended - since) / 1e3, (drawn - since) / 1e3


def drill_down(page: Page, spec: PageSpec, row: float) -> float:
    """Click the first heatmap at `row` (a fraction of its height) in the middle; seconds until the script run
    is over and the drill-down's charts are drawn. The click waits half a second, as a person would: a click
    that lands while plotly is still redrawing the heatmap is lost, and the bench would wait for nothing."""
    page.wait_for_timeout(500)
    area = page.locator(".js-plotly-plot").first.locator(".nsewdrag").first.bounding_box()
    click = partial(page.mouse.click, area["x"] + area["width"] * 0.5, area["y"] + area["height"] * row)
    since = rerun_after(page, click, spec.charts + spec.drill)
    return (page.evaluate(NEXT_FRAME_JS) - since) / 1e3


def switch(page: Page, spec: PageSpec) -> float:
    """Click `spec`'s link in the sidebar; seconds until the new page's run is over and its charts drawn."""
    page.evaluate(WATCH_JS)
    since = page.evaluate("() => performance.now()")
    page.locator('[data-testid="stSidebarNav"] a').filter(has_text=spec.title).first.click()
    page.wait_for_function(SWITCH_DONE_JS, arg=[since, spec.charts, spec.title], timeout=120_000)
    return (page.evaluate(NEXT_FRAME_JS) - since) / 1e3


def switch_times(page: Page, url: str, repeats: int) -> dict[str, list[float]]:
    """Per page, the times of `repeats` switches to it from the page before it in the sidebar (warm caches)."""
    load(page, f"{url}/?run={RUN}", PAGES[0])
    times: dict[str, list[float]] = {spec.title: [] for spec in PAGES}
    for _ in range(repeats + 1):  # the first round warms the server's caches for every page
        for spec in [*PAGES[1:], PAGES[0]]:
            times[spec.title].append(switch(page, spec))
    return {title: samples[1:] for title, samples in times.items()}


def p95(samples: list[float]) -> float:
    """95th percentile (nearest rank)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def measure(url: str, repeats: int, incognito: bool) -> list[list[str]]:
    """One row of numbers per page."""
    rows = []
    with sync_playwright() as playwright, browser_context(playwright, incognito) as context:
        page = context.new_page()
        traffic = Traffic()
        traffic.watch(page)
        for spec in PAGES:
            address = f"{url}/{spec.path}?run={RUN}"
            traffic.websocket = traffic.http = 0
            cold = load(page, address, spec)
            cold_bytes = (traffic.websocket, traffic.http)
            load(page, address, spec)  # Chromium writes V8's code cache on the second load and reads it from the third
            loads, socket_bytes = [], []
            for _ in range(repeats):
                traffic.websocket = 0
                loads.append(load(page, address, spec))
                socket_bytes.append(traffic.websocket)
            drills = []
            if spec.drill:  # two rows in turn: each click opens another layer (cached from the third click on)
                drills = [drill_down(page, spec, 0.25 + 0.5 * (index % 2)) for index in range(repeats + 2)][2:]
            points = page.evaluate(POINTS_JS)
            scripts, drawn = [], []
            if spec.slider:
                rerun(page, spec, "ArrowLeft")  # a new step (not cached yet), then back: both cached from here
                rerun(page, spec, "ArrowRight")
                for index in range(repeats):
                    script_s, drawn_s = rerun(page, spec, "ArrowRight" if index % 2 else "ArrowLeft")
                    scripts.append(script_s)
                    drawn.append(drawn_s)
            assert max(points) <= MAX_POINTS, f"{spec.title}: a figure has {max(points)} points"
            row = [spec.title, f"{cold:.2f}", f"{statistics.median(loads):.2f}", f"{p95(loads):.2f}",
                   *([f"{statistics.median(drills):.2f}", f"{p95(drills):.2f}"] if drills else ["-", "-"]),
                   *([f"{p95(scripts):.2f}", f"{statistics.median(drawn):.2f}", f"{p95(drawn):.2f}"] if drawn
                     else ["-", "-", "-"]),
                   f"{cold_bytes[0] / 1e3:,.0f}", f"{statistics.median(socket_bytes) / 1e3:,.0f}",
                   f"{cold_bytes[1] / 1e6:.1f}", f"{max(points):,}", str(len(points))]
            print("  ".join(row), file=sys.stderr, flush=True)
            rows.append(row)
        switches = switch_times(page, url, repeats)
        for row in rows:
            samples = switches[row[0]]
            row[4:4] = [f"{statistics.median(samples):.2f}", f"{p95(samples):.2f}"]
    return rows


# The view each screenshot shows besides a page's summary and drill-down (a radio that starts empty).
SHOWN_VIEWS = {"Expert load": "MaxVio", "Expert bias": "Bias override rate"}


def screenshots(url: str, out: Path) -> None:
    """A full-page screenshot of every page of the demo store, with a drill-down opened where there is one."""
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for spec in PAGES:
            load(page, f"{url}/{spec.path}?run=demo-baseline", spec)
            if spec.title == "Runs":
                page.locator('[data-testid="stSelectbox"]').filter(has_text="Compare with").click()
                page.get_by_role("option", name="demo-higher-lr").click()
                page.wait_for_function(DRAWN_JS, arg=spec.charts)
            if spec.drill:
                area = page.locator(".js-plotly-plot").first.locator(".nsewdrag").first.bounding_box()
                click = partial(page.mouse.click, area["x"] + area["width"] * 0.3, area["y"] + area["height"] * 0.55)
                rerun_after(page, click, spec.charts + spec.drill)
            if spec.title in SHOWN_VIEWS:  # the page's second view, drawn once picked
                view = page.locator('[data-testid="stRadio"]').get_by_text(SHOWN_VIEWS[spec.title], exact=True)
                rerun_after(page, view.click, spec.charts + spec.drill + 1)
            page.wait_for_timeout(800)
            height = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
            page.set_viewport_size({"width": 1400, "height": min(4000, height + 40)})
            page.wait_for_timeout(800)
            page.screenshot(path=str(out / f"{spec.path or 'runs'}.png"), full_page=True)
            page.set_viewport_size({"width": 1400, "height": 1000})
        browser.close()


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A plain-text table."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    for row in [header, ["-" * width for width in widths], *rows]:
        print("  ".join(cell.rjust(width) if index else cell.ljust(width)
                        for index, (cell, width) in enumerate(zip(row, widths, strict=True))))


def main() -> None:
    """Build (or reuse) the store, serve it, measure every page, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=float, default=10e6, help="router_load rows of the locked-shape run")
    parser.add_argument("--repeats", type=int, default=8, help="warm loads and reruns per page")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/vpmoe-bench-dashboard"), help="where the store is kept")
    parser.add_argument("--shape", choices=["locked", "tiny"], default="locked",
                        help="locked: time the pages; tiny: the demo store (for --screenshots)")
    parser.add_argument("--screenshots", type=Path, help="save a screenshot of every page into this folder")
    parser.add_argument("--incognito", action="store_true",
                        help="time in an off-the-record window (no compiled-code cache) instead of a fresh profile")
    args = parser.parse_args()
    store = args.dir / args.shape
    if args.shape == "locked":
        build_locked_store(store, int(args.rows))
    else:
        build_demo_store(store)
    with served(store) as url:
        if args.screenshots:
            screenshots(url, args.screenshots)
        if args.shape == "locked":
            rows = measure(url, args.repeats, args.incognito)
            header = ["page", "cold load s", "load p50", "load p95", "switch p50", "switch p95", "click p50",
                      "click p95", "rerun script p95", "rerun p50", "rerun p95",
                      "ws kB cold", "ws kB warm", "http MB cold", "max points", "figures"]
            window = "an off-the-record window" if args.incognito else "a fresh profile on disk"
            print_table(f"dashboard in Chromium ({window}), locked shape, >= {args.rows / 1e6:.0f}M router_load rows, "
                        f"{args.repeats} warm loads and step-slider reruns per page (goal p95 <= {GOAL_P95_S} s)",
                        header, rows)
            floor = floor_loads(args.repeats, args.dir, args.incognito)
            print(f"\nfloor: a bare Streamlit page with one 2-point plotly chart, {args.repeats} warm full loads: "
                  f"p50 {statistics.median(floor):.2f} s, p95 {p95(floor):.2f} s")


if __name__ == "__main__":
    main()
