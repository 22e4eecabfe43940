"""Direct range reads (http.client in threads) against real registries, and their
fall-back to the httpx path for whatever they do not handle."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from galleryfs.registry.client import ClientOptions, RegistryClient
from galleryfs.registry.credentials import Credentials
from galleryfs.registry.ranges import DirectRanges
from tests.faultproxy import FaultProxy
from tests.registry_harness import Registry
from tests.test_chunks import push_blob

REPO = "direct/blob"
SIZE = 3 * 65536 + 77
RANGES = [(0, 1), (0, 65536), (65536, 3 * 65536), (SIZE - 77, SIZE), (1000, 1000 + 4096)]


def _push(registry: Registry, data: bytes) -> str:
    """Into a plain registry (token and TLS tests push with the galleryfs client)."""
    return push_blob(registry.url, REPO, data)


async def _read_all(ranges: DirectRanges, digest: str, data: bytes) -> None:
    for start, end in RANGES:
        got = await ranges(REPO, digest, start, end)
        assert bytes(got) == data[start:end]


def test_plain_registry_reads_directly(registry: Registry) -> None:
    data = os.urandom(SIZE)
    digest = _push(registry, data)

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            ranges = DirectRanges(client)
            await _read_all(ranges, digest, data)
            assert ranges.stats.direct == len(RANGES) and ranges.stats.fallbacks == 0
            assert client.bytes_received == sum(e - s for s, e in RANGES)
            assert client.requests_sent == len(RANGES)
            assert ranges.transport.idle == 1  # one keep-alive connection served them all
            ranges.close()

    trio.run(run)


async def _push_with(client: RegistryClient, data: bytes) -> str:
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    await client.upload_blob_bytes(REPO, digest, data)
    return digest


def test_token_registry_falls_back_until_a_token_is_held(token_registry: Registry) -> None:
    reg = token_registry
    data = os.urandom(SIZE)
    creds = Credentials(reg.username, reg.password)

    async def run() -> None:
        async with RegistryClient(reg.host, ClientOptions(plain_http=True, credentials=creds)) as client:
            digest = await _push_with(client, data)
            # A fresh client has seen no challenge: the first read goes through httpx,
            # which fetches the pull token; the rest reuse it directly.
        async with RegistryClient(reg.host, ClientOptions(plain_http=True, credentials=creds)) as client:
            ranges = DirectRanges(client)
            await _read_all(ranges, digest, data)
            assert ranges.stats.fallbacks == 1
            assert ranges.stats.direct == len(RANGES) - 1
            ranges.close()

    trio.run(run)


def test_tls_registry_reads_directly_with_its_ca(tls_registry: Registry) -> None:
    reg = tls_registry
    data = os.urandom(SIZE)

    async def run() -> None:
        async with RegistryClient(reg.host, ClientOptions(ca_file=reg.ca_file)) as client:
            digest = await _push_with(client, data)
            ranges = DirectRanges(client)
            await _read_all(ranges, digest, data)
            assert ranges.stats.direct == len(RANGES) and ranges.stats.fallbacks == 0
            ranges.close()

    trio.run(run)


def test_redirects_and_errors_fall_back_to_httpx(registry: Registry) -> None:
    data = os.urandom(SIZE)
    digest = _push(registry, data)

    async def run() -> None:
        with FaultProxy(registry.url) as proxy:
            async with RegistryClient(proxy.host, ClientOptions(plain_http=True)) as client:
                ranges = DirectRanges(client)
                # Storage redirects (Harbor with S3): httpx follows them.
                proxy.redirect_blobs = registry.url
                await _read_all(ranges, digest, data)
                assert ranges.stats.direct == 0 and ranges.stats.fallbacks == len(RANGES)
                # A 503 to the direct request: httpx retries (its own request sees the
                # second fault and retries again).
                proxy.redirect_blobs = None
                proxy.fail(r"^GET /v2/direct/blob/blobs/", 2, 503)
                got = await ranges(REPO, digest, 10, 20)
                assert bytes(got) == data[10:20]
                assert proxy.faults == []
                assert ranges.stats.fallbacks == len(RANGES) + 1
                # And the next read is direct again.
                assert bytes(await ranges(REPO, digest, 0, 5)) == data[:5]
                assert ranges.stats.direct == 1
                ranges.close()

    trio.run(run)


def test_cancelled_read_leaves_the_reader_usable(registry: Registry) -> None:
    data = os.urandom(SIZE)
    digest = _push(registry, data)

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            ranges = DirectRanges(client, connections=1)
            with trio.CancelScope() as scope:
                scope.cancel()  # cancelled before the worker thread gets going
                await ranges(REPO, digest, 0, SIZE)
            assert scope.cancelled_caught
            with trio.fail_after(30):
                assert bytes(await ranges(REPO, digest, 0, SIZE)) == data
            ranges.close()

    trio.run(run)


@pytest.mark.parametrize("no_proxy", [None, "127.0.0.1"])
def test_environment_proxy_decides_the_direct_path(registry: Registry, monkeypatch,
                                                   no_proxy: str | None) -> None:
    """httpx honours proxy variables; the direct path must not go around the proxy."""
    data = os.urandom(SIZE)
    digest = _push(registry, data)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    if no_proxy:
        monkeypatch.setenv("no_proxy", no_proxy)

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            ranges = DirectRanges(client)
            assert ranges.enabled is bool(no_proxy)
            if no_proxy:
                assert bytes(await ranges(REPO, digest, 0, 100)) == data[:100]
                assert ranges.stats.direct == 1

    trio.run(run)


# ---- spans: read-ahead in long ranges, through the ChunkReader -------------------------

CHUNK = 65536


def _pushed(registry: Registry, size: int):  # noqa: ANN202 - (bytes, BlobRef)
    from galleryfs.modelpack import ChunkTable
    from galleryfs.mount.reader import BlobRef

    data = os.urandom(size)
    return data, BlobRef(REPO, push_blob(registry.url, REPO, data), size,
                         ChunkTable.of_bytes(data, CHUNK))


def _span_reader(client: RegistryClient, window_chunks: int, disk=None):  # noqa: ANN001, ANN202
    """A ChunkReader reading ahead in spans through a DirectRanges of `client`."""
    from galleryfs.mount.reader import ChunkReader

    ranges = DirectRanges(client)
    reader = ChunkReader(ranges, span_fetch=ranges.span, chunk_size=CHUNK,
                         window_cap=window_chunks * CHUNK, disk=disk)
    return ranges, reader


async def _sequential(handle, size: int, piece: int = 16384) -> bytes:  # noqa: ANN001
    out = bytearray()
    while len(out) < size:
        out += await handle.read(len(out), piece)
    return bytes(out)


def test_sequential_reads_prefetch_in_spans_and_fill_the_disk_cache(registry: Registry,
                                                                    tmp_path) -> None:
    from galleryfs.mount.diskcache import DiskCache
    from tests.test_chunks import write_behind

    data, blob = _pushed(registry, 40 * CHUNK + 123)
    digest = blob.digest

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            ranges, reader = _span_reader(client, 8, DiskCache(tmp_path, 1 << 30, CHUNK))
            # The disk cache is written as in a mount: by the write-behind, at a flush.
            async with write_behind(reader) as kernel, trio.open_nursery() as nursery:
                kernel.holds(blob, data)
                handle = reader.open(blob, nursery)
                assert await _sequential(handle, len(data)) == data
                handle.close()
            # Every chunk reached the disk cache, and the blob was verified and promoted.
            assert (tmp_path / "blobs" / "sha256" / digest.split(":")[1]).read_bytes() == data
            assert reader.snapshot()["spans"] > 0
            # Fewer requests than chunks: the stream went out in multi-chunk ranges.
            assert client.requests_sent < 41 * 0.5, client.requests_sent
            assert reader.snapshot()["fetched_bytes"] == len(data)
            ranges.close()

    trio.run(run)


def test_a_failed_span_leaves_its_chunks_to_the_readers(registry: Registry) -> None:
    data, blob = _pushed(registry, 24 * CHUNK)

    async def run() -> None:
        with FaultProxy(registry.url) as proxy:
            async with RegistryClient(proxy.host, ClientOptions(plain_http=True)) as client:
                ranges, reader = _span_reader(client, 8)
                # Every blob GET fails for a while: direct spans fall back to httpx,
                # which retries; readers never see an error.
                proxy.fail(r"^GET /v2/direct/blob/blobs/", 3, 503)
                async with trio.open_nursery() as nursery:
                    handle = reader.open(blob, nursery)
                    with trio.fail_after(60):
                        assert await _sequential(handle, len(data)) == data
                    handle.close()
                assert proxy.faults == []
                assert reader.snapshot()["in_flight"] == 0  # nothing left claimed
                ranges.close()

    trio.run(run)


def test_closing_a_file_mid_stream_releases_its_spans(registry: Registry) -> None:
    data, blob = _pushed(registry, 64 * CHUNK)

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            ranges, reader = _span_reader(client, 16)
            async with trio.open_nursery() as nursery:
                handle = reader.open(blob, nursery)
                assert await _sequential(handle, 8 * CHUNK) == data[:8 * CHUNK]
                handle.close()
            # The nursery is done: every span ran or was cancelled, none left claimed.
            assert reader.snapshot()["in_flight"] == 0
            # A new reader of the same blob is served normally.
            handle = reader.open(blob, None)
            assert bytes(await handle.read(20 * CHUNK, 100)) == data[20 * CHUNK:20 * CHUNK + 100]
            ranges.close()

    trio.run(run)


# ---- one rule for range answers, on both paths -----------------------------------------


class RangeBendingProxy(FaultProxy):
    """Answers blob Range GETs with another range than asked, honestly labelled, as a
    cache that aligns or clamps ranges would: `shift` moves the range, `trim` shortens it."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.shift = 0
        self.trim = 0

    def _serve(self, h) -> None:  # noqa: ANN001 - a BaseHTTPRequestHandler
        import re

        m = re.fullmatch(r"bytes=(\d+)-(\d+)", h.headers.get("range") or "")
        if not (m and h.command == "GET" and (self.shift or self.trim)):
            super()._serve(h)
            return
        first, last = int(m.group(1)) + self.shift, int(m.group(2)) + self.shift - self.trim
        r = self.client.get(self.upstream + h.path, headers={"Range": f"bytes={first}-{last}"})
        with self.lock:  # before the answer: the test counts requests once it has it
            self.seen.append((h.command, h.path, r.status_code))
        self._reply(h, r.status_code, {"Content-Range": r.headers["content-range"],
                                       "Content-Type": "application/octet-stream"}, r.content)


@pytest.mark.parametrize("bend", ["shift", "trim"])
def test_a_range_answer_for_other_bytes_is_an_error_on_both_paths(registry: Registry,
                                                                  bend: str) -> None:
    """A 206 whose Content-Range names other bytes than asked is never served as the
    bytes asked: the direct path hands it to httpx, where it is an error, not retried."""
    from galleryfs.errors import RegistryError

    data = os.urandom(SIZE)
    digest = _push(registry, data)

    async def run() -> None:
        with RangeBendingProxy(registry.url) as proxy:
            async with RegistryClient(proxy.host, ClientOptions(plain_http=True)) as client:
                setattr(proxy, bend, 100)
                with pytest.raises(RegistryError, match="asked for bytes 1000-5095"):
                    await client.read_range(REPO, digest, 1000, 5096)
                assert len(proxy.seen) == 1  # not retried
                ranges = DirectRanges(client)
                with pytest.raises(RegistryError, match="asked for bytes 1000-5095"):
                    await ranges(REPO, digest, 1000, 5096)
                # The direct request was refused, then the httpx one.
                assert len(proxy.seen) == 3
                assert ranges.stats.direct == 0 and ranges.stats.fallbacks == 1
                # Honest answers again: both paths serve them.
                setattr(proxy, bend, 0)
                assert bytes(await ranges(REPO, digest, 1000, 5096)) == data[1000:5096]
                assert bytes(await client.read_range(REPO, digest, 0, 10)) == data[:10]
                assert ranges.stats.direct == 1
                ranges.close()

    trio.run(run)


@pytest.mark.parametrize(("status", "content_range", "length", "start", "end", "wrong"), [
    (206, "bytes 10-19/100", "10", 10, 20, None),
    (206, "bytes 10-19/*", None, 10, 20, None),
    (206, "bytes 10-99/100", "90", 10, None, None),
    (200, None, "100", 10, 20, "HTTP 200"),
    (206, None, "10", 10, 20, "Content-Range None"),
    (206, "bytes 20-29/100", "10", 10, 20, "asked for bytes 10-19"),
    (206, "bytes 10-18/100", "9", 10, 20, "asked for bytes 10-19"),
    (206, "bytes 10-19/15", "10", 10, 20, "past the blob's size"),
    (206, "bytes 10-19/100", "12", 10, 20, "Content-Length '12'"),
    (206, "bytes 10-19/100", "x", 10, 20, "Content-Length 'x'"),
])
def test_the_range_rule(status: int, content_range: str | None, length: str | None,
                        start: int, end: int | None, wrong: str | None) -> None:
    from galleryfs.registry.rangecheck import range_mismatch

    reason = range_mismatch(status, content_range, length, start, end)
    assert (reason is None) if wrong is None else (wrong in (reason or "")), reason


def test_the_direct_path_talks_only_to_the_registry_with_what_httpx_negotiated() -> None:
    from galleryfs.registry.direct import DirectTransport, Fallback

    async def run() -> None:
        creds = Credentials("u", "p")
        options = ClientOptions(plain_http=True, credentials=creds)
        async with RegistryClient("127.0.0.1:5999", options) as client:
            transport = DirectTransport(client)
            url = "http://127.0.0.1:5999/v2/g/m/blobs/uploads/abc?_state=x"
            assert transport.target(url) == "/v2/g/m/blobs/uploads/abc?_state=x"
            for elsewhere in ("http://localhost:5999/v2/", "http://127.0.0.1:80/v2/",
                              "https://127.0.0.1:5999/v2/"):
                with pytest.raises(Fallback, match="another host"):
                    transport.target(elsewhere)
            # Before a challenge: nothing, httpx finds out what the registry wants.
            assert "Authorization" not in transport.headers("GET", "/v2/g/m/blobs/x", {})
            client.auth.scheme = "basic"  # as after a Basic challenge
            headers = transport.headers("GET", "/v2/g/m/blobs/x", {"Range": "bytes=0-1"})
            assert headers["Authorization"].startswith("Basic ")
            assert headers["Range"] == "bytes=0-1"

    trio.run(run)


@pytest.mark.parametrize("direct", [True, False])
def test_a_span_digests_what_it_receives_in_the_receiving_thread(registry: Registry,
                                                                 direct: bool) -> None:
    """With `unit`, each piece of a span comes with the sha256 of every `unit` bytes of it
    (the last one shorter), hashed by the thread that received it; pieces received
    through httpx (the fallback) come without digests, for their taker to hash."""
    import hashlib

    data = os.urandom(SIZE)
    digest = _push(registry, data)
    piece, unit = 2 * 65536, 65536

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            ranges = DirectRanges(client)
            ranges.transport.enabled = direct
            got: list[tuple[int, bytes, bytes | None]] = []

            async def deliver(offset: int, buf: bytearray, sums: bytes | None) -> None:
                got.append((offset, bytes(buf), sums))

            assert await ranges.span(REPO, digest, 10, SIZE, piece, deliver, unit) == SIZE
            assert b"".join(buf for _, buf, _ in got) == data[10:]
            assert [offset for offset, _, _ in got] == [10, 10 + piece]
            for _, buf, sums in got:
                if not direct:
                    assert sums is None
                    continue
                assert sums == b"".join(hashlib.sha256(buf[i:i + unit]).digest()
                                        for i in range(0, len(buf), unit))
            assert [len(b) for _, b, _ in got] == [piece, SIZE - 10 - piece]
            assert (ranges.stats.direct, ranges.stats.fallbacks) == ((1, 0) if direct else (0, 1))
            ranges.close()

    trio.run(run)


# ---- gated spans: one request for a whole stream ----------------------------------------

PIECE = 65536
# (client, ranges, data, digest) of one test's blob
GatedBody = Callable[[RegistryClient, DirectRanges, bytes, str], Awaitable[None]]


def _gated(registry: Registry, pieces: int, body: GatedBody, piece: int = PIECE) -> None:
    """Run `body` on a blob of `pieces` random pieces pushed to `registry`, with a client
    and a DirectRanges of it (closed afterwards)."""
    data = os.urandom(pieces * piece)
    digest = _push(registry, data)

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            ranges = DirectRanges(client)
            try:
                await body(client, ranges, data, digest)
            finally:
                ranges.close()

    trio.run(run)


def test_a_gated_span_is_received_only_as_far_as_its_gate_moves(registry: Registry) -> None:
    """A stream's request runs on while its gate is moved (the stream claims more): one
    request for all of it, and no byte received beyond where the gate stood."""
    from galleryfs.mount.fetch import SpanGate

    async def body(client: RegistryClient, ranges: DirectRanges, data: bytes, digest: str
                   ) -> None:
        gate = SpanGate(2 * PIECE, idle=30)
        got: list[tuple[int, bytes]] = []
        asked = trio.Event()

        async def deliver(offset: int, buf: bytearray, sums: bytes | None) -> None:
            got.append((offset, bytes(buf)))
            if len(got) == 2:
                asked.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ranges.span, REPO, digest, 0, len(data), PIECE, deliver, PIECE,
                               gate)
            with trio.fail_after(30):
                await asked.wait()
            # The thread waits at the gate: nothing past it was delivered.
            assert [offset for offset, _ in got] == [0, PIECE]
            assert client.bytes_received == 2 * PIECE
            assert gate.extend(6 * PIECE)
            assert gate.extend(len(data))
        assert b"".join(buf for _, buf in got) == data
        assert (ranges.stats.direct, ranges.stats.cut, client.requests_sent) == (1, 0, 1)

    _gated(registry, 16, body)


def test_a_gate_nobody_moves_ends_its_request_and_counts_what_it_left(registry: Registry) -> None:
    """A gate not moved within its idle time shuts: the span returns where the gate
    stood, the connection is closed (its answer half read), the bytes the registry had
    sent beyond the gate are counted as received and discarded, and the next read works."""
    from galleryfs.mount.fetch import SpanGate

    async def body(client: RegistryClient, ranges: DirectRanges, data: bytes, digest: str
                   ) -> None:
        gate = SpanGate(3 * PIECE, idle=0.3)
        got = bytearray()

        async def deliver(offset: int, buf: bytearray, sums: bytes | None) -> None:
            got.extend(buf)

        with trio.fail_after(30):
            reached = await ranges.span(REPO, digest, 0, len(data), PIECE, deliver, 0, gate)
        assert reached == 3 * PIECE and bytes(got) == data[:3 * PIECE]
        assert gate.shut and not gate.extend(len(data))
        assert ranges.stats.cut == 1 and ranges.stats.fallbacks == 0
        assert client.bytes_received == 3 * PIECE + ranges.stats.discarded
        assert ranges.transport.idle == 0  # not pooled
        assert bytes(await ranges(REPO, digest, 5, 99)) == data[5:99]

    _gated(registry, 64, body)


def test_a_gate_shut_by_its_stream_ends_the_request_at_once(registry: Registry) -> None:
    from galleryfs.mount.fetch import SpanGate

    async def body(client: RegistryClient, ranges: DirectRanges, data: bytes, digest: str
                   ) -> None:
        gate = SpanGate(PIECE, idle=600)
        first = trio.Event()

        async def deliver(offset: int, buf: bytearray, sums: bytes | None) -> None:
            first.set()

        async def shut() -> None:
            await first.wait()
            gate.close()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(shut)
            with trio.fail_after(10):  # not the gate's 600 s
                assert await ranges.span(REPO, digest, 0, len(data), PIECE, deliver, 0,
                                         gate) == PIECE

    _gated(registry, 32, body)


def test_a_sequential_stream_is_one_request(registry: Registry) -> None:
    """Read-ahead claims a window at a time; the stream's one request takes each claim."""
    data, blob = _pushed(registry, 40 * CHUNK + 123)

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            ranges, reader = _span_reader(client, 8)
            async with trio.open_nursery() as nursery:
                handle = reader.open(blob, nursery)
                assert await _sequential(handle, len(data), CHUNK // 4) == data
                handle.close()
            # The first read of offset 0 is its own request; the stream's, one more.
            assert client.requests_sent <= 2, client.requests_sent
            assert reader.snapshot()["fetched_bytes"] == len(data)
            assert reader.snapshot()["in_flight"] == 0
            ranges.close()

    trio.run(run)


def test_a_read_waiting_for_a_connection_ends_the_gated_spans_holding_them(
        registry: Registry) -> None:
    """Streams' requests hold both connections for as long as their gates move; a read
    that needs a connection shuts the oldest one's gate (it ends at what it claimed)
    instead of waiting for a stream to end."""
    from galleryfs.mount.fetch import SpanGate

    async def body(client: RegistryClient, ranges: DirectRanges, data: bytes, digest: str
                   ) -> None:
        assert ranges.limiter.total_tokens == 2
        gates = [SpanGate(PIECE, idle=600), SpanGate(PIECE, idle=600)]
        reached: list[int] = []
        started = trio.Semaphore(0)

        async def deliver(offset: int, buf: bytearray, sums: bytes | None) -> None:
            started.release()

        async def stream(gate: SpanGate) -> None:
            reached.append(await ranges.span(REPO, digest, 0, len(data), PIECE, deliver, 0,
                                             gate))

        with trio.fail_after(20):  # not the gates' 600 s
            async with trio.open_nursery() as nursery:
                for gate in gates:
                    nursery.start_soon(stream, gate)
                for _ in gates:
                    await started.acquire()
                assert ranges.limiter.available_tokens == 0
                assert bytes(await ranges(REPO, digest, 7, 4000)) == data[7:4000]
                assert reached == [PIECE]  # one ended; the other goes on
                assert sum(gate.shut for gate in gates) == 1
                for gate in gates:
                    gate.close()
        assert reached == [PIECE, PIECE]
        assert ranges.stats.cut == 2

    _gated(registry, 32, body)


def test_a_gate_shut_ahead_of_its_thread_still_gets_what_it_claimed(registry: Registry) -> None:
    """Shut while its thread is still short of it (a stream moved on), a gated span
    delivers every piece up to the gate, each with its digests from the receiving
    thread, and ends there as a cut: nothing claimed is left to another request."""
    import hashlib

    from galleryfs.mount.fetch import SpanGate

    piece = 4 * PIECE

    async def body(client: RegistryClient, ranges: DirectRanges, data: bytes, digest: str
                   ) -> None:
        gate = SpanGate(6 * piece, idle=600)
        got: list[tuple[int, bytes, bytes | None]] = []

        async def deliver(offset: int, buf: bytearray, sums: bytes | None) -> None:
            if not got:
                gate.close()
            got.append((offset, bytes(buf), sums))

        with trio.fail_after(20):
            reached = await ranges.span(REPO, digest, 0, len(data), piece, deliver, PIECE, gate)
        assert reached == 6 * piece
        assert [offset for offset, _, _ in got] == [i * piece for i in range(6)]
        assert b"".join(buf for _, buf, _ in got) == data[:6 * piece]
        for _, buf, sums in got:
            assert sums == b"".join(hashlib.sha256(buf[i:i + PIECE]).digest()
                                    for i in range(0, len(buf), PIECE))
        assert (ranges.stats.direct, ranges.stats.cut, ranges.stats.fallbacks) == (1, 1, 0)
        assert client.requests_sent == 1

    _gated(registry, 32, body, piece)


def test_a_gated_span_through_httpx_fetches_only_what_its_gate_lets_through(
        registry: Registry) -> None:
    """Without the direct path (a proxy), a gated span's pieces come through httpx, and
    only up to its gate, which shuts: no unclaimed bytes are fetched."""
    from galleryfs.mount.fetch import SpanGate

    async def body(client: RegistryClient, ranges: DirectRanges, data: bytes, digest: str
                   ) -> None:
        ranges.transport.enabled = False
        gate = SpanGate(3 * PIECE, idle=600)
        got = bytearray()

        async def deliver(offset: int, buf: bytearray, sums: bytes | None) -> None:
            got.extend(buf)

        with trio.fail_after(30):
            assert await ranges.span(REPO, digest, 0, len(data), PIECE, deliver, 0,
                                     gate) == 3 * PIECE
        assert bytes(got) == data[:3 * PIECE] and gate.shut
        assert client.bytes_received == 3 * PIECE

    _gated(registry, 32, body)


def test_two_streams_at_once_keep_their_requests(registry: Registry, monkeypatch) -> None:
    """Two files read at once hold the two prefetch slots; when one stream starts its
    next request (its last one reached its end), the other's is not cut for it: the
    slot of the one ending comes free."""
    from galleryfs.mount import reader

    monkeypatch.setattr(reader, "SPAN_REQUEST", 16 * CHUNK)  # four requests per stream
    first, blob1 = _pushed(registry, 64 * CHUNK)
    second, blob2 = _pushed(registry, 64 * CHUNK + 5)

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            ranges, reader = _span_reader(client, 8)
            got: dict[int, bytes] = {}

            async def read(n: int, blob, size: int) -> None:  # noqa: ANN001
                handle = reader.open(blob, nursery)
                got[n] = await _sequential(handle, size, CHUNK // 4)
                handle.close()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read, 1, blob1, len(first))
                nursery.start_soon(read, 2, blob2, len(second))
            assert got == {1: first, 2: second}
            # Per stream: its first read, then four (or five) requests, none cut.
            assert client.requests_sent <= 12, client.requests_sent
            assert ranges.stats.cut == 0
            assert reader.snapshot()["in_flight"] == 0
            ranges.close()

    trio.run(run)


def test_three_streams_on_two_slots_all_finish_without_a_cut_storm(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """More streams than prefetch slots: each gets its bytes, and each stream makes at
    most one request per window refill, whether its requests run to their end or are
    cut for another stream's (not one per chunk)."""
    from galleryfs.mount import reader as reader_mod

    monkeypatch.setattr(reader_mod, "SPAN_REQUEST", 16 * CHUNK)
    files = [_pushed(registry, 48 * CHUNK + n) for n in range(3)]

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            ranges, reader = _span_reader(client, 8)
            got: dict[int, bytes] = {}

            async def read(n: int) -> None:
                data, blob = files[n]
                handle = reader.open(blob, nursery)
                got[n] = await _sequential(handle, len(data), CHUNK // 4)
                handle.close()

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for n in range(3):
                        nursery.start_soon(read, n)
            assert got == {n: data for n, (data, _) in enumerate(files)}
            # Per stream at most: its first read and one request per window refill
            # (48 chunks, a refill per half window of 8), whether a request ran to its
            # end or was cut for another stream.
            assert client.requests_sent <= 3 * (1 + 48 // 4), client.requests_sent
            assert ranges.stats.cut <= client.requests_sent - 3
            assert reader.snapshot()["fetched_bytes"] == sum(len(d) for d, _ in files)
            assert reader.snapshot()["in_flight"] == 0
            ranges.close()

    trio.run(run)


def test_make_room_counts_the_slots_about_to_come_free_against_the_queue() -> None:
    """The slot queue is FIFO: a slot whose request is ending goes to whoever queued
    first, so a request is cut for the one asking only when no ending slot is left
    over for it."""
    from galleryfs.mount.fetch import SpanGate
    from galleryfs.registry.ranges import make_room

    async def run() -> None:
        limiter = trio.CapacityLimiter(2)
        holders = [object(), object()]
        for holder in holders:
            limiter.acquire_on_behalf_of_nowait(holder)
        old, new = SpanGate(4, idle=600), SpanGate(4, idle=600)

        make_room(limiter, [old, new])  # no slot free or ending: the oldest is cut
        assert (old.shut, new.shut) == (True, False)

        make_room(limiter, [old, new])  # old's slot is about to come free for this one
        assert not new.shut

        async with trio.open_nursery() as nursery:
            nursery.start_soon(limiter.acquire_on_behalf_of, "queued first")
            await trio.testing.wait_all_tasks_blocked()
            assert limiter.statistics().tasks_waiting == 1
            make_room(limiter, [old, None, new])  # old's and the ungated one's: two
            assert not new.shut
            make_room(limiter, [old, new])  # old's goes to the one queued first
            assert new.shut
            limiter.release_on_behalf_of(holders[0])
        assert limiter.borrowed_tokens == 2

    trio.run(run)


@pytest.mark.parametrize(("ahead_bytes", "room"), [(None, 2), (PIECE, 1)])
def test_a_span_receives_at_most_its_room_ahead_of_a_slow_taker(
        registry: Registry, monkeypatch: pytest.MonkeyPatch, ahead_bytes: int | None,
        room: int) -> None:
    """The receiving thread starts a piece only while fewer than two (one, for pieces
    larger than half of AHEAD_BYTES) are received and not yet delivered: however slow
    the taker, a span holds that many buffers at most."""
    import threading

    from galleryfs.registry import ranges as ranges_mod

    if ahead_bytes is not None:
        monkeypatch.setattr(ranges_mod, "AHEAD_BYTES", ahead_bytes)
    pieces = 12
    real = ranges_mod._receive
    moved = threading.Condition()
    count = {"started": 0, "delivered": 0, "most": 0}

    def receive(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        with moved:
            count["started"] += 1
            count["most"] = max(count["most"], count["started"] - count["delivered"])
            moved.notify_all()
        return real(*args, **kwargs)

    monkeypatch.setattr(ranges_mod, "_receive", receive)

    def thread_is_held() -> bool:  # the thread started all it may, or all there is
        with moved:
            return moved.wait_for(lambda: count["started"] - count["delivered"] >= room
                                  or count["started"] == pieces, timeout=20)

    async def body(client: RegistryClient, ranges: DirectRanges, data: bytes, digest: str
                   ) -> None:
        got = bytearray()

        async def deliver(offset: int, buf: bytearray, sums: bytes | None) -> None:
            assert await trio.to_thread.run_sync(thread_is_held)
            got.extend(buf)
            with moved:
                count["delivered"] += 1

        with trio.fail_after(60):
            assert await ranges.span(REPO, digest, 0, len(data), PIECE, deliver, 0) == len(data)
        assert bytes(got) == data
        assert count["most"] == room, count

    _gated(registry, pieces, body)
