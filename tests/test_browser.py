"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against a served store: charts
drawn on every page, a heatmap click opening its drill-down, a live run's steps arriving, hostile text inert,
a page opened by its own address connecting without a probe."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from app_fixtures import PROMPTS, TINY, Prompt, SyntheticRun, build_run, record

from analysis.store import Store
from app.page_hints import head_hints

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>", '<a href="javascript:alert(1)">link</a>',
           "[click](javascript:alert(1))", "\u202eevil \u05e9\u05dc\u05d5\u05dd", "long " + "x" * 3000]
DRAWN_CHARTS_JS = """charts => [...document.querySelectorAll('.js-plotly-plot')]
    .filter(plot => plot.querySelector('.main-svg')).length >= charts"""
PAGES = {"Runs": 1, "Expert load": 1, "Expert bias": 1, "Value residual": 2, "Attention": 1, "Specialisation": 1}

if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium); the browser tests need it",
                allow_module_level=True)

from playwright.sync_api import Browser, Locator, Page, sync_playwright  # noqa: E402 - only once Chromium is known to exist


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Return once the server answers its health check; fail if it exits or stays silent."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the dashboard server exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"the dashboard server did not answer within {timeout_s:.0f} s")


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with a complete run whose manifest, prompts, tokens and domains carry hostile text."""
    root = tmp_path_factory.mktemp("served")
    prompts = [Prompt(HOSTILE[index % len(HOSTILE)], (text, *PROMPTS[0].tokens)) for index, text in enumerate(HOSTILE)]
    build_run(Store(root), "tiny", 12, probe_every=6, prompts=prompts, name=HOSTILE[1], description=" ".join(HOSTILE))
    return root


@pytest.fixture(scope="module")
def server(store_root: Path) -> Iterator[str]:
    """The dashboard served by app.serve on a free port; its process group is ended afterwards."""
    port = free_port()
    command = [sys.executable, "-c", "import sys; from app.serve import serve; "
               "raise SystemExit(serve(sys.argv[1], port=int(sys.argv[2])))", str(store_root), str(port)]
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def dialogs() -> list[str]:
    """Messages of every dialog the page was asked to open."""
    return []


@pytest.fixture(scope="module")
def page(browser: Browser, server: str, dialogs: list[str]) -> Iterator[Page]:
    """One tab on the dashboard (run "tiny"), shared by the tests, that records and dismisses dialogs."""
    context = browser.new_context(viewport={"width": 1400, "height": 1600})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    tab.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    tab.goto(f"{server}/?run=tiny")
    yield tab
    context.close()


def open_page(page: Page, title: str, charts: int) -> None:
    """Go to a page through the sidebar and wait until its title and `charts` plotly charts are drawn."""
    page.locator('[data-testid="stSidebarNav"]').get_by_text(title, exact=True).click()
    page.locator("h1").filter(has_text=title).wait_for()
    page.wait_for_function(DRAWN_CHARTS_JS, arg=charts)


def settled(page: Page) -> None:
    """Wait until the script run is over and its stale elements are gone."""
    page.wait_for_function("document.querySelector('[data-testid=\"stApp\"][data-test-script-state=\"notRunning\"]')"
                           " && !document.querySelector('[data-stale=\"true\"]')")


def injected(page: Page) -> dict[str, int]:
    """Elements that hostile text would have created had it been rendered as HTML or Markdown."""
    return page.evaluate("""() => ({
        images: document.querySelectorAll('img[src="x"], img[src$="/x"]').length,
        scripts: [...document.scripts].filter(s => s.textContent.includes('alert(1)')).length,
        links: document.querySelectorAll('a[href^="javascript:"]').length,
    })""")


def test_every_page_draws_its_charts_and_no_hostile_markup(page: Page, dialogs: list[str]) -> None:
    for title, charts in PAGES.items():
        open_page(page, title, charts)
        settled(page)
        assert page.locator('[data-testid="stException"]').count() == 0, title
        assert page.locator(".js-plotly-plot").count() >= charts, title
        assert injected(page) == {"images": 0, "scripts": 0, "links": 0}, title
    assert dialogs == []


def test_runs_page_opens_the_config_and_provenance(page: Page, dialogs: list[str]) -> None:
    open_page(page, "Runs", 1)
    settled(page)
    page.get_by_role("button", name="Config and provenance of the chosen run").click()
    popover = page.locator('[data-testid="stPopoverBody"]')
    popover.locator('[data-testid="stJson"]').first.wait_for()
    popover.get_by_text("config_hash", exact=False).first.wait_for()
    assert injected(page) == {"images": 0, "scripts": 0, "links": 0} and dialogs == []
    page.keyboard.press("Escape")


def test_a_page_opened_by_its_address_connects_without_probing(browser: Browser, server: str) -> None:
    context = browser.new_context(viewport={"width": 1400, "height": 1600})
    try:
        tab = context.new_page()
        requests: list[str] = []
        tab.on("request", lambda request: requests.append(request.url))
        tab.goto(f"{server}/expert_bias?run=tiny")
        tab.locator("h1").filter(has_text="Expert bias").wait_for()
        tab.wait_for_function(DRAWN_CHARTS_JS, arg=1)
        assert tab.evaluate("() => window.__streamlit.BACKEND_BASE_URL") == f"{server}/"
        assert f"{server}/_stcore/health" in requests
        assert not [url for url in requests if "/expert_bias/_stcore/" in url], "the page's own path was probed"
        preloads = tab.evaluate("() => [...document.querySelectorAll('link[rel=modulepreload]')].map(l => l.href)")
        assert [url for url in preloads if url.startswith(f"{server}/static/js/PlotlyChart.")]
        open_page(tab, "Attention", 1)
        assert tab.url.split("?")[0] == f"{server}/attention", "page addresses stay relative to the server's root"
    finally:
        context.close()


@pytest.mark.parametrize(("address", "page", "root"), [
    ("/expert_load", "/expert_load", "/"), ("/", "/", "/"),
    ("/user/ada/proxy/8501/expert_load", "/expert_load", "/user/ada/proxy/8501/"),
    ("/user/ada/proxy/8501/", "/", "/user/ada/proxy/8501/"), ("/rewritten", "/expert_load", None)])
def test_the_page_names_its_root_behind_a_prefix(browser: Browser, address: str, page: str, root: str | None) -> None:
    script = head_hints(page, None).decode().removeprefix("<script>").removesuffix("</script>")
    assert "(window.location.origin, window.location.pathname, " in script
    script = script.replace("(window.location.origin, window.location.pathname, ",
                            f'("http://host:8501", "{address}", ')
    tab = browser.new_page()
    try:
        tab.evaluate(f"() => {{ {script} }}")
        named = tab.evaluate("() => window.__streamlit && window.__streamlit.BACKEND_BASE_URL")
    finally:
        tab.close()
    assert named == (None if root is None else f"http://host:8501{root}")


def click_cell(page: Page, chart: int, column: float, row: float) -> None:
    """Click a heatmap at fractions (column, row) of its plot area, from the top left."""
    area = page.locator(".js-plotly-plot").nth(chart).locator(".nsewdrag").first.bounding_box()
    page.mouse.click(area["x"] + area["width"] * column, area["y"] + area["height"] * row)


def pick_radio(page: Page, label: str) -> None:
    """Pick the radio option `label` (the caller waits for what it draws)."""
    page.locator('[data-testid="stRadio"]').get_by_text(label, exact=True).click()


def test_clicking_cells_opens_their_drill_down(page: Page) -> None:
    open_page(page, "Expert load", 1)
    settled(page)
    experts, layers = TINY.experts, len(TINY.moe_layers)
    click_cell(page, 0, (3 + 0.5) / experts, (5 - 2 + 0.5) / layers)
    page.get_by_text("Layer 5, expert 3 over steps").wait_for()
    pick_radio(page, "MaxVio")
    page.get_by_text("MaxVio over steps").wait_for()
    page.get_by_role("button", name="List them").click()
    page.locator('[data-testid="stPopoverBody"] [data-testid="stDataFrame"]').wait_for()
    page.keyboard.press("Escape")
    open_page(page, "Expert bias", 1)
    settled(page)
    click_cell(page, 0, 0.8, (6 - 2 + 0.5) / layers)
    page.get_by_text("Layer 6: bias over steps").wait_for()
    pick_radio(page, "Bias override rate")
    page.locator(".gtitle").filter(has_text="Bias override rate").wait_for()
    open_page(page, "Attention", 1)
    settled(page)
    click_cell(page, 0, (2 + 0.5) / TINY.heads, (4 - 1 + 0.5) / TINY.layers)
    page.get_by_text("Layer 4 (global), head 2").first.wait_for()


def test_hostile_text_shows_as_text(page: Page, dialogs: list[str]) -> None:
    open_page(page, "Specialisation", 1)
    settled(page)
    labels = page.locator(".js-plotly-plot").first.locator(".ytick text").evaluate_all(
        "texts => texts.map(text => text.textContent)")
    assert "<script>alert(1)</script>" in labels
    pick_radio(page, "Vocabulary")
    page.get_by_text("Vocabulary specialisation, layer").wait_for()
    vocabulary = page.locator(".js-plotly-plot").first.locator(".nsewdrag").first.bounding_box()
    for expert in range(TINY.experts):
        page.mouse.move(vocabulary["x"] + vocabulary["width"] * (expert + 0.5) / TINY.experts,
                        vocabulary["y"] + vocabulary["height"] * 0.97)
    page.locator(".hoverlayer .hovertext").first.wait_for()
    assert injected(page) == {"images": 0, "scripts": 0, "links": 0}
    open_page(page, "Attention", 1)
    page.get_by_text("Prompt 0: <script>alert(1)</script>", exact=False).wait_for()
    assert injected(page) == {"images": 0, "scripts": 0, "links": 0}
    assert dialogs == []


def last_step_metric(page: Page) -> Locator:
    """The Runs page's "Last step" metric."""
    return page.locator('[data-testid="stMetric"]').filter(has=page.get_by_text("Last step", exact=True))


def last_step_shown(page: Page) -> int:
    """The number in the Runs page's "Last step" metric."""
    metric = last_step_metric(page)
    return int(metric.locator('[data-testid="stMetricValue"]').inner_text().replace(",", ""))


def test_a_live_run_shows_new_steps_as_they_arrive(server: str, store_root: Path, page: Page) -> None:
    writer = Store(store_root).create_run("live", {"config": {}}, flush_every_steps=1)
    synthetic = SyntheticRun(TINY, seed=9)
    record(writer, synthetic, range(3), probe_every=0)
    writer.flush()
    stop = threading.Event()

    def keep_recording() -> None:
        step = 3
        while not stop.wait(0.5):
            record(writer, synthetic, range(step, step + 1), probe_every=0)
            writer.flush()
            step += 1

    recorder = threading.Thread(target=keep_recording, daemon=True)
    try:
        page.goto(f"{server}/?run=live&refresh=1")
        last_step_metric(page).wait_for()
        first = last_step_shown(page)
        recorder.start()
        deadline = time.monotonic() + 20
        while last_step_shown(page) <= first + 1:
            assert time.monotonic() < deadline, f"the last step stayed at {last_step_shown(page)} (was {first})"
            time.sleep(0.5)
    finally:
        stop.set()
        if recorder.is_alive():
            recorder.join(timeout=10)
        writer.close()
