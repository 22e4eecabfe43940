"""Uploads sent with sendfile while they are hashed, against real registries, and their
fall-back to the httpx path."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from galleryfs import gallery
from galleryfs.gallery.locations import BlobLocations
from galleryfs.reference import parse
from galleryfs.registry import uploads
from galleryfs.registry.client import ClientOptions, RegistryClient
from galleryfs.registry.credentials import Credentials
from galleryfs.registry.uploads import DirectUploads
from tests.faultproxy import FaultProxy
from tests.registry_harness import Registry

SIZE = 3 * (1 << 20) + 12345  # a few sendfile pieces
REPO = "up/blob"


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    # Files of a few MiB take the direct path, in several sendfile() calls.
    monkeypatch.setattr(uploads, "DIRECT_MIN", 1 << 20)
    monkeypatch.setattr(uploads, "_SEND_PIECE", 1 << 20)


@pytest.fixture
def big_file(tmp_path: Path) -> tuple[Path, bytes, str]:
    data = os.urandom(SIZE)
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    return path, data, "sha256:" + hashlib.sha256(data).hexdigest()


def _session_data(registry: Registry, repo: str, location: str) -> Path:
    """Where the registry keeps the bytes an upload session received (its storage)."""
    uuid = location.split("?")[0].rstrip("/").rsplit("/", 1)[1]
    return (registry.storage_dir / "docker" / "registry" / "v2" / "repositories" / repo
            / "_uploads" / uuid / "data")


class Sessions:
    """Records the upload sessions a client opens."""

    def __init__(self, client: RegistryClient) -> None:
        self.opened: list[str] = []
        self._start = client.start_upload
        client.start_upload = self  # type: ignore[method-assign]

    async def __call__(self, repo: str) -> str:
        self.opened.append(await self._start(repo))
        return self.opened[-1]


async def _stored(client: RegistryClient, repo: str, digest: str, size: int) -> bytes:
    return bytes(await client.read_blob(repo, digest, size))


class Progress:
    def __init__(self) -> None:
        self.total = 0

    def __call__(self, n: int) -> None:
        self.total += n


class Bars:
    """A push's progress factory; iterates over (total, bar) of every bar it made."""

    def __init__(self) -> None:
        self.made: list[tuple[int, Progress]] = []

    def __call__(self, total: int, label: str) -> Progress:
        self.made.append((total, Progress()))
        return self.made[-1][1]

    def __iter__(self) -> Iterator[tuple[int, Progress]]:
        return iter(self.made)


async def _never_there(digest: str) -> None:
    return None


def test_a_file_is_sent_while_it_is_hashed(registry: Registry, big_file) -> None:  # noqa: ANN001
    path, data, digest = big_file

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            uploads = DirectUploads(client)
            bar = Progress()
            asked: list[str] = []

            async def decide(d: str) -> None:
                asked.append(d)

            got, outcome = await uploads.upload_hashing(REPO, str(path), SIZE, decide, bar)
            assert (got, outcome) == (digest, None) and asked == [digest]
            assert uploads.stats.direct == uploads.stats.hashed_while_sent == 1
            assert uploads.stats.fallbacks == 0
            assert bar.total == SIZE
            assert await _stored(client, REPO, digest, SIZE) == data

    trio.run(run)


def test_an_upload_the_registry_does_not_need_is_abandoned(registry: Registry,
                                                           big_file) -> None:  # noqa: ANN001
    path, data, digest = big_file

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            uploads = DirectUploads(client)
            sessions = Sessions(client)
            bar = Progress()
            sending = trio.Event()

            async def decide(d: str) -> str:
                # Only once bytes went up: the session's first URL is then stale.
                with trio.fail_after(30):
                    await sending.wait()
                return "existing"

            def progress(n: int) -> None:
                bar(n)
                sending.set()

            got, outcome = await uploads.upload_hashing(REPO, str(path), SIZE, decide, progress)
            assert (got, outcome) == (digest, "existing")
            assert uploads.stats.abandoned == 1 and uploads.stats.direct == 0
            assert bar.total == SIZE  # the file counts as done
            # Nothing was stored under the digest by the abandoned session, and the
            # bytes it received were dropped with it (not left for a week's purge).
            assert await client.blob_size(REPO, digest) is None
            (location,) = sessions.opened
            assert not _session_data(registry, REPO, location).exists()

    trio.run(run)


def test_a_known_digest_goes_up_in_one_direct_patch(registry: Registry, big_file) -> None:  # noqa: ANN001
    path, data, digest = big_file

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            uploads = DirectUploads(client)
            await uploads.upload(REPO, digest, SIZE, str(path))
            assert uploads.stats.direct == 1 and uploads.stats.fallbacks == 0
            assert await _stored(client, REPO, digest, SIZE) == data

    trio.run(run)


def test_token_and_tls_registries_take_the_direct_path(token_registry: Registry,
                                                       tls_registry: Registry,
                                                       big_file) -> None:  # noqa: ANN001
    path, data, digest = big_file
    creds = Credentials(token_registry.username, token_registry.password)
    for host, options in ((token_registry.host, ClientOptions(plain_http=True, credentials=creds)),
                          (tls_registry.host, ClientOptions(ca_file=tls_registry.ca_file))):

        async def run() -> None:
            async with RegistryClient(host, options) as client:  # noqa: B023
                uploads = DirectUploads(client)
                got, _ = await uploads.upload_hashing(REPO, str(path), SIZE, _never_there)
                assert got == digest
                # The session was opened through httpx (which got the push token): the
                # direct PATCH carried the same credentials.
                assert uploads.stats.direct == 1 and uploads.stats.fallbacks == 0
                assert await _stored(client, REPO, digest, SIZE) == data

        trio.run(run)


def test_a_failed_direct_upload_starts_over_through_httpx(registry: Registry,
                                                          big_file) -> None:  # noqa: ANN001
    path, data, digest = big_file

    async def run() -> None:
        with FaultProxy(registry.url) as proxy:
            async with RegistryClient(proxy.host, ClientOptions(plain_http=True)) as client:
                uploads = DirectUploads(client)
                bar = Progress()
                proxy.fail(r"^PATCH /v2/up/blob/blobs/uploads/", 1, 503)
                got, outcome = await uploads.upload_hashing(REPO, str(path), SIZE,
                                                            _never_there, bar)
                assert (got, outcome) == (digest, None)
                assert uploads.stats.fallbacks == 1 and uploads.stats.direct == 0
                assert bar.total == SIZE  # taken back, then counted once by the new session
                assert proxy.faults == []
                assert await _stored(client, REPO, digest, SIZE) == data

    trio.run(run)


def test_push_sends_large_files_while_hashing_and_mounts_known_ones(
        registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    model.mkdir()
    weights = os.urandom(SIZE)
    (model / "model.safetensors").write_bytes(weights)
    (model / "copy.safetensors").write_bytes(weights)  # the same bytes twice
    (model / "config.json").write_text('{"model_type": "bert"}')
    locations = BlobLocations(tmp_path / "locations.json")

    async def push(name: str) -> gallery.PushResult:
        # A fresh digest cache each time: every file is hashed (and large ones sent) again.
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / f"xdg-{name}"))
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            return await gallery.push(client, model, parse(f"{registry.host}/{name}:v1"),
                                      locations=locations)

    first = trio.run(push, "g/a")
    assert sorted(first.uploaded) == ["config.json", "model.safetensors"] or sorted(
        first.uploaded) == ["config.json", "copy.safetensors"]
    assert first.bytes_uploaded == SIZE + len('{"model_type": "bert"}')
    # Same repository again: the hash finds the blob there, the upload is abandoned.
    again = trio.run(push, "g/a")
    assert again.digest == first.digest and again.uploaded == []
    assert len(again.existing) == 2
    # Another repository: the hint says where the blob is, so it is mounted.
    other = trio.run(push, "g/b")
    assert other.digest == first.digest and other.uploaded == []
    assert len(other.mounted) == 2

    async def pulled() -> bytes:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            digest = "sha256:" + hashlib.sha256(weights).hexdigest()
            return await _stored(client, "g/b", digest, SIZE)

    assert trio.run(pulled) == weights


def test_the_bar_counts_every_file_once(registry: Registry, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = tmp_path / "model"
    model.mkdir()
    weights = os.urandom(SIZE)
    (model / "a.bin").write_bytes(weights)
    bars = Bars()

    async def push() -> gallery.PushResult:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            return await gallery.push(client, model, parse(f"{registry.host}/g/m:v1"),
                                      progress=bars,
                                      locations=BlobLocations(tmp_path / "loc.json"))

    trio.run(push)
    # A copy of a file whose digest is remembered: the copy is sent while hashed (and
    # abandoned, the blob is there), the original is decided without an upload.
    (model / "b.bin").write_bytes(weights)
    again = trio.run(push)
    assert again.existing == ["a.bin"] and again.uploaded == []
    for total, bar in bars:
        assert bar.total == total


def test_a_file_changed_while_hashed_is_not_remembered(tmp_path: Path) -> None:
    from galleryfs.gallery.hashcache import HashCache

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 100)
    before = f.stat()
    f.write_bytes(b"b" * 100)  # same size, new content, during the hash
    os.utime(f, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    cache = HashCache(tmp_path / "digests.json")
    cache.put(f, "sha256:" + "0" * 64, 100, before)
    assert cache.get(f) is None
    cache.put(f, "sha256:" + "1" * 64, 100, f.stat())
    assert cache.get(f) == ("sha256:" + "1" * 64, 100)


def test_upload_session_delete_asks_for_push_scope() -> None:
    import httpx

    from galleryfs.registry.auth import scope_for

    session = httpx.Request("DELETE", "https://r.example/v2/g/m/blobs/uploads/abc?_state=x")
    manifest = httpx.Request("DELETE", "https://r.example/v2/g/m/manifests/sha256:00")
    assert scope_for(session) == "repository:g/m:pull,push"
    assert scope_for(manifest) == "repository:g/m:delete,pull"


def test_a_retried_httpx_upload_counts_its_bytes_once(registry: Registry,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from galleryfs.registry import client as registry_module

    monkeypatch.setattr(registry_module, "MONOLITHIC_LIMIT", 1000)  # chunked PATCHes
    data = os.urandom(100_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    async def run(path: Path) -> None:
        with FaultProxy(registry.url) as proxy:
            async with RegistryClient(proxy.host, ClientOptions(plain_http=True)) as client:
                bar = Progress()
                proxy.fail(r"^PATCH /v2/up/blob/blobs/uploads/", 1, 503)
                await client.upload_blob(REPO, digest, len(data), str(path), bar,
                                         chunk_size=40_000)
                assert proxy.faults == [] and bar.total == len(data)
                assert await _stored(client, REPO, digest, len(data)) == data
        # The failed attempt's session was dropped, not left for the registry's purge.
        uploads = (registry.storage_dir / "docker" / "registry" / "v2" / "repositories" / REPO
                   / "_uploads")
        assert not list(uploads.glob("*/data")), list(uploads.iterdir())

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "small.bin"
        path.write_bytes(data)
        trio.run(run, path)


def test_two_files_with_the_same_bytes_are_uploaded_once(registry: Registry, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    model = tmp_path / "model"
    model.mkdir()
    weights = os.urandom(SIZE)
    for name in ("a.bin", "b.bin", "c.bin"):
        (model / name).write_bytes(weights)
    digest = "sha256:" + hashlib.sha256(weights).hexdigest()
    bars = Bars()

    async def push(proxy: FaultProxy) -> gallery.PushResult:
        async with RegistryClient(proxy.host, ClientOptions(plain_http=True)) as client:
            return await gallery.push(client, model, parse(f"{proxy.host}/g/m:v1"),
                                      progress=bars,
                                      locations=BlobLocations(tmp_path / "loc.json"))

    with FaultProxy(registry.url) as proxy:
        result = trio.run(push, proxy)
        closed = [p for m, p, status in proxy.seen
                  if m == "PUT" and "/blobs/uploads/" in p and f"digest={digest}" in p
                  and status == 201]
    assert len(closed) == 1  # one upload of the bytes, not three
    assert result.uploaded == ["a.bin"] and result.bytes_uploaded == SIZE
    (total, bar), = bars
    assert bar.total == total == 3 * SIZE


@pytest.mark.parametrize("how", ["error", "cancel"])
def test_an_upload_that_fails_or_is_cancelled_drops_its_session(registry: Registry, big_file,
                                                                 how: str) -> None:  # noqa: ANN001
    """An error after the session opened (here, in `decide`) or a cancel (Ctrl-C) drops
    the upload session at once, rather than leaving it for the registry to expire."""
    from galleryfs.errors import RegistryError

    path, _, _ = big_file

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            sessions = Sessions(client)
            opened = sessions.opened
            uploads = DirectUploads(client)
            deciding = trio.Event()

            async def decide(digest: str) -> str:
                deciding.set()
                if how == "error":
                    raise RegistryError("the registry went away")
                await trio.sleep_forever()
                raise AssertionError("not reached")

            if how == "error":
                with pytest.raises(RegistryError, match="went away"):
                    await uploads.upload_hashing(REPO, str(path), SIZE, decide)
            else:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(uploads.upload_hashing, REPO, str(path), SIZE, decide)
                    with trio.fail_after(30):
                        await deciding.wait()
                    assert _session_data(registry, REPO, opened[0]).exists()  # meanwhile
                    nursery.cancel_scope.cancel()
            assert len(opened) == 1
            assert not _session_data(registry, REPO, opened[0]).exists()  # dropped

    trio.run(run)


@pytest.mark.parametrize("digest_known", [True, False])
def test_a_cancel_mid_body_drops_the_session_by_its_current_url(
        registry: Registry, big_file, monkeypatch: pytest.MonkeyPatch,
        digest_known: bool) -> None:  # noqa: ANN001
    """Ctrl-C after the registry got the first piece: the sender ends the body at its
    next piece, and the session is dropped by the URL the registry then gives (the first
    one is refused once bytes arrived). Both the known-digest upload and the hashing
    one."""
    import threading

    path, _, digest = big_file
    first_sent, release = threading.Event(), threading.Event()
    real_send_piece = uploads._send_piece

    def send_piece(sock, f, offset: int, n: int, buf) -> int:  # noqa: ANN001
        if offset:  # every piece after the first waits for the test
            assert release.wait(30)
        got = real_send_piece(sock, f, offset, n, buf)
        first_sent.set()
        return got

    monkeypatch.setattr(uploads, "_send_piece", send_piece)

    async def run() -> None:
        async with RegistryClient(registry.host, ClientOptions(plain_http=True)) as client:
            sessions = Sessions(client)
            uploads = DirectUploads(client)

            async def upload() -> None:
                if digest_known:
                    await uploads.upload(REPO, digest, SIZE, str(path))
                else:
                    await uploads.upload_hashing(REPO, str(path), SIZE, _never_there)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload)
                assert await trio.to_thread.run_sync(first_sent.wait, 30)
                (location,) = sessions.opened
                data = _session_data(registry, REPO, location)
                with trio.fail_after(30):  # the registry stores what it got (bounded wait)
                    while not (data.exists() and data.stat().st_size):
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
                release.set()
            assert not data.exists()
            assert await client.blob_size(REPO, digest) is None

    trio.run(run)
