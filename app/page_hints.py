"""Two hints put first in the <head> of the HTML page Streamlit answers every page address with, so that a
page opened by its own address (a bookmark, a reload, a link) draws sooner:

- where the server's root is (`window.__streamlit.BACKEND_BASE_URL`, which Streamlit's front end reads
  before it connects). Without it the front end of `/expert_load` first asks `/expert_load/_stcore/health`,
  gets the 404 that Streamlit answers on purpose, waits 100 ms and asks `/_stcore/health`. The page works
  the root out from its own address and the page path the server saw, so it is right behind a proxy that
  adds a prefix too (JupyterHub's, say); where the two do not match, it names nothing and Streamlit probes.
- a modulepreload of the front end's plotly chart bundle (4.7 MB, loaded on demand): the browser fetches and
  compiles it while the server runs the page's script, not once the first chart has arrived.

Nothing else of the page changes, and only HTML answers to page addresses are touched: assets, media,
downloads, the websocket and Streamlit's own endpoints pass through as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

# Streamlit's own routes (its reserved prefixes); a path holding one of these is not a page.
RESERVED_SEGMENTS = ("/_stcore/", "/media/", "/component/", "/static/")
# Request headers that would get the page compressed or answered 304 from a cache of the unedited page.
DROPPED_REQUEST_HEADERS = frozenset({b"accept-encoding", b"if-none-match", b"if-modified-since"})
# Response headers that describe the unedited file.
DROPPED_RESPONSE_HEADERS = frozenset({b"content-length", b"etag", b"last-modified"})
BUNDLE_NAME = re.compile(r"PlotlyChart\.[A-Za-z0-9_-]+\.js")


def plotly_bundle(static_dir: Path) -> str | None:
    """File name of the front end's plotly chart bundle in Streamlit's static folder (its name carries a
    content hash), or None where this Streamlit has no such file."""
    names = sorted(path.name for path in (static_dir / "static" / "js").glob("PlotlyChart.*.js"))
    return next((name for name in names if BUNDLE_NAME.fullmatch(name)), None)


def page_path(scope: MutableMapping[str, Any], base_url_path: str) -> str | None:
    """The path of a request below Streamlit's `server.baseUrlPath` ("/" for the main page), as the browser
    wrote it (percent-encoded); None for a path outside it."""
    raw = scope.get("raw_path") or scope["path"].encode()
    path = raw.decode("latin-1")
    prefix = f"/{base_url_path.strip('/')}" if base_url_path.strip("/") else ""
    if path != prefix and not path.startswith(f"{prefix}/"):
        return None
    return path[len(prefix):] or "/"


def head_hints(page: str, bundle: str | None) -> bytes:
    """The tags to put first in <head> of the page answered at `page` (see page_path): a script naming the
    server's root, where the page's address ends with `page`, and, when `bundle` is given, its modulepreload."""
    # json.dumps quotes the path for JavaScript (non-ASCII escaped); "<" escaped so that no path closes the script.
    quoted = json.dumps(page).replace("<", "\\u003c")
    tags = ("<script>(function (origin, path, page) {if (path.endsWith(page)) window.__streamlit = "
            "{BACKEND_BASE_URL: origin + path.slice(0, path.length - page.length) + '/'};})"
            f"(window.location.origin, window.location.pathname, {quoted});</script>")
    if bundle is not None:
        if not BUNDLE_NAME.fullmatch(bundle):
            raise ValueError(f"plotly bundle {bundle!r}: expected a file name like PlotlyChart.<hash>.js")
        # Relative, like Streamlit's own script tags, so that it resolves under any prefix.
        tags += f'<link rel="modulepreload" crossorigin href="./static/js/{bundle}">'
    return tags.encode()


def is_page_request(scope: MutableMapping[str, Any]) -> bool:
    """Whether an ASGI request asks for a page (a GET outside Streamlit's own routes)."""
    return (scope["type"] == "http" and scope["method"] == "GET"
            and not any(segment in scope["path"] for segment in RESERVED_SEGMENTS))


class PageHints:
    """ASGI middleware: puts head_hints first in the <head> of every HTML page answered to a page request.
    `base_url_path` is Streamlit's `server.baseUrlPath`; `bundle` the plotly bundle's file name, if any."""

    def __init__(self, app: ASGIApp, base_url_path: str, bundle: str | None) -> None:
        self.app = app
        self.base_url_path = base_url_path
        self.bundle = bundle

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        """Pass everything through; for a page request, edit the answer if it is a whole HTML page."""
        page = page_path(scope, self.base_url_path) if is_page_request(scope) else None
        if page is None:
            await self.app(scope, receive, send)
            return
        headers = [(name, value) for name, value in scope["headers"] if name.lower() not in DROPPED_REQUEST_HEADERS]
        await self.app({**scope, "headers": headers}, receive, _HeadEditor(send, head_hints(page, self.bundle)))


class _HeadEditor:
    """The `send` of one page request: holds back an HTML answer until its body is whole, then sends it with
    the hints after `<head>`; any other answer goes through untouched, message by message."""

    def __init__(self, send: Send, hints: bytes) -> None:
        self.send = send
        self.hints = hints
        self.start: Message | None = None
        self.body: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = {name.lower(): value for name, value in message.get("headers", [])}
            if message["status"] == 200 and headers.get(b"content-type", b"").startswith(b"text/html"):
                self.start = message
                return
        elif message["type"] == "http.response.body" and self.start is not None:
            self.body.append(message.get("body", b""))
            if not message.get("more_body", False):
                await self._send_edited()
            return
        await self.send(message)

    async def _send_edited(self) -> None:
        assert self.start is not None
        page = b"".join(self.body).replace(b"<head>", b"<head>" + self.hints, 1)
        headers = [(name, value) for name, value in self.start.get("headers", [])
                   if name.lower() not in DROPPED_RESPONSE_HEADERS]
        await self.send({**self.start, "headers": [*headers, (b"content-length", str(len(page)).encode())]})
        await self.send({"type": "http.response.body", "body": page})
