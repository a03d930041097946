"""Serve the dashboard: `streamlit run app/asgi.py` (app/main.py behind app.page_hints) on one store folder,
with locked-down server settings.

The store folder reaches the app through the VPMOE_STORE environment variable of the server process;
the app reads nothing else. Bound to 127.0.0.1 by default; Host headers are checked against
`server.allowedHosts` (DNS rebinding), CORS and XSRF protection stay on, and nothing is sent home.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

STORE_ENV = "VPMOE_STORE"
ENTRY = Path(__file__).resolve().with_name("asgi.py")
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})


def allowed_hosts(host: str) -> list[str]:
    """Host names a browser may use to reach a server bound to `host`: loopback names, the address itself,
    and this machine's names when bound to every interface."""
    names = ["localhost", "127.0.0.1", "::1"]
    if host in WILDCARD_ADDRESSES:
        names += [socket.gethostname(), socket.getfqdn()]
    else:
        names.append(host)
    return list(dict.fromkeys(names))


def streamlit_command(host: str = "127.0.0.1", port: int = 8501, headless: bool = True) -> list[str]:
    """The `streamlit run` command line for the dashboard with the server flags set."""
    flags = {
        "server.address": host, "server.port": str(port), "server.headless": str(headless).lower(),
        "server.enableXsrfProtection": "true", "server.enableCORS": "true", "server.fileWatcherType": "none",
        "server.runOnSave": "false", "browser.gatherUsageStats": "false", "client.toolbarMode": "viewer",
    }
    command = [sys.executable, "-m", "streamlit", "run", str(ENTRY)]
    for name, value in flags.items():
        command += [f"--{name}", value]
    for name in allowed_hosts(host):
        command += ["--server.allowedHosts", name]
    return command


def serve(store: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 8501, headless: bool = True) -> int:
    """Run the dashboard on the store folder `store` until it stops; returns the server's exit code."""
    folder = Path(store).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        print(f"vpmoe serve: {folder} is not a folder; give the store folder (the one holding the runs)",
              file=sys.stderr)
        return 2
    environment = {**os.environ, STORE_ENV: str(folder)}
    try:
        return subprocess.run(streamlit_command(host, port, headless), env=environment, check=False).returncode
    except KeyboardInterrupt:
        return 130
