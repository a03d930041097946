"""Two hints put first in the <head> of the HTML page Streamlit answers every page address with, so that a
page opened by its own address (a bookmark, a reload, a link) draws sooner:

- where the server is (`window.__streamlit.BACKEND_BASE_URL`, which Streamlit's front end reads before it
  connects). Without it the front end of `/expert_load` first asks `/expert_load/_stcore/health`, gets the
  404 that Streamlit answers on purpose, waits 100 ms and asks `/_stcore/health`.
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


def head_hints(base_url_path: str, bundle: str | None) -> bytes:
    """The tags to put first in <head>: the server's base URL (the page's origin plus Streamlit's
    `server.baseUrlPath`) and, when `bundle` is given, its modulepreload."""
    prefix = f"/{base_url_path.strip('/')}/" if base_url_path.strip("/") else "/"
    # json.dumps quotes the path for JavaScript; "<" escaped so that no path can close the script element.
    quoted = json.dumps(prefix).replace("<", "\\u003c")
    tags = f"<script>window.__streamlit = {{BACKEND_BASE_URL: window.location.origin + {quoted}}};</script>"
    if bundle is not None:
        if not BUNDLE_NAME.fullmatch(bundle):
            raise ValueError(f"plotly bundle {bundle!r}: expected a file name like PlotlyChart.<hash>.js")
        tags += f'<link rel="modulepreload" crossorigin href="{prefix}static/js/{bundle}">'
    return tags.encode()


def is_page_request(scope: MutableMapping[str, Any]) -> bool:
    """Whether an ASGI request asks for a page (a GET outside Streamlit's own routes)."""
    return (scope["type"] == "http" and scope["method"] == "GET"
            and not any(segment in scope["path"] for segment in RESERVED_SEGMENTS))


class PageHints:
    """ASGI middleware: puts `hints` first in the <head> of every HTML page answered to a page request."""

    def __init__(self, app: ASGIApp, hints: bytes) -> None:
        self.app = app
        self.hints = hints

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        """Pass everything through; for a page request, edit the answer if it is a whole HTML page."""
        if not is_page_request(scope):
            await self.app(scope, receive, send)
            return
        headers = [(name, value) for name, value in scope["headers"] if name.lower() not in DROPPED_REQUEST_HEADERS]
        await self.app({**scope, "headers": headers}, receive, _HeadEditor(send, self.hints))


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
            content_type = dict((name.lower(), value) for name, value in message.get("headers", []))
            if message["status"] == 200 and content_type.get(b"content-type", b"").startswith(b"text/html"):
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
