"""The scaffolding every test HTTP server shares: a loopback HTTP(S)/1.1 server on a free
port, each request of any method handed to one callback, served from daemon threads
while in `with`. A client dropping a keep-alive connection resets it under a handler:
that error is kept in `server.errors`, not printed into the stderr the tests read
galleryfs's messages from."""

from __future__ import annotations

import ssl
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True
    errors: list[str]

    def handle_error(self, request: object, client_address: object) -> None:
        self.errors.append(repr(sys.exc_info()[1]))


class LoopbackServer:
    def _listen(self, handle: Callable[[BaseHTTPRequestHandler], None],
                tls: ssl.SSLContext | None = None) -> int:
        """Serve `handle` (once entered); the port it listens on."""

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                handle(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _handle

        self.server = _Quiet(("127.0.0.1", 0), Handler)
        self.server.errors = []
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        return int(self.server.server_address[1])

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.close()

    def close(self) -> None:
        """What the server holds besides its socket (a client to its upstream)."""
