"""app.page_hints: the tags it puts in a page's <head>, and the middleware that puts them only into HTML pages
answered to page requests, with the headers mended, leaving every other request and answer as it was."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest
from streamlit.file_util import get_static_dir

from app.page_hints import PageHints, head_hints, page_path, plotly_bundle

BUNDLE = "PlotlyChart.Ab_9-x.js"
PAGE = b"<!DOCTYPE html>\n<html lang=\"en\">\n  <head>\n    <title>Streamlit</title>\n  </head><body></body></html>"
ROOT_SCRIPT = ("<script>(function (origin, path, page) {if (path.endsWith(page)) window.__streamlit = "
               "{BACKEND_BASE_URL: origin + path.slice(0, path.length - page.length) + '/'};})"
               "(window.location.origin, window.location.pathname, %s);</script>")


def test_hints_name_the_root_from_the_page_path_and_preload_the_bundle() -> None:
    assert head_hints("/expert_load", BUNDLE).decode() == (
        ROOT_SCRIPT % '"/expert_load"' + f'<link rel="modulepreload" crossorigin href="./static/js/{BUNDLE}">')
    assert head_hints("/", None).decode() == ROOT_SCRIPT % '"/"'


def test_a_page_path_cannot_close_the_script() -> None:
    hints = head_hints("/a</script><script>alert(1)", None).decode()
    assert hints.count("</script>") == 1 and hints.endswith("</script>")
    assert '"/a\\u003c/script>\\u003cscript>alert(1)"' in hints


def test_a_bundle_name_that_is_not_a_plain_file_name_is_refused() -> None:
    with pytest.raises(ValueError, match=re.escape("PlotlyChart.<hash>.js")):
        head_hints("/", 'PlotlyChart.x.js"><script>alert(1)</script>')


@pytest.mark.parametrize(("path", "base_url_path", "page"), [
    ("/", "", "/"), ("/expert_load", "", "/expert_load"), ("/expert_load/", "", "/expert_load/"),
    ("/dash", "dash", "/"), ("/dash/", "/dash/", "/"), ("/dash/expert_load", "dash", "/expert_load"),
    ("/dashboard", "dash", None), ("/other/expert_load", "dash", None)])
def test_the_page_path_is_the_path_below_the_base_url_path(path: str, base_url_path: str, page: str | None) -> None:
    assert page_path({"path": path, "raw_path": path.encode()}, base_url_path) == page
    assert page_path({"path": path}, base_url_path) == page


def test_the_page_path_is_as_the_browser_wrote_it() -> None:
    assert page_path({"path": "/a b", "raw_path": b"/a%20b"}, "") == "/a%20b"


def test_the_bundle_is_found_in_the_static_folder(tmp_path: Path) -> None:
    scripts = tmp_path / "static" / "js"
    scripts.mkdir(parents=True)
    assert plotly_bundle(tmp_path) is None
    (scripts / "index.1.js").write_text("")
    (scripts / BUNDLE).write_text("")
    assert plotly_bundle(tmp_path) == BUNDLE


def test_the_installed_streamlit_has_a_plotly_bundle() -> None:
    assert plotly_bundle(Path(get_static_dir())) is not None, "Streamlit renamed its plotly bundle: update BUNDLE_NAME"


def scope(path: str, method: str = "GET", kind: str = "http") -> dict[str, Any]:
    """An ASGI request scope for `path` that accepts gzip and has a cached copy (If-None-Match)."""
    return {"type": kind, "method": method, "path": path,
            "headers": [(b"host", b"127.0.0.1"), (b"accept-encoding", b"gzip"), (b"if-none-match", b'"old"')]}


def serve(request: dict[str, Any], status: int, content_type: bytes, chunks: list[bytes]) -> tuple[list[dict], list]:
    """Run `request` through PageHints over an app that answers `chunks`; (messages sent, headers the app saw)."""
    seen: list = []
    sent: list[dict] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.append(scope["headers"])
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type), (b"etag", b'"file"'),
                                (b"content-length", str(sum(map(len, chunks))).encode())]})
        for index, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": index < len(chunks) - 1})

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(PageHints(app, "", BUNDLE)(request, None, send))
    return sent, seen[0]


def test_a_page_gets_the_hints_after_its_head_with_its_length_mended() -> None:
    sent, seen = serve(scope("/expert_load"), 200, b"text/html; charset=utf-8", [PAGE[:30], PAGE[30:]])
    start, body = sent
    assert body["body"] == PAGE.replace(b"<head>", b"<head>" + head_hints("/expert_load", BUNDLE))
    assert not body.get("more_body")
    headers = dict(start["headers"])
    assert headers[b"content-length"] == str(len(body["body"])).encode()
    assert b"etag" not in headers, "the etag is the unedited file's"
    assert dict(seen).keys() == {b"host"}, "asked uncompressed and uncached, so that the page can be edited"


@pytest.mark.parametrize(("status", "content_type"), [(200, b"application/json"), (404, b"text/html"),
                                                      (304, b"text/html")])
def test_other_answers_to_a_page_request_pass_through(status: int, content_type: bytes) -> None:
    chunks = [b"<head>one", b"two"]
    sent, _ = serve(scope("/data.csv"), status, content_type, chunks)
    assert [message.get("body") for message in sent] == [None, *chunks]
    assert dict(sent[0]["headers"])[b"etag"] == b'"file"'


@pytest.mark.parametrize("request_scope", [scope("/_stcore/health"), scope("/expert_load/_stcore/health"),
                                           scope("/static/js/index.js"), scope("/media/abc.csv"),
                                           scope("/component/x/index.html"), scope("/", method="HEAD"),
                                           scope("/_stcore/stream", kind="websocket")])
def test_streamlit_routes_and_other_requests_are_untouched(request_scope: dict[str, Any]) -> None:
    sent, seen = serve(request_scope, 200, b"text/html", [PAGE])
    assert sent[1]["body"] == PAGE
    assert seen == request_scope["headers"]
