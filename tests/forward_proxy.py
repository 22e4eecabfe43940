"""A small HTTP forward proxy for tests (loopback only), standing in for a P2P daemon used
as a proxy (Dragonfly's dfdaemon): absolute-form requests (`GET http://host:port/path`)
are forwarded to their target, the answer streamed back, and every request recorded.
No CONNECT (the tests talk plain HTTP to the registry)."""

from __future__ import annotations

import http.client
import shutil
import threading
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlsplit

from tests.loopback import LoopbackServer

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization",
              "te", "trailer", "transfer-encoding", "upgrade"}


class ForwardProxy(LoopbackServer):
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []  # (method, absolute URL)
        self._lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self._listen(self._forward)}"

    def _forward(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        if url.scheme != "http" or not url.hostname:
            h.send_error(400, "absolute-form http URL expected")
            return
        with self._lock:
            self.requests.append((h.command, h.path))
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_BY_HOP}
        target = url.path + (f"?{url.query}" if url.query else "")
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=30)
        try:
            conn.request(h.command, target, body=body, headers=headers)
            answer = conn.getresponse()
            h.send_response(answer.status, answer.reason)
            for k, v in answer.getheaders():
                if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                    h.send_header(k, v)
            if h.command == "HEAD" or answer.length is None:
                # Length unknown (or none to send): the body ends with the connection.
                if answer.getheader("Content-Length") is not None:
                    h.send_header("Content-Length", answer.getheader("Content-Length"))
                h.send_header("Connection", "close")
                h.close_connection = True
            else:
                h.send_header("Content-Length", str(answer.length))
            h.end_headers()
            if h.command != "HEAD":
                shutil.copyfileobj(answer, h.wfile, 1 << 20)
        finally:
            conn.close()

    def seen(self, method: str, fragment: str) -> list[str]:
        with self._lock:
            return [u for m, u in self.requests if m == method and fragment in u]
