"""Serve the browser directory on 127.0.0.1 (`browse.serve=true`): the page works from file:// too;
serving helps when the run dir is on a remote machine reached through an SSH tunnel.

Bound to the loopback interface only: a checkpoint's names and statistics are not for the network.
"""

from __future__ import annotations

import functools
import http.server
import logging
import threading
from pathlib import Path

log = logging.getLogger("moesurgeon")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        log.debug("browse server: " + format, *args)


def start_server(directory: Path, port: int = 0) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Start serving `directory` on 127.0.0.1:`port` (0: any free port) in a thread; return (server, URL)."""
    if not 0 <= int(port) <= 65535:
        from .errors import BrowseError

        raise BrowseError(f"browse.port={port}: expected 0 (any free port) or a port number up to 65535")
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), handler)
    thread = threading.Thread(target=server.serve_forever, name="browse-server", daemon=True)
    thread.start()
    host, bound = server.server_address[:2]
    return server, f"http://{host}:{bound}/index.html"


def serve_until_interrupted(directory: Path, port: int = 0) -> None:
    """Serve until Ctrl-C, printing the URL (the run's files are already written)."""
    server, url = start_server(directory, port)
    print(f"browse: serving {directory} at {url}  (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
