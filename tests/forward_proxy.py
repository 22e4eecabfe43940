"""A small HTTP forward proxy for tests (loopback only), standing in for a P2P daemon used
as a proxy (Dragonfly's dfdaemon): absolute-form requests (`GET http://host:port/path`)
are forwarded to their target, the answer streamed back, and every request recorded.
No CONNECT (the tests talk plain HTTP to the registry)."""

from __future__ import annotations

import http.client
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization",
              "te", "trailer", "transfer-encoding", "upgrade"}


class ForwardProxy:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []  # (method, absolute URL)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                url = urlsplit(self.path)
                if url.scheme != "http" or not url.hostname:
                    self.send_error(400, "absolute-form http URL expected")
                    return
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                target = url.path + (f"?{url.query}" if url.query else "")
                conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=30)
                try:
                    conn.request(self.command, target, body=body, headers=headers)
                    answer = conn.getresponse()
                    self.send_response(answer.status, answer.reason)
                    for k, v in answer.getheaders():
                        if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    if self.command == "HEAD" or answer.length is None:
                        # Length unknown (or none to send): the body ends with the connection.
                        if answer.getheader("Content-Length") is not None:
                            self.send_header("Content-Length", answer.getheader("Content-Length"))
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    else:
                        self.send_header("Content-Length", str(answer.length))
                    self.end_headers()
                    if self.command != "HEAD":
                        shutil.copyfileobj(answer, self.wfile, 1 << 20)
                finally:
                    conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def seen(self, method: str, fragment: str) -> list[str]:
        with self._lock:
            return [u for m, u in self.requests if m == method and fragment in u]

    def __enter__(self) -> ForwardProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
