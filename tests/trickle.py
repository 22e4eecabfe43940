"""A slow proxy in front of a real registry (never mocked), and a frozen registry.

`TrickleProxy` forwards every request to the registry; for requests matching a pattern it
can send the body at N bytes per second (`trickle`), send the headers and then nothing
(`stall`), send nothing at all (`freeze`), redirect to itself for ever (`redirect_loop`)
or answer with a body that never ends, sent as fast as it is taken (`endless`). Closing it
releases every held answer.

`frozen(registry)` SIGSTOPs the registry process for the block and always SIGCONTs it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import httpx

from tests.loopback import LoopbackServer
from tests.registry_harness import Registry

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
        "content-length", "host"}


@contextlib.contextmanager
def frozen(registry: Registry) -> Iterator[int]:
    """The registry process stopped (SIGSTOP) while in the block; its pid."""
    assert registry.process is not None and registry.process.poll() is None
    pid = registry.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


class TrickleProxy(LoopbackServer):
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.lock = threading.Lock()
        # (pattern on "METHOD PATH", mode, bytes per second)
        self.rules: list[tuple[re.Pattern[str], str, float]] = []
        self.closing = threading.Event()
        self.held = 0  # answers being trickled, stalled or frozen right now
        self.redirects = 0  # redirects sent by `redirect_loop`
        self.endless_sent = 0  # body bytes sent by `endless`
        self.client = httpx.Client(timeout=60)
        self.host = f"127.0.0.1:{self._listen(self._handle)}"

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        try:
            self._serve(h)
        except OSError:  # the client gave up on us
            h.close_connection = True

    def __exit__(self, *exc: object) -> None:
        self.closing.set()  # let go of the answers held
        super().__exit__(*exc)

    def close(self) -> None:
        self.client.close()

    # ---- faults ------------------------------------------------------------------

    def trickle(self, pattern: str, rate: float) -> None:
        """Bodies of matching answers at `rate` bytes per second."""
        self._add(pattern, "trickle", rate)

    def stall(self, pattern: str) -> None:
        """Headers of matching answers, then nothing until closed."""
        self._add(pattern, "stall", 0)

    def freeze(self, pattern: str) -> None:
        """Nothing at all for matching requests until closed."""
        self._add(pattern, "freeze", 0)

    def redirect_loop(self, pattern: str) -> None:
        """Matching requests redirected to a new URL of the same path, for ever."""
        self._add(pattern, "redirect_loop", 0)

    def endless(self, pattern: str) -> None:
        """Matching requests answered 200 with a chunked body that never ends."""
        self._add(pattern, "endless", 0)

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def _add(self, pattern: str, mode: str, rate: float) -> None:
        with self.lock:
            self.rules.append((re.compile(pattern), mode, rate))

    def _rule(self, method: str, path: str) -> tuple[str, float] | None:
        with self.lock:
            for pattern, mode, rate in self.rules:
                if pattern.search(f"{method} {path}"):
                    return mode, rate
        return None

    # ---- serving -----------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("content-length") or 0)
        body = h.rfile.read(length) if length else b""
        rule = self._rule(h.command, h.path)
        if rule is not None and rule[0] == "freeze":
            self._hold(h, lambda: self.closing.wait())
            return
        if rule is not None and rule[0] == "redirect_loop":
            self.redirects += 1
            h.send_response(302)
            h.send_header("Location", f"{h.path.split('?')[0]}?hop={self.redirects}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if rule is not None and rule[0] == "endless":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            self._hold(h, lambda: self._endless(h))
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
        r = self.client.request(h.command, self.upstream + h.path, headers=headers,
                                content=body)
        h.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() not in _HOP:
                if k.lower() == "location" and v.startswith(self.upstream):
                    v = v[len(self.upstream):]
                h.send_header(k, v)
        h.send_header("Content-Length", r.headers.get("content-length", "0")
                      if h.command == "HEAD" else str(len(r.content)))
        h.end_headers()
        if h.command == "HEAD":
            return
        if rule is None:
            h.wfile.write(r.content)
            return
        mode, rate = rule
        if mode == "stall":
            h.wfile.flush()
            self._hold(h, lambda: self.closing.wait())
            return
        self._hold(h, lambda: self._trickle(h, r.content, rate))

    def _hold(self, h: BaseHTTPRequestHandler, wait: object) -> None:
        with self.lock:
            self.held += 1
        try:
            wait()  # type: ignore[operator]
        finally:
            with self.lock:
                self.held -= 1
            h.close_connection = True

    def _endless(self, h: BaseHTTPRequestHandler) -> None:
        block = b" " * (64 << 10)  # JSON whitespace: a parser never sees an end
        frame = b"%x\r\n" % len(block) + block + b"\r\n"
        while not self.closing.is_set():
            h.wfile.write(frame)
            self.endless_sent += len(block)

    def _trickle(self, h: BaseHTTPRequestHandler, data: bytes, rate: float) -> None:
        # Pieces of a tenth of a second's worth (at least a byte), on time.
        piece = max(1, int(rate / 10))
        start = time.monotonic()
        for i in range(0, len(data), piece):
            due = start + i / rate
            if self.closing.wait(max(0.0, due - time.monotonic())):
                return
            h.wfile.write(data[i:i + piece])
            h.wfile.flush()
